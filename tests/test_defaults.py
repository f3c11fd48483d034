"""The defaults that the README's "Which method should I use?" names, and what they do.

Issue 7's studies (benchmarks/results/rule_study/, release_study/) chose ``ModalSignificance(rule="ratio")``
with its release at 0.2 and ``MaskedMultiModalSGD(mask="scale")``; the paper's settings (``rule="softmax"``, ``mask="amss"`` /
``"amss+"``) stay one argument away. The README names them and quotes the default's headline numbers;
the studies themselves (commands, tables, figures) are in docs/results.md, "Which method should I use?
The evidence". These tests fail if a default drifts from the README, or the README or docs/results.md
from the code or the stored JSONs.
"""

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from masked_optim import MaskedMultiModalSGD, ModalSignificance
from masked_optim.experiments.cli import DEFAULT_METHODS, _config_from, build_parser
from masked_optim.experiments.training import TrainConfig
from tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]


README_SECTION = ("README.md", "Which method should I use?")
EVIDENCE_SECTION = ("docs/results.md", "Which method should I use? The evidence")


def _section(where):
    """The text of a ``## title`` section of a markdown file, up to the next ``## `` heading (or the end)."""
    path, title = where
    text = (ROOT / path).read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"{path} has no '## {title}' section"
    return match.group(1)


def test_optimizer_and_estimator_defaults():
    assert inspect.signature(MaskedMultiModalSGD).parameters["mask"].default == "scale"
    assert MaskedMultiModalSGD([torch.zeros(2, requires_grad=True)]).defaults["mask"] == "scale"
    assert inspect.signature(ModalSignificance).parameters["rule"].default == "ratio"
    assert ModalSignificance().rule == "ratio"


def test_training_and_cli_defaults():
    config = TrainConfig()
    assert (config.method, config.rule) == ("scale", "ratio")
    assert TrainConfig(method="amss@softmax").resolved().rule == "softmax"  # a method's @rule wins
    assert TrainConfig(method="amss").resolved().rule == "ratio"
    args = build_parser().parse_args(["train"])
    assert args.method == "scale"
    config = _config_from(args, method=args.method)  # as `masked-optim train` builds its run
    assert (config.method, config.rule) == ("scale", "ratio")
    assert DEFAULT_METHODS.split(",") == [
        "joint", "ogm-ge", "uniform@softmax", "uniform@ratio", "amss@softmax", "amss@ratio",
        "amss+@softmax", "amss+@ratio", "scale@softmax", "scale@ratio",
    ]


def test_release_is_the_ratio_rules_default_and_reachable_from_the_cli():
    assert ModalSignificance().release_at == 0.2 and ModalSignificance(rule="softmax").release_at == math.inf
    assert TrainConfig().release_at is None  # the estimator's default for the run's rule
    args = build_parser().parse_args(["train", "--release-at", "inf", "--release-beta", "0.5"])
    config = _config_from(args, method=args.method)
    assert (config.release_at, config.release_beta) == (math.inf, 0.5)
    args = build_parser().parse_args(["compare", "--release-at", "0.3"])
    assert _config_from(args).release_at == 0.3


def test_readme_names_the_defaults_and_the_papers_settings():
    section = _section(README_SECTION)
    for needle in ('mask="scale"', 'rule="ratio"', 'rule="softmax"', 'mask="amss+"', 'mask="amss"',
                   'sampler="multinomial"', "release_at=0.2", "release_at=math.inf"):
        assert needle in section, needle
    # ... and points at the evidence, which names the studies' commands and figures.
    assert "](docs/results.md#which-method-should-i-use-the-evidence)" in section
    evidence = _section(EVIDENCE_SECTION)
    for needle in ("benchmarks/run_rule_study.sh", "rule_study.png", "benchmarks/run_release_study.sh",
                   "release_study.png", "release_at=math.inf", 'rule="softmax"'):
        assert needle in evidence, needle


def test_default_step_is_sgd_for_the_weakest_modality_and_a_rate_times_sgd_for_the_other():
    """The defaults end to end: the weaker modality (uninformative logits) gets rate 1 and the exact
    ``torch.optim.SGD`` step; the dominant one gets its ratio-rule rate times the SGD step."""
    labels = torch.tensor([0, 0, 1, 1])
    logits = {"strong": torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]), "weak": torch.zeros(4, 2)}
    rates = ModalSignificance()(logits, labels)
    assert rates["weak"] == 1.0 and 0.1 <= rates["strong"] < 1.0
    torch.manual_seed(0)
    params = {m: torch.randn(5, 3, requires_grad=True) for m in logits}
    grads = {m: torch.randn(5, 3) for m in logits}
    for m in params:
        params[m].grad = grads[m].clone()
    opt = MaskedMultiModalSGD([{"params": [params[m]], "modality": m} for m in params], lr=0.1)
    before = {m: p.detach().clone() for m, p in params.items()}
    opt.step(rates=rates)
    for m in params:
        ref = before[m].clone().requires_grad_(True)
        ref.grad = (grads[m] * rates[m]) if m == "strong" else grads[m].clone()
        torch.optim.SGD([ref], lr=0.1).step()
        # the float32 row of the tolerance table: the fused step multiplies rate and lr in one expression
        assert_close(params[m].detach(), ref.detach())


@pytest.mark.parametrize("bad", ["ratios", "", None])
def test_rule_names_itself_when_wrong(bad):
    with pytest.raises((ValueError, TypeError), match=r"Invalid rule"):
        ModalSignificance(rule=bad)


def test_release_numbers_are_those_of_the_stored_study():
    """The default's paired differences in docs/results.md's evidence, and those the README quotes, are
    recomputed from the release study's JSONs (benchmarks/results/release_study/): a rerun that changes
    them must change the documentation."""
    import json

    from masked_optim.experiments.compare import summarise

    evidence = _section(EVIDENCE_SECTION)
    readme = _section(README_SECTION)
    study = ROOT / "benchmarks" / "results" / "release_study"
    rule = ROOT / "benchmarks" / "results" / "rule_study"

    def runs(path, methods):
        return [r for r in json.loads(path.read_text())["runs"] if r["config"]["method"] in methods]

    cases = {
        "synthetic_xor": runs(study / "synthetic_xor.json", {"joint", "scale@ratio"}),
        "synthetic_parity3": runs(study / "synthetic_parity3.json", {"joint", "scale@ratio"}),
        "mfeat_fac_zer": runs(study / "mfeat_fac_zer.json", {"joint", "scale@ratio"}),
        "watch": runs(rule / "watch.json", {"joint"}) + runs(study / "watch_scale.json", {"scale@ratio"}),
        "xor held out": runs(study / "synthetic_xor_heldout.json", {"joint", "scale@ratio"}),
        "mfeat held out": runs(study / "mfeat_fac_zer_heldout.json", {"joint", "scale@ratio"}),
    }
    quoted_in_readme = {"synthetic_xor", "synthetic_parity3", "mfeat_fac_zer", "watch"}
    for name, rs in cases.items():
        acc = summarise({"runs": rs})["scale@ratio"]["accuracy"]
        cell = f"{100 * acc['diff_vs_joint']:+.2f} ± {100 * acc['diff_se']:.2f}".replace("-", "−")
        assert cell in evidence, (name, cell)
        if name in quoted_in_readme:
            assert cell in readme, (name, cell)
