"""With masking off (mask="none", or any mask at rate 1.0) the optimizer is torch.optim.SGD, bit for bit."""

import copy

import pytest
import torch

from masked_optim import MaskedMultiModalSGD

# (momentum, dampening, nesterov): every valid combination of momentum {0, 0.9} x dampening {0, 0.1}.
MOMENTUM = [(0.0, 0.0, False), (0.0, 0.1, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.1, False)]
MOMENTUM_IDS = ["sgd", "damp", "mom", "nesterov", "mom-damp"]
STEPS = 20


def make_params(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = {"audio": [(6, 4), (6,)], "video": [(3, 2, 5), (0, 4)], "head": [(5, 3), ()]}
    params = {k: [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in v] for k, v in shapes.items()}
    unused = torch.randn(4, generator=gen, dtype=dtype).requires_grad_()  # its grad stays None
    return params, unused


def loss_fn(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    total = 0
    for p in params:
        x = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        total = total + (p * x).sum().tanh() + 0.5 * (p.square() * x.abs()).sum()
    return total


def groups_of(params, unused, **extra):
    return [
        {"params": params["audio"], "modality": "audio", **extra},
        {"params": params["video"] + [unused], "modality": "video", **extra},
        {"params": params["head"], "modality": None},
    ]


def run(opt, flat, steps, scheduler=None):
    for step in range(steps):
        if step % 2:  # alternate closure and explicit backward

            def closure():
                opt.zero_grad()
                loss = loss_fn(flat, step)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert loss is not None
        else:
            opt.zero_grad()
            loss_fn(flat, step).backward()
            assert opt.step() is None
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["wd0", "wd"])
@pytest.mark.parametrize("momentum,dampening,nesterov", MOMENTUM, ids=MOMENTUM_IDS)
@pytest.mark.parametrize(
    "mask,granularity", [("none", "element"), ("uniform", "element"), ("amss", "channel"), ("amss+", "element")]
)
def test_matches_torch_sgd(mask, granularity, momentum, dampening, nesterov, weight_decay, maximize, dtype):
    params, unused = make_params(dtype)
    ref_params = copy.deepcopy(params)
    ref_unused = copy.deepcopy(unused)
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    opt = MaskedMultiModalSGD(groups_of(params, unused), mask=mask, granularity=granularity, **kw)
    ref_groups = [{"params": ref_params["audio"]}, {"params": ref_params["video"] + [ref_unused]}, {"params": ref_params["head"]}]
    ref = torch.optim.SGD(ref_groups, **kw)
    flat = [p for v in params.values() for p in v]
    ref_flat = [p for v in ref_params.values() for p in v]
    run(opt, flat, STEPS)
    run(ref, ref_flat, STEPS)
    for p, r in zip(flat + [unused], ref_flat + [ref_unused]):
        assert torch.equal(p, r), f"max diff {(p - r).abs().max()}"
        if momentum and p is not unused:
            assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"])
    assert unused.grad is None and "step" not in opt.state[unused]
    stats = opt.last_step_stats()
    if mask != "none":
        assert stats["audio"].kept_fraction == 1.0 and stats["audio"].rate == 1.0


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
], ids=["step", "onecycle", "cosine"])
def test_lr_schedulers_match_torch_sgd(make_scheduler):
    params, unused = make_params(torch.float32)
    ref_params = copy.deepcopy(params)
    opt = MaskedMultiModalSGD(groups_of(params, unused), lr=0.05, momentum=0.9, mask="amss+")
    ref = torch.optim.SGD([p for v in ref_params.values() for p in v], lr=0.05, momentum=0.9)
    flat = [p for v in params.values() for p in v]
    ref_flat = [p for v in ref_params.values() for p in v]
    sched, ref_sched = make_scheduler(opt), make_scheduler(ref)
    run(opt, flat, STEPS, sched)
    run(ref, ref_flat, STEPS, ref_sched)
    assert [g["lr"] for g in opt.param_groups][0] == ref.param_groups[0]["lr"]
    for p, r in zip(flat, ref_flat):
        assert torch.equal(p, r)
    # schedulers round-trip through the optimizer's state_dict
    assert sched.state_dict()["last_epoch"] == STEPS
