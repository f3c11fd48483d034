"""The command line, the demo, the synthetic data, and the package without its extension."""

import os
import subprocess
import sys

import pytest
import torch

from masked_optim.experiments.cli import environment, main
from masked_optim.experiments.data import modality_competition
from masked_optim.experiments.demo import run_demo


def test_env_reports_versions_and_extension(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "extension masked_optim._C" in out
    info = environment()
    assert info["torch"] == torch.__version__


def test_demo_trains_and_reports_rates_and_kept_fractions():
    lines = []
    result = run_demo(epochs=2, n=400, print_fn=lines.append)
    assert len(result["history"]) == 2
    for row in result["history"]:
        for m in ("a", "b"):
            assert 0.1 <= row["rate"][m] <= 1.0  # the default ratio rule's range
            assert 0 < row["kept_fraction"][m] <= 1
            assert abs(row["kept_fraction"][m] - row["rate"][m]) < 0.05  # thousands of units per step
    assert "rate_a" in lines[1] and "kept_b" in lines[1]
    assert lines[-2].startswith("amss test accuracy") and lines[-1].startswith("plain SGD, same seed")
    assert set(result["baseline_test_accuracy"]) == {"fused", "a", "b"}
    assert "rule='ratio'" in lines[0]


def test_demo_runs_the_papers_rule_on_request():
    lines = []
    result = run_demo(epochs=1, n=400, rule="softmax", baseline=False, print_fn=lines.append)
    row = result["history"][0]
    assert "rule='softmax'" in lines[0]
    # the paper's rule gives two modalities rates that sum to 1 on every step that did not fall back
    assert abs(row["rate"]["a"] + row["rate"]["b"] - 1) < 1e-6 or row["fallback_fraction"] > 0
    with pytest.raises(ValueError, match=r"Invalid rule: 'bogus'; allowed: one of 'softmax', 'ratio'"):
        run_demo(epochs=1, n=400, rule="bogus", print_fn=lines.append)


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--mask", "bogus"])
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_synthetic_data_splits_and_standardisation():
    data = modality_competition("parity3", n=500, seed=3)
    x_tr, y_tr = data.train
    assert data.dims == {"a": 20, "b": 2 * 3 + 16} and data.num_classes == 4
    assert (y_tr.shape[0], data.val[1].shape[0], data.test[1].shape[0]) == (300, 100, 100)
    for m in ("a", "b"):
        torch.testing.assert_close(x_tr[m].mean(0), torch.zeros(data.dims[m]), atol=1e-5, rtol=0)
        torch.testing.assert_close(x_tr[m].std(0), torch.ones(data.dims[m]), atol=1e-5, rtol=0)
    again = modality_competition("parity3", n=500, seed=3)
    assert torch.equal(again.test[0]["b"], data.test[0]["b"])
    with pytest.raises(ValueError, match=r"Invalid setting: 'xor3'; allowed: one of \['parity3', 'xor'\]"):
        modality_competition("xor3")


def test_package_works_without_the_extension():
    code = (
        "import torch, masked_optim\n"
        "from masked_optim.backends import _cpp_lib\n"
        "assert not _cpp_lib.available(), 'extension should be disabled'\n"
        "assert 'disabled by MASKED_OPTIM_DISABLE_EXTENSION' in _cpp_lib.unavailable_reason()\n"
        "p = torch.ones(100, requires_grad=True); p.grad = torch.ones(100)\n"
        "opt = masked_optim.MaskedMultiModalSGD([{'params': [p], 'modality': 'a'}], lr=0.1)\n"
        "opt.step(rates={'a': 0.5}); s = opt.last_step_stats()['a']\n"
        "opt2 = masked_optim.MaskedMultiModalSGD([{'params': [p], 'modality': 'a'}], lr=0.1)\n"
        "opt2.step(rates={'a': 0.5})\n"
        "print(s.backend, s.total_units)\n"
    )
    env = dict(os.environ, MASKED_OPTIM_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "100"]
    assert out.stderr.count("no fused sgd backend for cpu tensors") == 1  # the fallback warns once


def test_bench_writes_json_with_machine_and_results(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "0.02", "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"date", "machine", "args", "results"} <= set(data)
    assert data["machine"]["torch"] == torch.__version__
    providers = {r["provider"] for r in data["results"]}
    assert "torch.optim.SGD(foreach)" in providers
    # The quick bench times every mode (tests/test_bench.py checks the report in detail).
    assert data["args"]["modes"] == "scale,uniform,amss,amss+" and data["args"]["sizes"] == "0.02"
    for r in data["results"]:
        if r["kind"] != "split":
            assert r["median_ms"] > 0 and r["ratio_to_sgd_foreach"] > 0
    assert "x foreach" in capsys.readouterr().out


def _train_args(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    base = ["train", "--dataset", "synthetic:xor", "--method", "amss", "--batch-size", "500", "--no-probe", "--quiet",
            "--backend", "reference", "--json", str(out)]
    return base + list(extra), out


def _without_wall_time(path):
    import json

    run = json.loads(path.read_text())
    run.pop("wall_time_s")
    return run


def test_cli_train_checkpoint_and_resume_continue_the_run_bit_identically(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    args, full = _train_args(tmp_path, "full", "--epochs", "3")
    assert main(args) == 0
    args, _ = _train_args(tmp_path, "part", "--epochs", "2", "--checkpoint", str(ckpt), "--checkpoint-every", "2")
    assert main(args) == 0 and ckpt.is_file()
    capsys.readouterr()
    args, resumed = _train_args(tmp_path, "resumed", "--epochs", "3", "--resume", str(ckpt), "--checkpoint", str(ckpt))
    assert main([a for a in args if a != "--quiet"]) == 0
    assert _without_wall_time(resumed) == _without_wall_time(full)
    err = capsys.readouterr().err  # the resumed run trains epoch 3 only, and says where it saved
    assert "epoch   1/3" not in err and "epoch   3/3" in err and f"(checkpoint {ckpt})" in err


def test_cli_train_checkpoint_bad_input_exits_2(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    args, _ = _train_args(tmp_path, "one", "--epochs", "1", "--checkpoint", str(ckpt))
    assert main(args) == 0
    cases = [
        (["--checkpoint-every", "0", "--checkpoint", str(ckpt)], "Invalid --checkpoint-every: '0'"),
        (["--checkpoint-every", "x", "--checkpoint", str(ckpt)], "Invalid --checkpoint-every: 'x'"),
        (["--checkpoint-every", "2"], "Invalid --checkpoint-every without --checkpoint"),
        (["--resume", str(tmp_path / "missing.pt")], "no such file"),
        (["--checkpoint", str(tmp_path / "no" / "run.pt")], "an existing directory"),
        (["--resume", str(ckpt), "--lr", "0.1", "--seed", "3"], "seed: checkpoint 0, config 3; lr: checkpoint 0.01, config 0.1."),
        (["--resume", str(tmp_path / "one.json")], "not a readable masked_optim training checkpoint"),
    ]
    for extra, message in cases:
        args, _ = _train_args(tmp_path, "bad", "--epochs", "2", *extra)
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, extra


def test_cli_rule_power_and_data_seeds_reach_the_runs(tmp_path, capsys):
    import json

    args, out = _train_args(tmp_path, "ratio", "--epochs", "1", "--rule", "ratio", "--power", "2")
    assert main(args) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["rule"], config["power"], config["max_rate"]) == ("ratio", 2.0, None)
    assert main(["compare", "--dataset", "synthetic:xor", "--methods", "joint,scale@ratio", "--seeds", "1", "--data-seeds", "1,2",
                 "--epochs", "1", "--batch-size", "500", "--no-probe", "--no-plot", "--quiet", "--out", str(tmp_path)]) == 0
    c = json.loads((tmp_path / "synthetic_xor.json").read_text())
    assert c["data_seeds"] == [1, 2] and sorted(r["config"]["data_seed"] for r in c["runs"]) == [1, 1, 2, 2]
    assert "x 2 data draws" in capsys.readouterr().out
    for bad, message in ((["--data-seeds", "0"], "Invalid --data-seeds: '0'"), (["--rule", "max"], "invalid choice: 'max'")):
        with pytest.raises(SystemExit) as exc:
            main(["compare", "--dataset", "synthetic:xor", "--methods", "joint", *bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_train_adamw_records_the_optimizer(tmp_path, capsys):
    import json

    path = tmp_path / "run.json"
    assert main(["train", "--dataset", "synthetic:xor", "--method", "scale", "--optimizer", "adamw", "--epochs", "1",
                 "--no-probe", "--quiet", "--adam-betas", "0.8", "0.99", "--json", str(path)]) == 0
    assert "(adamw)" in capsys.readouterr().out
    config = json.loads(path.read_text())["config"]
    assert config["optimizer"] == "adamw" and (config["adam_beta1"], config["adam_beta2"]) == (0.8, 0.99)
    assert config["weight_decay"] == 1e-4  # passed as given, not AdamW's 1e-2
    assert main(["compare", "--dataset", "synthetic:xor", "--methods", "joint,scale", "--seeds", "1", "--epochs", "1",
                 "--no-probe", "--quiet", "--no-plot", "--optimizer", "adamw", "--out", str(tmp_path), "--name", "c"]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert {r["config"]["optimizer"] for r in c["runs"]} == {"adamw"}


def test_cli_train_adamw_resume_is_bit_identical_and_the_optimizer_is_checked(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    args, full = _train_args(tmp_path, "full", "--epochs", "3", "--optimizer", "adamw")
    assert main(args) == 0
    args, _ = _train_args(tmp_path, "part", "--epochs", "2", "--optimizer", "adamw", "--checkpoint", str(ckpt))
    assert main(args) == 0
    args, resumed = _train_args(tmp_path, "resumed", "--epochs", "3", "--optimizer", "adamw", "--resume", str(ckpt))
    assert main(args) == 0
    assert _without_wall_time(resumed) == _without_wall_time(full)
    capsys.readouterr()
    args, _ = _train_args(tmp_path, "bad", "--epochs", "3", "--resume", str(ckpt))  # the default optimizer, sgd
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "optimizer: checkpoint 'adamw', config 'sgd'" in capsys.readouterr().err


# --- compare keeps finished runs as it goes, and --resume reuses them ----------------------------

_COMPARE = ["compare", "--dataset", "synthetic:xor", "--methods", "joint,amss", "--seeds", "2", "--epochs", "2",
            "--batch-size", "500", "--no-probe", "--no-plot", "--quiet", "--backend", "reference"]


def _runs_without_wall_time(path):
    import json

    runs = json.loads(path.read_text())["runs"]
    for run in runs:
        run.pop("wall_time_s")
    return runs


def _killed_compare(out):
    """Start the compare in a subprocess whose second run hangs, SIGKILL it once the first run is in the journal."""
    import signal
    import time

    code = (
        "import sys, time\n"
        "import masked_optim.experiments.compare as c\n"
        "real, calls = c.train, []\n"
        "def train(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1: time.sleep(600)  # 'dies' during the second run\n"
        "    return real(*a, **k)\n"
        "c.train = train\n"
        "from masked_optim.experiments.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    journal = out / "c.partial.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", code, *_COMPARE, "--out", str(out), "--name", "c"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (journal.is_file() and journal.read_text().endswith("\n")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no run was written"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert len(journal.read_text().splitlines()) == 1 and not (out / "c.json").exists()
    return journal


def test_cli_compare_killed_midway_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    full = tmp_path / "full"
    assert main(_COMPARE + ["--out", str(full), "--name", "c"]) == 0
    assert not (full / "c.partial.jsonl").exists()  # the final JSON supersedes the journal
    uninterrupted = capsys.readouterr().out
    part = tmp_path / "part"
    journal = _killed_compare(part)
    with open(journal, "a") as fh:  # a kill in the middle of a write leaves a cut last line: dropped
        fh.write('{"config": {"method": "amss"')
    assert main(_COMPARE + ["--out", str(part), "--name", "c", "--resume"]) == 0
    out = capsys.readouterr()
    assert "resume: reusing 1 of 4 runs from" in out.err
    assert _runs_without_wall_time(part / "c.json") == _runs_without_wall_time(full / "c.json")  # bit for bit, same order
    def table(text):  # the printed table but for its last column, the wall time
        return [line.rsplit(None, 1)[0] for line in text.splitlines() if not line.startswith(("wrote", "total"))]

    assert table(out.out) == table(uninterrupted) and len(table(out.out)) == 5
    assert not journal.exists()


def test_cli_compare_resume_refuses_changed_options_and_an_unresumed_journal(tmp_path, capsys):
    import json

    journal = _killed_compare(tmp_path)
    before = journal.read_text()
    cases = [
        (["--resume", "--lr", "0.5"], "has lr 0.01, this compare 0.5"),
        (["--resume", "--backend", "auto"], "has backend 'reference', this compare 'auto'"),
        (["--resume", "--seeds", "3,4"], "is not one this compare runs"),
        ([], "holds the finished runs of an interrupted compare; allowed: --resume to reuse them"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(_COMPARE + ["--out", str(tmp_path), "--name", "c", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, (extra, err)
        assert journal.read_text() == before  # nothing was overwritten
    # more seeds than the interrupted compare: its run is reused, the new ones trained
    assert main(_COMPARE + ["--out", str(tmp_path), "--name", "c", "--resume", "--seeds", "3"]) == 0
    assert "reusing 1 of 6 runs" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "c.json").read_text())["runs"]) == 6


def test_cli_attention_fusion_with_probe_signal_trains_joint_and_scale(tmp_path, capsys):
    import json

    path = tmp_path / "run.json"
    assert main(["train", "--dataset", "synthetic:xor", "--method", "scale", "--fusion", "attention", "--signal", "probes",
                 "--fusion-params", "modality", "--epochs", "1", "--no-probe", "--quiet", "--json", str(path)]) == 0
    run = json.loads(path.read_text())
    assert (run["config"]["fusion"], run["config"]["signal"], run["config"]["probe_lr"]) == ("attention", "probes", 0.01)
    assert run["config"]["fusion_params"] == "modality"
    assert set(run["test"]["slice_accuracy"]) == set(run["modalities"]) and run["steps"] > 0
    assert all(0 < r <= 1 for r in run["mean_rates"].values())
    assert main(["compare", "--dataset", "synthetic:xor", "--methods", "joint,scale", "--seeds", "1", "--epochs", "1",
                 "--fusion", "attention", "--signal", "probes", "--probe-lr", "0.03", "--no-probe", "--quiet", "--no-plot",
                 "--out", str(tmp_path), "--name", "c"]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert {(r["config"]["fusion"], r["config"]["signal"], r["config"]["probe_lr"]) for r in c["runs"]} == {("attention", "probes", 0.03)}
    assert {r["config"]["method"] for r in c["runs"]} == {"joint", "scale"}
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "synthetic:xor", "--fusion", "attention", "--epochs", "1", "--quiet"])
    assert exc.value.code == 2
    assert "Invalid signal: 'slices' with fusion 'attention'" in capsys.readouterr().err
