"""Whole-run checkpoint / resume of ``training.train``: a run interrupted after epoch k and resumed
from its checkpoint ends bit-identical to the uninterrupted run (weights, optimizer state, history,
best epoch, metrics); mismatching configs, foreign or corrupt files are refused; writes are atomic."""

import os

import pytest
import torch

from masked_optim.backends import backend_status
from masked_optim.experiments.data import modality_competition
from masked_optim.experiments.training import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    METHODS,
    TrainConfig,
    load_checkpoint,
    resume_training,
    train,
)
from tolerances import assert_close

EPOCHS, STOP = 4, 2
CHEAP = list(METHODS) + ["relearn+amss", "relearn+uniform:channel", "uniform:channel", "amss:channel", "amss+:channel"]
BACKENDS = [b for b in ("reference", "cpp") if backend_status(b, torch.device("cpu")) is None]
# Everything of the result but the wall time.
COMPARED = ("config", "dataset", "modalities", "num_classes", "best_epoch", "val", "test", "mean_rates",
            "release_epoch", "steps", "diverged_at_epoch", "history")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    return modality_competition("xor", n=300, seed=1)


def config(method, backend="reference", **kw):
    # Re-learning fires after epochs 1 and 2 (before the checkpoint) and 3 (after it), then stops:
    # the snapshot, the firing count and the schedule all cross the checkpoint. beta > 0 makes the
    # estimator's EMA carry over from step to step.
    kw = {"epochs": EPOCHS, "probe": False, "relearn_every": 1, "relearn_times": 3, "beta": 0.5, **kw}
    return TrainConfig(dataset="synthetic:xor", method=method, backend=backend, **kw)


def run(cfg, data, **kw):
    """``train`` plus the final model's parameters and the optimizer state at the last epoch."""
    seen = {}

    def hook(epoch, model, data, optimizer):
        seen["model"] = model
        seen["optimizer"] = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                             for s in optimizer.state_dict()["state"].values()]

    result = train(cfg, data, on_epoch_end=hook, **kw)
    return result, [p.detach().clone() for p in seen["model"].state_dict().values()], seen["optimizer"]


def interrupt_after(cfg, data, path, epoch=STOP, **kw):
    def stop(event):
        if event["epoch"] == epoch:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(cfg, data, checkpoint=path, progress=stop, **kw)
    assert load_checkpoint(path)["epoch"] == epoch


def assert_same_run(a, b):
    (ra, pa, oa), (rb, pb, ob) = a, b
    for key in COMPARED:
        assert ra[key] == rb[key], key
    assert len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert len(oa) == len(ob)
    for sa, sb in zip(oa, ob):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]


_full_runs = {}


def full_run(cfg, data):
    key = repr(cfg)
    if key not in _full_runs:
        _full_runs[key] = run(cfg, data)
    return _full_runs[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", CHEAP)
def test_resume_is_bit_identical(tiny, tmp_path, method, backend):
    cfg = config(method, backend)
    path = tmp_path / "run.pt"
    interrupt_after(cfg, tiny, path)
    torch.manual_seed(12345)  # a resumed process starts from any global RNG state
    resumed = run(cfg, tiny, resume=path, checkpoint=path)
    assert_same_run(resumed, full_run(cfg, tiny))
    # It went on writing to the same file, up to the last epoch (amss+ref diverges in epoch 4 here:
    # a diverging epoch writes no checkpoint, and the resumed run diverges exactly as the full one).
    diverged = resumed[0]["diverged_at_epoch"]
    assert load_checkpoint(path)["epoch"] == (EPOCHS if diverged is None else diverged - 1)


@pytest.mark.slow
def test_resume_is_bit_identical_on_triton(tmp_path):
    if backend_status("triton", torch.device("cpu")) is not None:
        pytest.skip(f"triton: {backend_status('triton', torch.device('cpu'))}")
    data = modality_competition("xor", n=150, seed=1)
    cfg = config("amss+", "triton", epochs=2)
    interrupt_after(cfg, data, tmp_path / "run.pt", epoch=1)
    assert_same_run(run(cfg, data, resume=tmp_path / "run.pt"), run(cfg, data))


def test_global_rng_is_part_of_the_checkpoint(tiny, tmp_path):
    # Nothing of the synthetic MLP draws from torch's global RNG, so a hook that does stands in for
    # dropout or batch-norm-like randomness: the resumed draws continue the uninterrupted ones.
    def hook(epoch, model, data, optimizer):
        return {"draw": torch.rand(()).item()}

    cfg = config("amss")
    torch.manual_seed(7)
    full = train(cfg, tiny, on_epoch_end=hook)

    def stop(event):
        if event["epoch"] == STOP:
            raise Interrupt

    torch.manual_seed(7)
    with pytest.raises(Interrupt):
        train(cfg, tiny, on_epoch_end=hook, checkpoint=tmp_path / "c.pt", progress=stop)
    torch.manual_seed(99)
    resumed = train(cfg, tiny, on_epoch_end=hook, resume=tmp_path / "c.pt")
    assert resumed["history"] == full["history"]
    assert len({row["hook"]["draw"] for row in full["history"]}) == EPOCHS


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_checkpoint_resumed_on_reference_draws_the_same_masks(tiny, tmp_path):
    """The optimizer state moves across backends; masks are the same Philox stream, so the kept
    counts agree exactly, but the C++ kernel rounds differently (FMA) so weights agree to float32
    tolerance only (observed: max |diff| ~1.5e-8 after 4 epochs)."""
    cpp = config("amss", "cpp")
    path = tmp_path / "cpp.pt"
    interrupt_after(cpp, tiny, path)
    resumed, params, _ = run(config("amss", "reference"), tiny, resume=path)
    full, full_params, _ = full_run(cpp, tiny)
    assert [r["kept_fraction"] for r in resumed["history"]] == [r["kept_fraction"] for r in full["history"]]
    assert resumed["history"][:STOP] == full["history"][:STOP]  # restored as written
    assert resumed["config"]["backend"] == "reference"
    for a, b in zip(params, full_params):
        if a.is_floating_point():
            assert_close(a, b)
        else:
            assert torch.equal(a, b)


def test_more_epochs_continue_the_run_and_resume_training_reads_the_config(tiny, tmp_path):
    path = tmp_path / "short.pt"
    short = train(config("relearn+amss", epochs=2), tiny, checkpoint=path)
    assert load_checkpoint(path)["epoch"] == 2 and short["history"] == full_run(config("relearn+amss"), tiny)[0]["history"][:2]
    longer = train(config("relearn+amss"), tiny, resume=path)  # epochs 2 -> 4: the 4-epoch run
    from_file = resume_training(path, tiny, epochs=EPOCHS)
    for key in COMPARED:
        assert longer[key] == from_file[key] == full_run(config("relearn+amss"), tiny)[0][key], key
    # A checkpoint of the last epoch resumes to the same evaluation without training.
    again = resume_training(path, tiny)
    assert again["history"] == short["history"] and again["test"] == short["test"]
    with pytest.raises(ValueError, match=r"Invalid changes: \['lr'\]"):
        resume_training(path, tiny, lr=0.1)


def test_checkpoint_every_and_contents(tiny, tmp_path):
    path = tmp_path / "c.pt"
    events = []
    train(config("ogm-ge", epochs=5), tiny, checkpoint=path, checkpoint_every=2, progress=events.append)
    assert [e["epoch"] for e in events if "checkpoint" in e] == [2, 4, 5]  # every 2nd, and the last
    state = load_checkpoint(path)
    assert state["format"] == CHECKPOINT_FORMAT and state["version"] == CHECKPOINT_VERSION
    assert state["epoch"] == 5 and len(state["history"]) == 5 and state["config"]["method"] == "ogm-ge"
    assert state["estimator"] is None and state["relearner"] is None and state["modulation"]["generators"]
    assert {"data_order", "torch", "cuda"} <= set(state["rng"])
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no temporary file left behind


def test_config_and_data_mismatch_are_refused(tiny, tmp_path):
    path = tmp_path / "c.pt"
    interrupt_after(config("amss"), tiny, path, epoch=1)
    with pytest.raises(ValueError, match=r"method: checkpoint 'amss', config 'joint'.*lr: checkpoint 0\.01, config 0\.1"):
        train(config("joint", lr=0.1), tiny, resume=path)
    with pytest.raises(ValueError, match=r"seed: checkpoint 0, config 1"):
        train(config("amss", seed=1), tiny, resume=path)
    with pytest.raises(ValueError, match=r"beta: checkpoint 0\.5, config 0\.0"):
        train(config("amss", beta=0.0), tiny, resume=path)
    with pytest.raises(ValueError, match=r"Invalid resume: the data differ.*sha256"):
        train(config("amss"), modality_competition("xor", n=300, seed=2), resume=path)
    # epochs may grow but not fall below the checkpoint's epoch; probe and backend may change.
    train(config("amss", epochs=1, probe=True, backend=BACKENDS[-1]), tiny, resume=path)
    interrupt_after(config("amss"), tiny, path, epoch=2)
    with pytest.raises(ValueError, match=r"Invalid epochs: 1; .* after epoch 2; allowed: epochs >= 2"):
        train(config("amss", epochs=1), tiny, resume=path)


def test_rule_set_by_the_method_name_is_the_runs_rule(tiny, tmp_path):
    """``amss@softmax`` trains with the softmax rule whatever ``rule`` says, and the result records it;
    a checkpoint written when the config still held the unused ``rule`` value resumes all the same."""
    path = tmp_path / "c.pt"
    cfg = config("amss@softmax", rule="ratio")
    full = run(cfg, tiny)[0]
    assert full["config"]["rule"] == "softmax"
    assert full["history"] == run(config("amss@softmax", rule="softmax"), tiny)[0]["history"]
    interrupt_after(cfg, tiny, path)
    state = load_checkpoint(path)
    torch.save({**state, "config": {**state["config"], "rule": "ratio"}}, path)  # as older versions wrote it
    resumed = train(cfg, tiny, resume=path)
    assert {k: resumed[k] for k in COMPARED} == {k: full[k] for k in COMPARED}
    with pytest.raises(ValueError, match=r"rule: checkpoint 'softmax', config 'ratio'"):
        train(config("amss@ratio"), tiny, resume=path)


def test_release_crosses_the_checkpoint_and_older_checkpoints_never_released(tiny, tmp_path):
    """A run whose estimator is released before the checkpoint stays released after resuming (the
    flag and its EMA are in the checkpoint), bit-identical to the whole run. A checkpoint written
    before release existed (no release_at in its config) resumes only with release_at=inf, which is
    what it ran with."""
    path = tmp_path / "c.pt"
    cfg = config("scale@ratio", lr=0.3, release_at=0.0)  # both modalities informative after 3 of 4 epochs
    full = full_run(cfg, tiny)
    assert full[0]["release_epoch"] == 3  # else the test proves nothing: released before the checkpoint
    assert full[0]["history"][3]["rate"] == {"a": 1.0, "b": 1.0}
    interrupt_after(cfg, tiny, path, epoch=3)
    assert load_checkpoint(path)["estimator"]["released"] is True
    assert_same_run(run(cfg, tiny, resume=path), full)
    never = config("scale@ratio", release_at=float("inf"))
    interrupt_after(never, tiny, path)
    state = load_checkpoint(path)
    old = {k: v for k, v in state["config"].items() if k not in ("release_at", "release_beta")}
    torch.save({**state, "config": old}, path)
    with pytest.raises(ValueError, match=r"release_at: checkpoint inf, config None"):
        train(config("scale@ratio"), tiny, resume=path)
    assert_same_run(run(never, tiny, resume=path), full_run(never, tiny))


def test_foreign_corrupt_and_unknown_version_files_are_refused(tiny, tmp_path):
    good = tmp_path / "good.pt"
    train(config("joint", epochs=1), tiny, checkpoint=good)
    data = good.read_bytes()
    cases = {
        "garbage.pt": (b"not a checkpoint at all", r"not a readable masked_optim training checkpoint"),
        "truncated.pt": (data[: len(data) // 2], r"not a readable masked_optim training checkpoint"),
    }
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=pattern):
            train(config("joint"), tiny, resume=tmp_path / name)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"not a masked_optim training checkpoint \(no format marker"):
        load_checkpoint(tmp_path / "foreign.pt")
    state = load_checkpoint(good)
    torch.save({**state, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"format version 99; allowed: 1"):
        resume_training(tmp_path / "future.pt", tiny)
    torch.save({k: v for k, v in state.items() if k != "rng"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"incomplete, missing \['rng'\]"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError):
        train(config("joint"), tiny, resume=tmp_path / "missing.pt")


def test_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tiny, tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="No space left"):
        train(config("amss"), tiny, checkpoint=path)
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_invalid_checkpoint_options(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"Invalid checkpoint_every: 0; allowed: an int >= 1"):
        train(config("joint"), tiny, checkpoint=tmp_path / "c.pt", checkpoint_every=0)
    with pytest.raises(ValueError, match=r"Invalid checkpoint: .*an existing directory"):
        train(config("joint"), tiny, checkpoint=tmp_path / "no" / "c.pt")
    with pytest.raises(ValueError, match=r"is a directory"):
        train(config("joint"), tiny, checkpoint=tmp_path)
    with pytest.raises(TypeError, match=r"Invalid resume: 3"):
        train(config("joint"), tiny, resume=3)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_resume_with_the_probe_signal_is_bit_identical(tiny, tmp_path, fusion):
    """The online probes (their weights, their optimizer's momentum, the best epoch's copy) cross the
    checkpoint: an interrupted run resumed gives the uninterrupted one's result, model and optimizer
    state. ``probe_lr`` is not the default, so a probe state rebuilt from defaults would differ."""
    cfg = config("scale", fusion=fusion, signal="probes", probe_lr=0.05)
    path = tmp_path / "run.pt"
    interrupt_after(cfg, tiny, path)
    assert load_checkpoint(path)["probes"] is not None
    torch.manual_seed(12345)
    resumed = run(cfg, tiny, resume=path, checkpoint=path)
    assert_same_run(resumed, full_run(cfg, tiny))
    assert resumed[0]["config"]["probe_lr"] == 0.05
