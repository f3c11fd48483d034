"""DiagnoseRelearn against docs/algorithm.md §5: purity, alpha, the exact interpolation, what it touches, the schedule."""

import math

import pytest
import torch
from torch import nn

from masked_optim import MaskedMultiModalSGD, modality_param_groups
from masked_optim.experiments import DiagnoseRelearn


def encoders():
    torch.manual_seed(0)
    return {
        "a": nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()),
        "b": nn.Sequential(nn.Linear(3, 8), nn.ReLU()),
    }


def perturb(encs):
    with torch.no_grad():
        for enc in encs.values():
            for p in enc.parameters():
                p.add_(torch.randn_like(p))
            for b in enc.buffers():
                if b.is_floating_point():
                    b.add_(1.5)


def test_purity_and_alpha_on_a_hand_computed_example():
    # Two well-separated groups per split. Train: features separate the two classes perfectly
    # (purity 1). Validation: the groups mix the classes 3:1 (purity 6/8).
    far = torch.tensor([[0.0], [0.1], [0.05], [0.02], [10.0], [10.1], [10.05], [10.02]])
    y_train = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    y_val = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    dr = DiagnoseRelearn(encoders(), lam=3.0)
    d = dr.diagnose(({"a": far, "b": far}, y_train), ({"a": far, "b": far}, y_val))  # features given directly
    assert d.train_purity == {"a": 1.0, "b": 1.0}
    assert d.val_purity == {"a": 0.75, "b": 0.75}
    assert d.alpha["a"] == math.tanh(3.0 * 0.25)
    assert not d.applied and dr.fired == 0  # diagnosing changes nothing


def test_diagnose_from_loaders_equals_diagnose_from_extracted_features():
    encs = encoders()
    dr = DiagnoseRelearn(encs)
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(30, 4, generator=g), "b": torch.randn(30, 3, generator=g)}
    y = torch.arange(30) % 3
    loader = [({m: v[:16] for m, v in x.items()}, y[:16]), ({m: v[16:] for m, v in x.items()}, y[16:])]
    assert dr.diagnose(loader, loader) == dr.diagnose(dr.extract(loader), dr.extract(loader))


def test_relearn_interpolates_exactly_and_touches_only_the_given_encoders():
    encs = encoders()
    dr = DiagnoseRelearn(encs)
    init = {m: [p.detach().clone() for p in e.parameters()] for m, e in encs.items()}
    perturb(encs)
    before = {m: [p.detach().clone() for p in e.parameters()] for m, e in encs.items()}
    buffers_before = [b.clone() for b in encs["a"].buffers()]
    dr.relearn({"a": 0.3})
    for p, p0, p1 in zip(encs["a"].parameters(), init["a"], before["a"]):
        assert torch.equal(p, 0.3 * p0 + (1 - 0.3) * p1)
    for p, p1 in zip(encs["b"].parameters(), before["b"]):
        assert torch.equal(p, p1)
    for b, b1 in zip(encs["a"].buffers(), buffers_before):  # buffers only when asked
        assert torch.equal(b, b1)
    dr.relearn({"b": 1.0})  # alpha 1: back to the snapshot
    for p, p0 in zip(encs["b"].parameters(), init["b"]):
        assert torch.equal(p, p0)


def test_reset_buffers_interpolates_floating_buffers_only():
    encs = encoders()
    bn = encs["a"][1]
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    dr = DiagnoseRelearn(encs, reset_buffers=True)
    perturb(encs)
    bn.num_batches_tracked.fill_(7)
    mean1, var1 = bn.running_mean.clone(), bn.running_var.clone()
    dr.relearn({"a": 0.5})
    assert torch.equal(bn.running_mean, 0.5 * mean0 + 0.5 * mean1)
    assert torch.equal(bn.running_var, 0.5 * var0 + 0.5 * var1)
    assert bn.num_batches_tracked.item() == 7


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_state_is_reset_only_when_asked(reset):
    encs = encoders()
    opt = MaskedMultiModalSGD(modality_param_groups(encs), lr=0.1, momentum=0.9)
    x = {"a": torch.randn(16, 4), "b": torch.randn(16, 3)}
    sum(e(x[m]).sum() for m, e in encs.items()).backward()
    opt.step()
    dr = DiagnoseRelearn(encs, optimizer=opt, reset_optimizer_state=reset)
    dr.relearn({"a": 0.2, "b": 0.0})
    for m, enc in encs.items():
        for p in enc.parameters():
            has_buffer = "momentum_buffer" in opt.state[p]
            assert has_buffer == (not reset or m == "b")  # alpha 0 changes nothing
            assert opt.state[p]["step"] == 1  # the mask key's step counter is kept


def test_schedule_fires_every_n_epochs_at_most_times():
    encs = encoders()
    dr = DiagnoseRelearn(encs, every=3, times=2)
    g = torch.Generator().manual_seed(0)
    batches = [({"a": torch.randn(20, 4, generator=g), "b": torch.randn(20, 3, generator=g)}, torch.arange(20) % 2)]
    fired = [e for e in range(1, 13) if dr.maybe_step(e, batches, batches) is not None]
    assert fired == [3, 6]
    assert [d.epoch for d in dr.history] == [3, 6] and all(d.applied for d in dr.history)
    assert dr.fired == 2


def test_extract_uses_eval_mode_without_grad_and_restores_the_flag():
    encs = encoders()
    for e in encs.values():
        e.train()
    dr = DiagnoseRelearn(encs)
    x = {"a": torch.randn(5, 4), "b": torch.randn(5, 3)}
    mean_before = encs["a"][1].running_mean.clone()
    feats, labels = dr.extract([(x, torch.zeros(5, dtype=torch.long))])
    assert torch.equal(encs["a"][1].running_mean, mean_before)  # eval mode: BN statistics untouched
    assert not feats["a"].requires_grad and feats["a"].shape == (5, 8)
    assert all(e.training for e in encs.values())


def test_state_dict_round_trip():
    encs = encoders()
    dr = DiagnoseRelearn(encs, every=1)
    batches = [({"a": torch.randn(12, 4), "b": torch.randn(12, 3)}, torch.arange(12) % 3)]
    dr.maybe_step(1, batches, batches)
    other = DiagnoseRelearn(encoders(), every=1)
    other.load_state_dict(dr.state_dict())
    assert other.fired == 1 and other.history[0].alpha == dr.history[0].alpha
    for m in encs:
        for k, v in dr.initial[m].items():
            assert torch.equal(other.initial[m][k], v)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [({"lam": 0}, "Invalid lam: 0"), ({"every": 0}, "Invalid every: 0"), ({"times": -1}, "Invalid times: -1"),
     ({"n_clusters": 1}, "Invalid n_clusters: 1"), ({"reset_optimizer_state": True}, "optimizer=None")],
)
def test_constructor_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DiagnoseRelearn(encoders(), **kwargs)


def test_relearn_validation():
    dr = DiagnoseRelearn(encoders())
    with pytest.raises(ValueError, match=r"Invalid alpha\['a'\]: 1.5"):
        dr.relearn({"a": 1.5})
    with pytest.raises(ValueError, match="modality 'c'"):
        dr.relearn({"c": 0.1})


def _ddp_worker(rank, world, port, feats, labels, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        dr = DiagnoseRelearn(encoders())
        shard = slice(rank, None, world)  # each rank holds every other sample
        d = dr.diagnose_features(({"a": feats[shard], "b": feats[shard]}, labels[shard]),
                                 ({"a": feats[shard], "b": -feats[shard]}, labels[shard]))
        out[rank] = (d.train_purity, d.val_purity, d.alpha)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_gather_features_and_agree():
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    labels = torch.arange(60) % 3
    feats = torch.randn(60, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 5).double()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(2, port, feats, labels, out), nprocs=2, join=True)
    assert out[0] == out[1]  # every rank computes the same alpha
    # ... from all the samples: rank order of the gathered rows is [rank 0 shard; rank 1 shard]
    order = torch.cat([torch.arange(0, 60, 2), torch.arange(1, 60, 2)])
    full = DiagnoseRelearn(encoders()).diagnose_features(
        ({"a": feats[order], "b": feats[order]}, labels[order]), ({"a": feats[order], "b": -feats[order]}, labels[order])
    )
    assert out[0] == (full.train_purity, full.val_purity, full.alpha)
