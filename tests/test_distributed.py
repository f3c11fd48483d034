"""DistributedDataParallel on CPU (gloo, 2 spawned processes): identical masks and rates on every rank.

Each rank trains on its half of every batch; DDP averages the gradients and ``ModalSignificance``
all-reduces its statistics (docs/algorithm.md §3), so every rank must hold bit-identical parameters and see
identical rates at every step, with no communication in the optimizer step (masks are a pure
function of (seed, step, tensor index), docs/algorithm.md §4). The run is also compared with one process
training on the concatenated batches: gradients then differ by float rounding of the reduction
order, so parameters agree within the float32 row of the tolerance table except where a unit whose
uniform lies within rounding of its ``q`` flipped; those are counted and bounded.
"""

import socket

import pytest
import torch
import torch.nn.functional as F

from masked_optim import MaskedMultiModalAdamW, MaskedMultiModalSGD, ModalSignificance, modality_param_groups
from masked_optim.experiments import build_model

STEPS, BATCH, WORLD = 20, 64, 2


def _data():
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(STEPS, BATCH, 10, generator=g), "b": torch.randn(STEPS, BATCH, 6, generator=g)}
    y = torch.randint(4, (STEPS, BATCH), generator=g)
    x["a"] += torch.nn.functional.one_hot(y, 10).float() * 2.0  # modality a is informative
    return x, y


def _train(rank, world, ddp, optimizer="sgd"):
    torch.manual_seed(0)
    model = build_model({"a": (10,), "b": (6,)}, 4)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    groups = modality_param_groups(model.encoders, shared=model.head)
    if optimizer == "sgd":
        opt = MaskedMultiModalSGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-4, mask="amss", seed=7)
    else:
        opt = MaskedMultiModalAdamW(groups, lr=3e-3, weight_decay=1e-2, mask="amss+", seed=7)
    est = ModalSignificance(rule="softmax")  # the paper's rule trains: rates strictly inside (0, 1)
    ratio = ModalSignificance()  # the default ratio rule, on the same statistics (not used to train)
    x, y = _data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    rates = []
    for step in range(STEPS):
        out = net({m: v[step, part] for m, v in x.items()})
        loss = F.cross_entropy(out.logits, y[step, part])
        opt.zero_grad()
        loss.backward()
        r = est({m: o.detach() for m, o in out.modality_logits.items()}, y[step, part],
                {m: z.detach() for m, z in out.features.items()})
        opt.step(rates=r)
        r_ratio = ratio({m: o.detach() for m, o in out.modality_logits.items()}, y[step, part],
                        {m: z.detach() for m, z in out.features.items()})
        rates.append((r, r_ratio, dict(ratio.state_dict()["info_ema"])))  # the release statistic too
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, rates


def _worker(rank, port, out, optimizer):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out[rank] = _train(rank, WORLD, ddp=True, optimizer=optimizer)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ddp_ranks_stay_identical_and_match_one_process(optimizer):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out, optimizer), nprocs=WORLD, join=True)
    (params0, rates0), (params1, rates1) = out[0], out[1]
    assert rates0 == rates1  # every step, every modality: the all-reduced statistics
    for k in params0:
        assert torch.equal(params0[k], params1[k]), k  # replicas bit-identical
    single_params, single_rates = _train(0, 1, ddp=False, optimizer=optimizer)
    for pair_ddp, pair_one in zip(rates0, single_rates):  # softmax and ratio rules, ratio's release EMA
        for r_ddp, r_one in zip(pair_ddp, pair_one):
            for m in r_one:
                assert abs(r_ddp[m] - r_one[m]) < 1e-6
    total = flipped = 0
    for k, p in single_params.items():
        if not p.is_floating_point():
            continue
        close = torch.isclose(params0[k], p, rtol=1e-5, atol=1e-6)  # the float32 row of tests/tolerances.py
        total += p.numel()
        flipped += int((~close).sum())
    # A flipped unit changes its own trajectory (and, through the forward pass, a little of the
    # others'); over 20 steps at most 1 % of the 19,332 values may leave the tolerance (measured
    # here on 2026-11-23: none did). Without the estimator's all-reduce this test fails.
    assert flipped <= 0.01 * total, (flipped, total)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,amp", [("ddp", "fp16"), ("fsdp", "bf16")])
def test_the_readme_distributed_example_runs_and_ranks_agree(parallel, amp):
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distributed.py"
    # A gloo rank now and then dies in C++ with "terminate called without an active exception" and no
    # Python traceback: 1 run in 4 before the barrier before destroy_process_group, and once in about
    # 35 runs since (2026-12-04, the extension-disabled CI pass on a loaded 2-core VM). That abort,
    # and only that, earns one rerun; any other failure, or the same abort twice, fails.
    # A run takes ~7 s. The limit is short so that a hang (a DDP reducer freed after
    # destroy_process_group hung 5 runs in 20 at exit, and a CI run, until the example freed it first)
    # fails in minutes, not at the CI's limit.
    for attempt in range(2):
        run = subprocess.run([sys.executable, str(script), "--parallel", parallel, "--amp", amp, "--epochs", "1"],
                             capture_output=True, text=True, timeout=120)
        if run.returncode == 0 or "terminate called without an active exception" not in run.stderr:
            break
    assert run.returncode == 0, f"attempt {attempt + 1}: stdout {run.stdout[-1000:]!r}\nstderr {run.stderr[-2000:]}"
    lines = sorted(line for line in run.stdout.splitlines() if line.startswith("rank "))
    assert [line[:7] for line in lines] == ["rank 0:", "rank 1:"]
    assert lines[0][7:] == lines[1][7:]  # same accuracy, rates and parameter checksum on both ranks
    accuracy = float(lines[0].split("test accuracy ")[1].split()[0])
    assert accuracy > 0.4  # 4 classes: it learned something in one epoch
