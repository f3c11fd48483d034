"""FSDP2 (``fully_shard``) on CPU (gloo, 2 spawned processes): each rank updates its shard with the
unsharded run's masks.

The parameters are DTensors sharded along dim 0, unevenly (7 rows -> 4 + 3, 5 -> 3 + 2). The
optimizer draws each local unit's uniform at its global index (docs/algorithm.md §4) and all-reduces the
per-tensor sums and maxima of the water-filling (docs/algorithm.md §2.3) over the shards, so the gathered
parameters must equal one process training the unsharded model on the concatenated batches within
the float32 row of the tolerance table, except where a unit whose uniform lies within rounding of
its ``q`` flipped (sums are taken in another order); those are counted and bounded. The kept counts
of every step, summed over the shards, are compared with the single process's too.
"""

import socket

import pytest
import torch
import torch.nn.functional as F

from masked_optim import MaskedMultiModalSGD, ModalSignificance, modality_param_groups
from masked_optim.experiments import build_model

STEPS, BATCH, WORLD = 12, 64, 2
CONFIGS = [("amss", "element", 0.9), ("amss+", "channel", 0.0), ("uniform", "element", 0.9)]


def _data():
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(STEPS, BATCH, 10, generator=g), "b": torch.randn(STEPS, BATCH, 6, generator=g)}
    y = torch.randint(4, (STEPS, BATCH), generator=g)
    x["a"] += torch.nn.functional.one_hot(y, 10).float() * 2.0  # modality a is informative
    return x, y


def _train(rank, world, mask, granularity, momentum, fsdp):
    torch.manual_seed(0)
    model = build_model({"a": (10,), "b": (6,)}, 4, hidden=(7,), feature_dim=5)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for module in [*model.encoders.values(), model.head]:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = MaskedMultiModalSGD(modality_param_groups(model.encoders, shared=model.head), lr=0.05, momentum=momentum,
                              weight_decay=1e-4, mask=mask, granularity=granularity, seed=7)
    est = ModalSignificance()
    x, y = _data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    rates, kept = [], []
    for step in range(STEPS):
        out = model({m: v[step, part] for m, v in x.items()})
        loss = F.cross_entropy(out.logits, y[step, part])
        opt.zero_grad()
        loss.backward()
        r = est({m: o.detach() for m, o in out.modality_logits.items()}, y[step, part],
                {m: z.detach() for m, z in out.features.items()})
        opt.step(rates=r)
        stats = opt.last_step_stats()
        counts = torch.tensor([stats[m].kept_units for m in ("a", "b")])
        if fsdp:
            torch.distributed.all_reduce(counts)
        rates.append(r)
        kept.append(counts.tolist())
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}
    return full, rates, kept


def _refusals(world):
    """The messages of what cannot run on shards: explicit kernels, the multinomial sampler, Shard(1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from masked_optim.backends import BackendUnavailable

    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    messages = []
    for options, error in (({"backend": "cpp"}, BackendUnavailable), ({"sampler": "multinomial", "mask": "amss+"}, ValueError)):
        try:
            MaskedMultiModalSGD([{"params": [w], "modality": "a"}], lr=0.1, **options)
        except error as e:
            messages.append(str(e))
    cols = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))
    opt = MaskedMultiModalSGD([{"params": [cols], "modality": "a", "rate": 0.5}], lr=0.1, mask="amss+")
    cols.grad = distribute_tensor(torch.ones(6, 4), mesh, [Shard(1)])
    before = cols.to_local().clone()
    try:
        opt.step()
    except ValueError as e:
        messages.append(str(e))
    messages.append(torch.equal(cols.to_local(), before))
    return messages


def _worker(rank, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        runs = [_train(rank, WORLD, *config, fsdp=True) for config in CONFIGS]
        out[rank] = runs, _refusals(WORLD)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
    return out[0], out[1]


@pytest.mark.slow
@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=["-".join(map(str, c)) for c in CONFIGS])
def test_fsdp_shards_apply_the_unsharded_masks(fsdp_runs, config):
    (params0, rates0, kept0), (params1, rates1, kept1) = fsdp_runs[0][0][config], fsdp_runs[1][0][config]
    assert rates0 == rates1 and kept0 == kept1
    for k in params0:
        assert torch.equal(params0[k], params1[k]), k  # the gathered model is the same on both ranks
    single_params, single_rates, single_kept = _train(0, 1, *CONFIGS[config], fsdp=False)
    for r_fsdp, r_one in zip(rates0, single_rates):
        for m in r_one:
            assert abs(r_fsdp[m] - r_one[m]) < 1e-6
    diff_units = sum(abs(a - b) for ks, ko in zip(kept0, single_kept) for a, b in zip(ks, ko))
    total_units = sum(sum(ko) for ko in single_kept)
    total = flipped = 0
    for k, p in single_params.items():
        close = torch.isclose(params0[k], p, rtol=1e-5, atol=1e-6)  # the float32 row of tests/tolerances.py
        total += p.numel()
        flipped += int((~close).sum())
    # Bounds: at most 1 % of the values outside the float32 tolerance and kept counts within 0.5 %
    # of the single process's (measured here on 2026-12-02: no value and no count differed, for all
    # three configurations). Drawing local indices instead of global ones, or not all-reducing the
    # water-filling sums, moves 75-95 % of the values and 6-77 % of the kept counts.
    assert flipped <= 0.01 * total, (flipped, total)
    assert diff_units <= 0.005 * total_units, (diff_units, total_units, kept0, single_kept)


@pytest.mark.slow
def test_what_cannot_run_on_shards_is_refused_with_the_reason(fsdp_runs):
    for rank in range(WORLD):
        backend, sampler, placement, unchanged = fsdp_runs[rank][1]
        assert "backend 'cpp' cannot update sharded (DTensor, FSDP) parameters" in backend
        assert "sampler='multinomial'" in sampler and "sharded" in sampler
        assert "Invalid placement of parameter 0" in placement and "Shard(dim=1)" in placement
        assert unchanged  # nothing was updated by the refused step
