"""mask="scale" in the pure-PyTorch reference (docs/algorithm.md §2.5): g~ = rho_m * g, no sampling, no RNG.

The reference's scale step must be torch.optim.SGD run on gradients pre-multiplied by rho, bit for
bit in float32 and float64, whatever the momentum / dampening / nesterov / weight decay / maximize
options. Every comparison is also checked to be discriminating: SGD on gradients multiplied by a
wrong factor (rho**2, 1/rho, or no factor) must NOT match, so a wrong implementation would fail.
"""

import copy

import pytest
import torch

from masked_optim import MaskedMultiModalSGD
from masked_optim.functional import masked_gradient, masked_sgd
from tolerances import TOLERANCES

RATES = {"audio": 0.3, "video": 0.7}  # not powers of two: g * rho is rounded
# (momentum, dampening, nesterov)
MOMENTUM = [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.1, False)]
MOMENTUM_IDS = ["sgd", "mom", "nesterov", "mom-damp"]
STEPS = 6


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"audio": [(12, 5), (12,)], "video": [(4, 3, 3), ()], None: [(6, 4)]}
    return {m: [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in v]
            for m, v in shapes.items()}


def _grads(params, step):
    gen = torch.Generator().manual_seed(500 + step)
    return {m: [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in ps]
            for m, ps in params.items()}


def _groups(params, **extra):
    return [{"params": ps, "modality": m, **({} if m is None else extra)} for m, ps in params.items()]


def _run_scale(dtype, kw, granularity="element", backend="reference", sampler="poisson", steps=STEPS):
    params = _params(dtype)
    opt = MaskedMultiModalSGD(_groups(params), mask="scale", granularity=granularity, backend=backend,
                              sampler=sampler, **kw)
    opt.set_rates(RATES)
    for step in range(steps):
        for m, gs in _grads(params, step).items():
            for p, g in zip(params[m], gs):
                p.grad = g
        opt.step()
    return params, opt


def _run_sgd(dtype, kw, factor, steps=STEPS):
    """torch.optim.SGD with each modality's gradients multiplied by factor(rho) (shared ones by 1)."""
    params = _params(dtype)
    opt = torch.optim.SGD([{"params": ps} for ps in params.values()], **kw)
    for step in range(steps):
        for m, gs in _grads(params, step).items():
            for p, g in zip(params[m], gs):
                p.grad = g if m is None else g * factor(RATES[m])
        opt.step()
    return params, opt


def _equal(a, b):
    return all(torch.equal(p, q) for m in a for p, q in zip(a[m], b[m]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["wd0", "wd"])
@pytest.mark.parametrize("momentum,dampening,nesterov", MOMENTUM, ids=MOMENTUM_IDS)
def test_reference_scale_is_sgd_on_prescaled_gradients(momentum, dampening, nesterov, weight_decay, maximize, dtype):
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
              maximize=maximize)
    ours, opt = _run_scale(dtype, kw)
    ref, sgd = _run_sgd(dtype, kw, lambda r: r)
    for m in ours:
        for p, q in zip(ours[m], ref[m]):
            assert torch.equal(p, q), f"{m}: max diff {(p - q).abs().max()}"
            if momentum:
                assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])
    # The comparison is discriminating: a wrong factor would have been caught.
    for wrong in (lambda r: r * r, lambda r: 1.0 / r, lambda r: 1.0):
        assert not _equal(ours, _run_sgd(dtype, kw, wrong)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_granularity_and_sampler_do_not_change_scale(dtype):
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    element, _ = _run_scale(dtype, kw, granularity="element")
    channel, _ = _run_scale(dtype, kw, granularity="channel")
    multinomial, opt = _run_scale(dtype, kw, granularity="channel", sampler="multinomial")
    assert _equal(element, channel) and _equal(element, multinomial)
    assert not _equal(element, _run_sgd(dtype, kw, lambda r: 1.0)[0])  # and the step did scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scale_is_computed_in_float32(dtype):
    """Half parameters: the step runs in float32 and is rounded once. From the same start, one step
    is a float32 twin's rounded to the dtype bit for bit (half arithmetic would round g * rho, the
    weight decay term and the sum each on their own), and three steps stay within the table."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    params = _params(dtype)
    wide = {m: [p.detach().float().requires_grad_() for p in ps] for m, ps in params.items()}
    p0 = [p.detach().clone() for p in params["audio"]]
    opts = [MaskedMultiModalSGD(_groups(x), mask="scale", backend="reference", **kw) for x in (params, wide)]
    for o in opts:
        o.set_rates(RATES)
    for step in range(3):
        for m, gs in _grads(params, step).items():
            for p, q, g in zip(params[m], wide[m], gs):
                p.grad, q.grad = g, g.float()
        for o in opts:
            o.step()
        if step == 0:
            for m in params:
                for p, q in zip(params[m], wide[m]):
                    assert torch.equal(p, q.to(dtype)), m
                    assert torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"].to(dtype))
            g, p = params["audio"][0].grad, p0[0]  # in half arithmetic instead: differs
            d = g * RATES["audio"] + p * 1e-2
            assert not torch.equal(params["audio"][0], p - (d + d * 0.9) * 0.05)
    for m in params:
        for p, q in zip(params[m], wide[m]):
            assert p.dtype == dtype and opts[0].state[p]["momentum_buffer"].dtype == dtype
            torch.testing.assert_close(p.float(), q, **TOLERANCES[dtype])


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_masked_gradient_scale_is_rate_times_gradient(dtype, granularity):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(9, 7, generator=gen, dtype=torch.float64).to(dtype)
    rng_before = torch.get_rng_state()
    gm, kept = masked_gradient(g, rate=0.3, key=123, mask="scale", granularity=granularity)
    gm_other_key, _ = masked_gradient(g, rate=0.3, key=456, mask="scale", granularity=granularity, unbiased=True,
                                      sampler="multinomial")
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert gm.dtype == cdtype
    assert torch.equal(gm, g.to(cdtype) * 0.3) and torch.equal(gm_other_key, gm)  # no mask, no key
    assert not torch.equal(gm, g.to(cdtype) * 0.09) and not torch.equal(gm, g.to(cdtype) / 0.3)
    assert isinstance(kept, int) and kept == (9 if granularity == "channel" else 63)
    assert torch.equal(torch.get_rng_state(), rng_before)
    full, n = masked_gradient(g, rate=1.0, key=1, mask="scale", granularity=granularity)
    assert torch.equal(full, g.to(cdtype)) and n == kept


def test_functional_masked_sgd_scale_counts_every_unit():
    p = [torch.zeros(4, 3), torch.zeros(0, 2), torch.zeros(())]
    g = [torch.ones(4, 3), torch.ones(0, 2), torch.ones(())]
    counts = masked_sgd(p, g, [None] * 3, [0] * 3, lr=1.0, mask="scale", rate=0.25, granularity="channel")
    assert counts == [4, 0, 1]
    assert torch.equal(p[0], torch.full((4, 3), -0.25)) and torch.equal(p[2], torch.tensor(-0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_scale_at_rate_one_is_torch_sgd(dtype):
    """rho = 1 takes torch.optim.SGD's own path: bit-identical, kept_fraction 1."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    params = _params(dtype)
    ref = copy.deepcopy(params)
    opt = MaskedMultiModalSGD(_groups(params), mask="scale", **kw)
    sgd = torch.optim.SGD([{"params": ps} for ps in ref.values()], **kw)
    for step in range(3):
        for src in (params, ref):
            for m, gs in _grads(src, step).items():
                for p, g in zip(src[m], gs):
                    p.grad = g
        opt.step()
        sgd.step()
    assert _equal(params, ref)
    s = opt.last_step_stats()
    assert s["audio"].rate == 1.0 and s["audio"].kept_fraction == 1.0
