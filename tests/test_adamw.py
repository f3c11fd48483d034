"""MaskedMultiModalAdamW (docs/algorithm.md §2.8): torch.optim.AdamW with masking off, AdamW with
``lr * rho`` for ``mask="scale"``, and the lazy masked step's properties (untouched units, the SGD
step's masks, the expected update of ``amss+`` and ``uniform``), resume, checkpoints and errors."""

import copy
import math

import pytest
import torch

from masked_optim import MaskedMultiModalAdamW, MaskedMultiModalSGD, masked_adamw, modality_param_groups
from masked_optim.backends import BackendUnavailable, backend_status
from masked_optim.functional import inclusion_probability, inclusion_scalars, unit_scores
from masked_optim.rng import derive_key
from tolerances import TOLERANCES, assert_close_normwise

CPU = torch.device("cpu")


def _backends():
    return [
        pytest.param(n, marks=pytest.mark.skipif(backend_status(n, CPU, "adamw") is not None, reason=f"{n} has no adamw kernel here"))
        for n in ("reference", "cpp", "triton")
    ]


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    enc = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 5), "b": torch.nn.Linear(4, 5)}).to(dtype)
    head = torch.nn.Linear(10, 3).to(dtype)
    return enc, head


def _loss(enc, head, step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    xa, xb = torch.randn(8, 6, generator=g, dtype=dtype), torch.randn(8, 4, generator=g, dtype=dtype)
    z = torch.cat([torch.tanh(enc["a"](xa)), torch.tanh(enc["b"](xb))], dim=1)
    return head(z).square().mean()


def _params(enc, head):
    return [*enc["a"].parameters(), *enc["b"].parameters(), *head.parameters()]


# ----------------------------------------------------------------------------- masking off: AdamW exactly
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("how", ["mask-none", "rate-1", "plain-params"])
@pytest.mark.parametrize("foreach", [None, False, True])
def test_masking_off_is_torch_adamw_bit_for_bit(dtype, amsgrad, maximize, how, foreach):
    """With a scheduler, a closure, weight decay, a zero-size parameter and one whose grad is None;
    against torch's for-loop step whatever ``foreach`` says (None: the multi-tensor step)."""
    enc, head = _model(dtype)
    enc2, head2 = copy.deepcopy(enc), copy.deepcopy(head)
    empty, empty2 = torch.nn.Parameter(torch.zeros(0, 3, dtype=dtype)), torch.nn.Parameter(torch.zeros(0, 3, dtype=dtype))
    unused, unused2 = torch.nn.Parameter(torch.ones(4, dtype=dtype)), torch.nn.Parameter(torch.ones(4, dtype=dtype))
    kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=amsgrad, maximize=maximize)
    if how == "plain-params":
        groups = _params(enc, head) + [empty, unused]
    else:
        groups = modality_param_groups({"a": enc["a"], "b": enc["b"]}, shared=[*head.parameters(), empty, unused])
    opt = MaskedMultiModalAdamW(groups, mask="none" if how == "mask-none" else "amss+", foreach=foreach, **kw)
    ref = torch.optim.AdamW(_params(enc2, head2) + [empty2, unused2], foreach=False, **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for step in range(6):
        for e, h, o, em in ((enc, head, opt, empty), (enc2, head2, ref, empty2)):
            def closure(e=e, h=h, o=o, em=em):
                o.zero_grad()
                loss = _loss(e, h, step, dtype) + em.sum()
                loss.backward()
                return loss
            assert o.step(closure) is not None
        for s in scheds:
            s.step()
    for p, q in zip(_params(enc, head) + [empty, unused], _params(enc2, head2) + [empty2, unused2]):
        assert torch.equal(p, q)
    for p, q in zip(_params(enc, head), _params(enc2, head2)):
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert unused not in opt.state or not opt.state[unused]


# ----------------------------------------------------------------------------- scale: AdamW with lr * rho
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("impl", ["for-loop", "fused"])
def test_scale_is_adamw_with_lr_times_rate(dtype, amsgrad, impl):
    """Each modality's whole step, Adam update and decoupled weight decay, times its rate; the rates
    change between steps (set_rates and step(rates=)); with fused=True, against torch's fused AdamW."""
    enc, head = _model(dtype)
    enc2, head2 = copy.deepcopy(enc), copy.deepcopy(head)
    kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    flags = dict(fused=True) if impl == "fused" else dict(foreach=False)
    lr = 0.02
    opt = MaskedMultiModalAdamW(modality_param_groups({"a": enc["a"], "b": enc["b"]}, shared=head), lr=lr, mask="scale",
                                **kw, **(flags if impl == "fused" else {}))
    ref = torch.optim.AdamW([{"params": enc2["a"].parameters()}, {"params": enc2["b"].parameters()},
                             {"params": head2.parameters()}], lr=lr, **flags, **kw)
    for step, (ra, rb) in enumerate([(0.5, 0.25), (0.3, 1.0), (0.9, 0.6), (0.1, 0.7)]):
        for e, h, o in ((enc, head, opt), (enc2, head2, ref)):
            o.zero_grad()
            _loss(e, h, step, dtype).backward()
        ref.param_groups[0]["lr"], ref.param_groups[1]["lr"] = lr * ra, lr * rb
        if step % 2:
            opt.set_rates({"a": ra, "b": rb})
            opt.step()
        else:
            opt.step(rates={"a": ra, "b": rb})
        ref.step()
        stats = opt.last_step_stats()
        assert stats["a"].rate == ra and stats["a"].kept_fraction == 1.0
    for p, q in zip(_params(enc, head), _params(enc2, head2)):
        assert torch.equal(p, q)


def test_scale_is_not_a_gradient_scale():
    """The trap the class exists for: AdamW on rate * g moves a parameter almost as far as on g
    (the RMS normalisation cancels the rate), while mask='scale' moves it rate times as far."""
    p0 = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    g = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    moved = {}
    for name, rate in (("dense", 1.0), ("scale", 0.25)):
        p = torch.nn.Parameter(p0.clone())
        opt = MaskedMultiModalAdamW([{"params": [p], "modality": "a"}], lr=0.01, weight_decay=0.0, mask="scale")
        p.grad = g.clone()
        opt.step(rates={"a": rate})
        moved[name] = (p.detach() - p0).abs().mean().item()
    q = torch.nn.Parameter(p0.clone())
    adam = torch.optim.AdamW([q], lr=0.01, weight_decay=0.0)
    q.grad = 0.25 * g
    adam.step()
    assert math.isclose(moved["scale"] / moved["dense"], 0.25, rel_tol=1e-5)
    assert (q.detach() - p0).abs().mean().item() / moved["dense"] > 0.99  # gradient scaling: a no-op


# ----------------------------------------------------------------------------- the lazy masked step
def _state(n=3000, seed=0, steps=3, amsgrad=False, dtype=torch.float32):
    """A tensor with non-trivial AdamW state (a few dense steps) and its next gradient."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen, dtype=dtype)
    m, v = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    vmax = torch.zeros(n, dtype=dtype) if amsgrad else None
    step = torch.tensor(0.0)

    def grad():
        return torch.randn(n, generator=gen, dtype=dtype) * torch.exp(torch.randn(n, generator=gen, dtype=dtype))

    for _ in range(steps):
        masked_adamw([p], [grad()], [m], [v], [vmax], [step], [0], lr=0.01, weight_decay=0.1, amsgrad=amsgrad, mask="none")
    return p, grad(), m, v, vmax, step


def _clone(*ts):
    return [None if t is None else t.clone() for t in ts]


HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+"])
@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_unkept_units_are_untouched_and_kept_units_take_the_adamw_step(mask, granularity, amsgrad):
    p, g, m, v, vmax, step = _state(amsgrad=amsgrad)
    shape = (60, 50)
    p, g, m, v = (t.view(shape) for t in (p, g, m, v))
    vmax = None if vmax is None else vmax.view(shape)
    dense = _clone(p, m, v, vmax, step)
    masked_adamw([dense[0]], [g], [dense[1]], [dense[2]], [dense[3]], [dense[4]], [0], amsgrad=amsgrad, mask="none", **HYPER)
    out = _clone(p, m, v, vmax, step)
    [kept] = masked_adamw([out[0]], [g], [out[1]], [out[2]], [out[3]], [out[4]], [derive_key(5, 3, 0)], amsgrad=amsgrad,
                          mask=mask, rate=0.4, granularity=granularity, **HYPER)
    assert out[4].item() == step.item() + 1  # the tensor's step counts every step
    moved = out[1] != m  # a kept unit's first moment always moves here (g != m)
    if granularity == "channel":
        assert (moved.all(1) | (~moved).all(1)).all()  # one decision per slice
    assert int(kept) == int(moved.any(1).sum() if granularity == "channel" else moved.sum())
    assert 0 < int(moved.sum()) < moved.numel()
    for before, after in zip((p, m, v) + ((vmax,) if amsgrad else ()), out[:4]):
        assert torch.equal(after[~moved], before[~moved])  # untouched, bit for bit
    for i in (1, 2) + ((3,) if amsgrad else ()):  # kept moments: exactly AdamW's
        assert_close_normwise(out[i][moved], dense[i][moved])
    delta, dense_delta = out[0] - p, dense[0] - p
    if mask == "amss+":  # kept units move 1/q times AdamW's step, q from the mask's own scalars
        scores = unit_scores(g, granularity)
        q = inclusion_probability(scores, *inclusion_scalars(scores, 0.4, 0.5))
        weight = q.view(-1, 1).expand(shape) if granularity == "channel" else q.view(shape)
        dense_delta = dense_delta / weight
    assert_close_normwise(delta[moved], dense_delta[moved])


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+"])
def test_masks_are_the_sgd_steps_masks(mask, granularity):
    """For the same seed, step and tensor, the AdamW step updates exactly the units the SGD step keeps."""
    torch.manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(500))]
    grads = [torch.randn_like(p) for p in ps]
    moved = {}
    for cls, kw in ((MaskedMultiModalSGD, dict(lr=0.1)), (MaskedMultiModalAdamW, dict(lr=0.1, weight_decay=0.0))):
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt = cls([{"params": qs, "modality": "a"}], mask=mask, granularity=granularity, seed=11, backend="reference", **kw)
        for step in range(3):
            for q, g in zip(qs, grads):
                q.grad = g * (step + 1)
            before = [q.detach().clone() for q in qs]
            opt.step(rates={"a": 0.35})
            moved.setdefault(cls.__name__, []).append([q.detach() != b for q, b in zip(qs, before)])
    for sgd, adam in zip(moved["MaskedMultiModalSGD"], moved["MaskedMultiModalAdamW"]):
        for a, b in zip(sgd, adam):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mask,expected_factor", [("amss+", None), ("uniform", 0.4)])
def test_expected_update_given_the_state(mask, expected_factor):
    """E[dp | state] over the mask's draws: AdamW's step for amss+ (w = 1/q), rate times it for
    biased uniform (q = rate). 600 draws (keys), fixed; in float64 (rounding negligible), every
    element's mean is within 5 standard errors of the expectation (CLT; the standard error is
    estimated from the same draws, plus 1e-12 relative for elements that are always kept). With
    3000 elements the chance of a false alarm is about 3000 * 5.7e-7 = 2e-3."""
    p, g, m, v, vmax, step = _state(n=3000, seed=1, dtype=torch.float64)
    dense = _clone(p, m, v, vmax, step)
    masked_adamw([dense[0]], [g], [dense[1]], [dense[2]], [None], [dense[4]], [0], mask="none", **HYPER)
    target = dense[0] - p
    if expected_factor is not None:
        target = target * expected_factor
    draws = 600
    deltas = torch.empty(draws, p.numel(), dtype=torch.float64)
    for k in range(draws):
        out = _clone(p, m, v, None, step)
        masked_adamw([out[0]], [g], [out[1]], [out[2]], [None], [out[4]], [derive_key(9, k, 0)], mask=mask, rate=0.4, **HYPER)
        deltas[k] = (out[0] - p).double()
    mean, se = deltas.mean(0), deltas.std(0) / math.sqrt(draws)
    z = (mean - target).abs() / (se + 1e-12 * target.abs())
    assert z.max().item() < 5.0, z.max().item()
    # And the test can fail: amss (biased, w = 1) is far from AdamW's expected step.
    if mask == "amss+":
        biased = torch.empty(50, p.numel(), dtype=torch.float64)
        for k in range(50):
            out = _clone(p, m, v, None, step)
            masked_adamw([out[0]], [g], [out[1]], [out[2]], [None], [out[4]], [derive_key(9, k, 0)], mask="amss", rate=0.4, **HYPER)
            biased[k] = (out[0] - p).double()
        zb = (biased.mean(0) - target).abs() / (biased.std(0) / math.sqrt(50) + 1e-12 * target.abs())
        assert zb.max().item() > 5.0


def test_half_precision_lazy_step_runs_in_float32():
    """A float16/bfloat16 tensor's lazy step is the float32 step of its values, rounded once."""
    p, g, m, v, _, step = _state(n=2000, seed=2)
    for dtype in (torch.float16, torch.bfloat16):
        half = [t.to(dtype) for t in (p, g, m, v)]
        ref = [t.float() for t in half]
        s_half, s_ref = step.clone(), step.clone()
        masked_adamw([half[0]], [half[1]], [half[2]], [half[3]], [None], [s_half], [7], mask="amss+", rate=0.5, **HYPER)
        masked_adamw([ref[0]], [ref[1]], [ref[2]], [ref[3]], [None], [s_ref], [7], mask="amss+", rate=0.5, **HYPER)
        for h, r in zip(half[:1] + half[2:], ref[:1] + ref[2:]):
            assert h.dtype == dtype and torch.equal(h, r.to(dtype))
        assert not torch.equal(half[0], p.to(dtype))


# ----------------------------------------------------------------------------- the optimizer
def _train(opt_factory, steps, enc=None, head=None, start=0, opt=None):
    enc, head = (enc, head) if enc is not None else _model()
    opt = opt or opt_factory(enc, head)
    for step in range(start, start + steps):
        opt.zero_grad()
        _loss(enc, head, step, torch.float32).backward()
        opt.step(rates={"a": 0.5, "b": 0.8})
    return enc, head, opt


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mask", ["amss+", "amss", "uniform", "scale"])
def test_resume_is_bit_identical(backend, mask):
    def factory(enc, head):
        return MaskedMultiModalAdamW(modality_param_groups({"a": enc["a"], "b": enc["b"]}, shared=head), lr=0.01,
                                     mask=mask, seed=4, backend=backend, amsgrad=True)

    full = _train(factory, 8)
    enc, head, opt = _train(factory, 4)
    saved = copy.deepcopy(opt.state_dict())
    enc2, head2 = copy.deepcopy(enc), copy.deepcopy(head)
    opt2 = factory(enc2, head2)
    opt2.load_state_dict(saved)
    _train(factory, 4, enc2, head2, start=4, opt=opt2)
    for p, q in zip(_params(full[0], full[1]), _params(enc2, head2)):
        assert torch.equal(p, q)
    if mask != "scale":  # and the masks mattered: another seed ends elsewhere (scale draws nothing)
        other = _train(lambda e, h: MaskedMultiModalAdamW(modality_param_groups({"a": e["a"], "b": e["b"]}, shared=h),
                                                          lr=0.01, mask=mask, seed=5, backend=backend, amsgrad=True), 8)
        assert not all(torch.equal(p, q) for p, q in zip(_params(full[0], full[1]), _params(*other[:2])))


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] != "reference"])
@pytest.mark.parametrize("mask", ["amss+", "amss", "uniform"])
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_fused_backend_matches_the_reference(backend, mask, granularity):
    results = {}
    for name in ("reference", backend):
        enc, head, opt = _train(lambda e, h: MaskedMultiModalAdamW(
            modality_param_groups({"a": e["a"], "b": e["b"]}, shared=h), lr=0.01, mask=mask, granularity=granularity,
            seed=2, backend=name, weight_decay=0.05), 6)
        results[name] = (_params(enc, head), opt.last_step_stats())
    (ref, ref_stats), (out, out_stats) = results["reference"], results[backend]
    assert out_stats["a"].kept_units == ref_stats["a"].kept_units and out_stats["a"].backend == backend
    for p, q in zip(out, ref):
        assert_close_normwise(p, q)


def test_checkpoints_move_between_torch_adamw_and_masked_adamw():
    enc, head = _model()
    torch_opt = torch.optim.AdamW([{"params": enc["a"].parameters()}, {"params": enc["b"].parameters()},
                                   {"params": head.parameters()}], lr=0.01, amsgrad=True)
    _train(None, 3, enc, head, opt=_NoRates(torch_opt))
    opt = MaskedMultiModalAdamW(modality_param_groups({"a": enc["a"], "b": enc["b"]}, shared=head), lr=0.5, amsgrad=True)
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["modality"] == "a"
    back = torch.optim.AdamW([{"params": enc["a"].parameters()}, {"params": enc["b"].parameters()},
                              {"params": head.parameters()}], lr=0.3, amsgrad=True)
    back.load_state_dict(opt.state_dict())
    for p in _params(enc, head):
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(back.state[p][key], torch_opt.state[p][key])


class _NoRates:
    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self, rates=None):
        self.opt.step()


def test_deepcopy_and_state_dict_round_trip():
    enc, head, opt = _train(lambda e, h: MaskedMultiModalAdamW(
        modality_param_groups({"a": e["a"], "b": e["b"]}, shared=h), lr=0.01, mask="amss+"), 2)
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert clone.get_rates() == opt.get_rates()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-1.0), ValueError, r"Invalid lr: -1\.0; allowed: a number >= 0"),
    (dict(eps=-1e-8), ValueError, r"Invalid eps: -1e-08; allowed: a number >= 0"),
    (dict(betas=(0.9,)), TypeError, r"Invalid betas: \(0\.9,\); allowed: a pair"),
    (dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1\.0; allowed: a number in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1: -0\.1; allowed: a number in \[0, 1\)"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1; allowed: a number >= 0"),
    (dict(amsgrad=1), TypeError, r"Invalid amsgrad: 1; allowed: True or False"),
    (dict(foreach="yes"), TypeError, r"Invalid foreach: 'yes'; allowed: None, True or False"),
    (dict(foreach=True, fused=True), ValueError, r"Invalid foreach=True with fused=True"),
    (dict(mask="amss++"), ValueError, r"Invalid mask: 'amss\+\+'; allowed: one of"),
    (dict(mask="scale", unbiased=True), ValueError, r"Invalid unbiased=True with mask='scale'"),
    (dict(nonfinite="zero"), ValueError, r"Invalid nonfinite: 'zero'"),
    (dict(backend="cuda"), BackendUnavailable, r"backend='cuda' is unavailable: the cuda backend runs on CUDA tensors"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MaskedMultiModalAdamW([{"params": [torch.nn.Parameter(torch.ones(3))], "modality": "a"}], **kwargs)


def test_bad_checkpoints_are_refused_and_change_nothing():
    enc, head, opt = _train(lambda e, h: MaskedMultiModalAdamW(
        modality_param_groups({"a": e["a"], "b": e["b"]}, shared=h), lr=0.01), 1)
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 \(param group 0\) is \(2,\); allowed: a tensor of the parameter's shape \(5, 6\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["state"][0]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match=r"step of parameter 0 \(param group 0\) is tensor\(-1\.\); allowed: a number >= 0"):
        opt.load_state_dict(bad)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], good["state"][0]["exp_avg"])


def test_nonfinite_gradient_raises_and_updates_nothing():
    p = torch.nn.Parameter(torch.ones(4))
    opt = MaskedMultiModalAdamW([{"params": [p], "modality": "a"}], lr=0.1, mask="amss+")
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    with pytest.raises(FloatingPointError, match="Non-finite gradient"):
        opt.step(rates={"a": 0.5})
    assert torch.equal(p.detach(), torch.ones(4))
    assert opt.state[p]["step"].item() == 0 and not opt.state[p]["exp_avg"].any()  # initialised, not stepped
