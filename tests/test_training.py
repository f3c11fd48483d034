"""The training loop, every method for a few steps, the comparison JSON and table, and the CLI on a
tiny configuration (synthetic data: no data package needed)."""

import json
import math

import pytest
import torch

from masked_optim.experiments.cli import main
from masked_optim.experiments.compare import (
    SCHEMA,
    format_table,
    merge_comparisons,
    plot_curves,
    run_compare,
    save_json,
    summarise,
    validate_result,
)
from masked_optim.experiments.data import modality_competition
from masked_optim.experiments.models import Conv1dEncoder, MLPEncoder, build_model
from masked_optim.experiments.relearn import DiagnoseRelearn
from masked_optim.experiments.training import METHODS, TrainConfig, method_rule, method_spec, parse_method, train

RUNNABLE = list(METHODS) + ["relearn+amss", "relearn+uniform:channel"]


@pytest.fixture(scope="module")
def tiny():
    return modality_competition("xor", n=300, seed=1)


def run(tiny, method, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("probe", False)
    return train(TrainConfig(dataset="synthetic:xor", method=method, **kw), tiny)


@pytest.mark.parametrize("method", RUNNABLE + ["amss:channel", "uniform:channel", "amss+:channel", "amss@softmax", "scale@ratio"])
def test_every_method_trains_and_reports(tiny, method):
    r = run(tiny, method, probe=True)
    assert r["best_epoch"] in (1, 2) or r["diverged_at_epoch"] is not None
    assert set(r["test"]["slice_accuracy"]) == {"a", "b"} == set(r["test"]["probe_accuracy"])
    for key in ("accuracy", "macro_f1"):
        assert 0.0 <= r["test"][key] <= 1.0
    masked = method_spec(parse_method(method)[0]).mask != "none"
    # The estimator's bounds: the ratio rule (default) [min_rate 0.1, 1]; the paper's softmax rule its
    # clamps (0.1, 0.9) or its 0.5 fallback.
    rule = method_rule(method) or TrainConfig.rule
    high = 0.9 if rule == "softmax" else 1.0
    assert r["config"]["rule"] == rule
    for row in r["history"]:
        for m in ("a", "b"):
            if masked:
                assert 0.1 <= row["rate"][m] <= high
            else:
                assert row["rate"][m] == 1.0 and row["kept_fraction"][m] == 1.0
    assert r["config"]["epochs"] == 2 and r["config"]["lr"] == 0.01  # dataset defaults filled in
    json.dumps(r)  # JSON-ready


def test_same_seed_same_run_and_methods_share_initial_weights(tiny):
    a, b = run(tiny, "amss"), run(tiny, "amss")
    assert a["history"] == b["history"] and a["test"] == b["test"]
    # Every method of a seed starts from the same weights: epoch-0 hooks see identical parameters.
    seen = {}

    def hook(epoch, model, data, optimizer):
        seen.setdefault(optimizer.param_groups[0]["mask"], []).append(model.head.fc.weight.detach().clone())
        return {"norm": float(model.head.fc.weight.detach().norm())}

    for method in ("joint", "amss"):
        r = train(TrainConfig(dataset="synthetic:xor", method=method, epochs=1, probe=False, lr=1e-12), tiny, on_epoch_end=hook)
        assert r["history"][0]["hook"]["norm"] > 0
    assert torch.allclose(seen["none"][0], seen["amss"][0], atol=1e-9)


def test_ogm_ge_modulates_and_joint_does_not(tiny):
    joint, ogm = run(tiny, "joint", epochs=1), run(tiny, "ogm-ge", epochs=1)
    assert joint["history"] != ogm["history"]
    window_closed = run(tiny, "ogm-ge", epochs=1, ogm_start=5)  # never active within 1 epoch: plain SGD
    assert window_closed["history"] == joint["history"]


def test_divergence_stops_the_run_and_keeps_finite_metrics(tiny):
    r = run(tiny, "joint", lr=1e6, epochs=3)
    assert r["diverged_at_epoch"] == 1 and r["best_epoch"] == 0 and r["history"] == []
    assert math.isfinite(r["test"]["accuracy"])


@pytest.mark.parametrize("method", ["relearn", "relearn+amss:channel"])
def test_relearn_fires_on_schedule_and_reads_only_train_and_val(tiny, method, monkeypatch):
    seen = []
    original = DiagnoseRelearn.extract

    def extract(self, loader):
        feats, labels = original(self, loader)
        seen.append(labels)
        return feats, labels

    monkeypatch.setattr(DiagnoseRelearn, "extract", extract)
    r = run(tiny, method, epochs=5, relearn_every=2, relearn_times=1)
    fired = [row["epoch"] for row in r["history"] if "relearn" in row]
    assert fired == [2]  # every 2 epochs, at most once
    d = r["history"][1]["relearn"]
    for m in ("a", "b"):
        assert 0.0 <= d["train_purity"][m] <= 1.0 and 0.0 <= d["val_purity"][m] <= 1.0
        assert d["alpha"][m] == pytest.approx(math.tanh(3.0 * abs(d["train_purity"][m] - d["val_purity"][m])), abs=1e-15)
    # one diagnosis = one pass over the training split and one over the validation split, never the test split
    assert len(seen) == 2 and torch.equal(seen[0], tiny.train[1]) and torch.equal(seen[1], tiny.val[1])


def test_relearn_changes_the_run_only_after_it_fires(tiny):
    joint, relearn = run(tiny, "joint", epochs=3), run(tiny, "relearn", epochs=3, relearn_every=2)
    assert joint["history"][:2] == [{k: v for k, v in row.items() if k != "relearn"} for row in relearn["history"][:2]]
    assert joint["history"][2] != relearn["history"][2]


@pytest.mark.parametrize(
    "spec, pattern",
    [("bogus", "Invalid method: 'bogus'"), ("joint:channel", "granularities for 'joint'"), ("amss:row", "amss:row"),
     ("relearn+joint", "allowed after 'relearn\\+'"), ("relearn+amss:row", "relearn\\+amss:row"),
     ("amss@linear", "allowed after '@': one of \\['softmax', 'ratio'\\]"), ("joint@ratio", "only on masked methods"),
     ("scale:channel", "granularities for 'scale'")],
)
def test_parse_method_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_method(spec)


def test_method_rule_picks_the_estimators_rule(tiny):
    from masked_optim.experiments.training import _build, method_rule

    assert parse_method("relearn+amss:channel@ratio") == ("relearn+amss", "channel")
    assert [method_rule(m) for m in ("amss", "amss@ratio", "scale@softmax")] == [None, "ratio", "softmax"]
    for method, rule, expected in (("amss", "softmax", "softmax"), ("amss", "ratio", "ratio"),
                                   ("amss@softmax", "ratio", "softmax"), ("uniform@ratio", "softmax", "ratio")):
        config = TrainConfig(dataset="synthetic:xor", method=method, rule=rule, power=2.0).resolved()
        estimator = _build(config, tiny)[2]
        assert (estimator.rule, estimator.power, estimator.max_rate) == (expected, 2.0, 0.9 if expected == "softmax" else 1.0)
    # a ratio run: in every epoch the weaker modality's mean rate is the larger one, and the floor holds
    r = run(tiny, "amss@ratio", epochs=2)
    assert all(min(row["rate"].values()) >= 0.1 and max(row["rate"].values()) <= 1.0 for row in r["history"])
    assert r["config"]["method"] == "amss@ratio"


@pytest.mark.parametrize(
    "kw, pattern",
    [({"epochs": 0}, "Invalid epochs: 0"), ({"rule": "max"}, "Invalid rule: 'max'"), ({"lr": -1.0}, "Invalid lr: -1.0"), ({"seed": -2}, "Invalid seed: -2"),
     ({"batch_size": 1.5}, "Invalid batch_size: 1.5")],
)
def test_config_validation(tiny, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        run(tiny, "joint", **kw)


def test_models_pick_encoder_by_shape():
    model = build_model({"v": (7,), "s": (3, 40)}, 5)
    assert isinstance(model.encoders["v"], MLPEncoder) and isinstance(model.encoders["s"], Conv1dEncoder)
    out = model({"v": torch.randn(4, 7), "s": torch.randn(4, 3, 40)})
    assert out.logits.shape == (4, 5) and out.features["s"].shape == (4, 64)
    torch.testing.assert_close(out.modality_logits["v"] + out.modality_logits["s"], out.logits)
    with pytest.raises(ValueError, match=r"Invalid shapes\['x'\]"):
        build_model({"x": (1, 2, 3)}, 2)


# --- the comparison --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comparison():
    base = TrainConfig(epochs=2, probe=True)
    return run_compare("synthetic:xor", ["joint", "amss", "ogm-ge"], [0, 1], base=base, progress=False)


def test_comparison_json_schema_round_trip(comparison, tmp_path):
    validate_result(comparison)
    path = tmp_path / "c.json"
    save_json(comparison, str(path))
    loaded = json.loads(path.read_text())
    validate_result(loaded)
    assert loaded["schema"] == SCHEMA and len(loaded["runs"]) == 6 and loaded["folds"] == [0]
    broken = json.loads(path.read_text())
    del broken["runs"][3]["test"]["macro_f1"]
    with pytest.raises(ValueError, match=r"runs\[3\]\.test\.macro_f1"):
        validate_result(broken)


def test_summary_is_the_paired_difference_from_joint(comparison):
    s = comparison["summary"]
    runs = {(r["config"]["method"], r["config"]["seed"]): r for r in comparison["runs"]}
    d = [runs["amss", k]["test"]["slice_accuracy"]["b"] - runs["joint", k]["test"]["slice_accuracy"]["b"] for k in (0, 1)]
    mean = sum(d) / 2
    se = abs(d[0] - d[1]) / 2  # std (ddof 1) of two values / sqrt(2)
    assert s["amss"]["slice:b"]["diff_vs_joint"] == pytest.approx(mean, abs=1e-12)
    assert s["amss"]["slice:b"]["diff_se"] == pytest.approx(se, abs=1e-12)
    assert "diff_vs_joint" not in s["joint"]["accuracy"]
    assert s["amss"]["n"] == 2
    assert summarise(comparison) == s


def test_summary_leaves_out_rates_of_runs_that_took_no_step(comparison):
    c = json.loads(json.dumps(comparison))
    first = next(r for r in c["runs"] if r["config"]["method"] == "amss")
    first["steps"] = 0  # diverged on its first step
    s = summarise(c)
    other = next(r for r in c["runs"] if r["config"]["method"] == "amss" and r is not first)
    assert s["amss"]["rate:a"]["mean"] == pytest.approx(other["mean_rates"]["a"], abs=1e-12)
    for r in c["runs"]:
        if r["config"]["method"] == "joint":
            r["steps"] = 0
    assert "rate:a" not in summarise(c)["joint"]
    c["summary"] = summarise(c)
    assert format_table(c, markdown=True).splitlines()[2].split("|")[-3].strip() == "-/-"


def test_table_and_figure(comparison, tmp_path):
    table = format_table(comparison)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["method", "n", "accuracy", "Δ"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["joint", "amss", "ogm-ge"]
    assert "paired difference from joint" in lines[-1]
    md = format_table(comparison, markdown=True).splitlines()
    assert md[0].startswith("| method | n | accuracy |") and md[1].startswith("|---|---:")
    assert len(md) == 2 + 3 and all(line.count("|") == md[0].count("|") for line in md)
    path = tmp_path / "fig.png"
    plot_curves(comparison, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _part(comparison, seeds):
    part = dict(comparison, runs=[r for r in comparison["runs"] if r["config"]["seed"] in seeds], seeds=list(seeds))
    part["summary"] = summarise(part)
    return part


def test_merge_of_parts_equals_the_whole(comparison, tmp_path, capsys):
    a, b = _part(comparison, [0]), _part(comparison, [1])
    merged = merge_comparisons([a, b])
    assert merged["summary"] == comparison["summary"] and merged["seeds"] == [0, 1]
    validate_result(merged)
    with pytest.raises(ValueError, match="appears twice"):
        merge_comparisons([a, a])
    # adding methods to an earlier comparison: Δ pairs with the joint runs of the other part
    by_method = [dict(comparison, runs=[r for r in comparison["runs"] if (r["config"]["method"] == "joint") == keep],
                      methods=ms) for keep, ms in ((True, ["joint"]), (False, ["amss", "ogm-ge"]))]
    added = merge_comparisons(by_method)
    assert added["methods"] == ["joint", "amss", "ogm-ge"] and added["summary"] == comparison["summary"]
    with pytest.raises(ValueError, match=r"parts\[1\]: dataset 'synthetic:parity3'"):
        merge_comparisons([a, dict(b, dataset="synthetic:parity3")])
    paths = []
    for name, part in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"{name}.json"))
        save_json(part, paths[-1])
    assert main(["merge", *paths, "--out", str(tmp_path / "all.json")]) == 0
    assert "ogm-ge" in capsys.readouterr().out
    assert json.loads((tmp_path / "all.json").read_text())["summary"] == comparison["summary"]
    assert (tmp_path / "all.png").exists()


def test_compare_rejects_bad_input():
    with pytest.raises(ValueError, match="Invalid fold: 3"):
        run_compare("synthetic:xor", ["joint"], [0], folds=[3])
    with pytest.raises(ValueError, match="each method once"):
        run_compare("synthetic:xor", ["joint", "joint"], [0])
    with pytest.raises(ValueError, match="Invalid seeds"):
        run_compare("synthetic:xor", ["joint"], [])


def test_data_draws_are_paired_and_merge_like_folds():
    base = TrainConfig(epochs=1, probe=False)
    whole = run_compare("synthetic:xor", ["joint", "amss"], [0], base=base, progress=False, data_seeds=[0, 1])
    assert whole["data_seeds"] == [0, 1] and [r["config"]["data_seed"] for r in whole["runs"]] == [0, 0, 1, 1]
    runs = {(r["config"]["method"], r["config"]["data_seed"]): r["test"]["accuracy"] for r in whole["runs"]}
    assert runs["joint", 0] != runs["joint", 1]  # another draw is other data
    d = [runs["amss", k] - runs["joint", k] for k in (0, 1)]
    assert whole["summary"]["amss"]["n"] == 2
    assert whole["summary"]["amss"]["accuracy"]["diff_vs_joint"] == pytest.approx(sum(d) / 2, abs=1e-12)
    parts = [dict(whole, runs=[r for r in whole["runs"] if r["config"]["data_seed"] == k], data_seeds=[k]) for k in (0, 1)]
    for part in parts:
        part["summary"] = summarise(part)
    merged = merge_comparisons(parts)
    assert merged["summary"] == whole["summary"] and merged["data_seeds"] == [0, 1]
    with pytest.raises(ValueError, match=r"\(method, seed, fold, data draw\) = \('joint', 0, 0, 0\) appears twice"):
        merge_comparisons([parts[0], parts[0]])
    with pytest.raises(ValueError, match=r"Invalid data_seeds: \[1, 1\]"):
        run_compare("synthetic:xor", ["joint"], [0], data_seeds=[1, 1])


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_compare_prints_table_and_writes_json_and_png(tmp_path, capsys):
    args = ["compare", "--dataset", "synthetic:xor", "--methods", "joint,amss:channel", "--seeds", "2", "--epochs", "1",
            "--no-probe", "--out", str(tmp_path), "--name", "tiny"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "amss:channel" in out.out and "Δ slice b" in out.out
    assert "2/4" in out.err  # progress, one line per run when not on a terminal
    c = json.loads((tmp_path / "tiny.json").read_text())
    validate_result(c)
    assert c["seeds"] == [0, 1] and {r["config"]["method"] for r in c["runs"]} == {"joint", "amss:channel"}
    assert (tmp_path / "tiny.png").stat().st_size > 1000


def test_cli_train_writes_json(tmp_path, capsys):
    path = tmp_path / "run.json"
    assert main(["train", "--dataset", "synthetic:parity3", "--method", "ogm-ge", "--epochs", "1", "--quiet",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "slice accuracy" in out and "linear probe" in out
    assert json.loads(path.read_text())["config"]["method"] == "ogm-ge"


@pytest.mark.parametrize(
    "args, pattern",
    [(["train", "--dataset", "nope"], "nope"), (["train", "--method", "relearn+ogm-ge", "--dataset", "synthetic:xor"], "relearn+ogm-ge"),
     (["compare", "--dataset", "synthetic:xor", "--folds", "x"], "--folds"), (["compare", "--seeds", "0"], "--seeds")],
)
def test_cli_errors_are_one_line(args, pattern, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert pattern in capsys.readouterr().err


# --- AdamW (TrainConfig.optimizer) ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["joint", "scale"])
def test_adamw_runs_every_method_kind_and_records_the_optimizer(tiny, method):
    seen = {}

    def hook(epoch, model, data, optimizer):
        g = optimizer.param_groups[0]
        seen.update(cls=type(optimizer).__name__, wd=g["weight_decay"], betas=tuple(g["betas"]), mask=g["mask"])

    r = train(TrainConfig(dataset="synthetic:xor", method=method, optimizer="adamw", epochs=1, probe=False), tiny,
              on_epoch_end=hook)
    assert r["config"]["optimizer"] == "adamw" and r["diverged_at_epoch"] is None
    from masked_optim.experiments.training import DATASET_DEFAULTS

    assert r["config"]["lr"] == DATASET_DEFAULTS["synthetic"]["lr_adamw"]  # AdamW's default learning rate
    # the weight decay is passed as given (not switched to AdamW's 1e-2); momentum is not used
    assert seen == {"cls": "MaskedMultiModalAdamW", "wd": TrainConfig.weight_decay, "betas": (0.9, 0.999),
                    "mask": "none" if method == "joint" else "scale"}
    sgd = train(TrainConfig(dataset="synthetic:xor", method=method, epochs=1, probe=False, lr=r["config"]["lr"]), tiny)
    assert sgd["config"]["optimizer"] == "sgd" and sgd["history"] != r["history"]
    json.dumps(r)


def test_adamw_joint_is_torch_adamw(tiny):
    """joint under AdamW is torch.optim.AdamW: the same loop with torch's optimizer ends at the same weights."""
    from masked_optim.experiments import training

    weights = {}

    def hook(epoch, model, data, optimizer):
        weights[type(optimizer).__name__] = [p.detach().clone() for p in model.parameters()]

    config = TrainConfig(dataset="synthetic:xor", method="joint", optimizer="adamw", epochs=1, probe=False, weight_decay=0.01)
    train(config, tiny, on_epoch_end=hook)
    real = training._build

    class TorchAdamW(torch.optim.AdamW):
        def step(self, rates=None):
            assert rates is None
            return super().step()

    def build(config, data):
        model, opt, *rest = real(config, data)
        groups = [{k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay")} for g in opt.param_groups]
        return (model, TorchAdamW(groups), *rest)

    training._build = build
    try:
        train(config, tiny, on_epoch_end=hook)
    finally:
        training._build = real
    for a, b in zip(weights["MaskedMultiModalAdamW"], weights["TorchAdamW"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_ogm_ge_and_masked_modes_run(tiny):
    for method in ("ogm-ge", "amss", "amss+:channel", "uniform"):
        r = run(tiny, method, optimizer="adamw", epochs=1)
        assert r["config"]["optimizer"] == "adamw" and r["steps"] > 0


def test_optimizer_is_validated():
    with pytest.raises(ValueError, match="Invalid optimizer: 'adam'"):
        TrainConfig(dataset="synthetic:xor", optimizer="adam").resolved()


def test_merge_refuses_mixed_optimizers(tiny):
    base = TrainConfig(epochs=1, probe=False)
    sgd = run_compare("synthetic:xor", ["joint"], [0], base=base, progress=False)
    adamw = run_compare("synthetic:xor", ["scale"], [0], base=TrainConfig(epochs=1, probe=False, optimizer="adamw"), progress=False)
    with pytest.raises(ValueError, match="one optimizer in a comparison"):
        merge_comparisons([sgd, adamw])
    assert "(adamw)" in format_table(adamw)


def test_probe_slice_accuracies_are_those_of_the_selected_epoch(tiny):
    """With signal="probes", the reported validation slice accuracies are the probes' at the best
    epoch (their weights are kept with the model's), equal to that epoch's history row."""
    r = train(TrainConfig(dataset="synthetic:xor", method="scale", fusion="attention", signal="probes", epochs=4,
                          probe=False), tiny)
    row = next(h for h in r["history"] if h["epoch"] == r["best_epoch"])
    assert r["val"]["accuracy"] == row["val"]["fused"]
    assert r["val"]["slice_accuracy"] == {m: row["val"][m] for m in r["modalities"]}
    assert r["best_epoch"] < 4  # not the last epoch: the probes' last weights would give other accuracies


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), True, "0.1"])
def test_probe_lr_is_checked(bad):
    with pytest.raises(ValueError, match=rf"Invalid probe_lr: {bad!r}; allowed: a finite number > 0".replace("(", r"\(")):
        TrainConfig(dataset="synthetic:xor", signal="probes", probe_lr=bad).resolved()


def test_probe_lr_reaches_the_probes(tiny):
    """The probes' lr changes the probe-reported accuracies, and nothing of the model (they train on
    detached features and feed only the estimator, whose rates move the model: so under joint, whose
    rates are 1, the model is the same)."""
    a = run(tiny, "joint", signal="probes", epochs=2)
    b = run(tiny, "joint", signal="probes", epochs=2, probe_lr=0.1)
    assert (a["config"]["probe_lr"], b["config"]["probe_lr"]) == (0.01, 0.1)
    assert a["val"]["accuracy"] == b["val"]["accuracy"] and a["test"]["accuracy"] == b["test"]["accuracy"]
    assert a["val"]["slice_accuracy"] != b["val"]["slice_accuracy"]


def test_fusion_params_puts_the_attention_projections_in_their_modality(tiny, monkeypatch):
    """``fusion_params="modality"``: each token projection of the attention fusion is in its modality's
    group (rebalanced at its rate), the rest of the fusion shared; ``"shared"`` (default) keeps them shared."""
    from masked_optim.experiments import training

    seen = {}
    build = training._build

    def spy(config, data):
        built = build(config, data)
        seen[config.fusion_params] = built
        return built

    monkeypatch.setattr(training, "_build", spy)
    for how in ("shared", "modality"):
        run(tiny, "scale", fusion="attention", signal="probes", fusion_params=how, epochs=1)
    for how, built in seen.items():
        model, optimizer = built[0], built[1]
        of = {id(p): g["modality"] for g in optimizer.param_groups for p in g["params"]}
        assert len(of) == len(list(model.parameters()))  # every parameter in exactly one group
        for m in model.encoders:
            for p in model.proj[m].parameters():
                assert of[id(p)] == (m if how == "modality" else None)
            assert all(of[id(p)] == m for p in model.encoders[m].parameters())
        assert all(of[id(p)] is None for p in model.attn.parameters())


def test_fusion_params_is_checked():
    with pytest.raises(ValueError, match=r"Invalid fusion_params: 'both'; allowed: one of \['shared', 'modality'\]"):
        TrainConfig(dataset="synthetic:xor", fusion_params="both").resolved()
    with pytest.raises(ValueError, match=r"Invalid fusion_params: 'modality' with fusion 'concat', whose head has no per-modality tensor"):
        TrainConfig(dataset="synthetic:xor", fusion_params="modality").resolved()
