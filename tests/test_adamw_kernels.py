"""The fused lazy AdamW kernel ``masked_optim::masked_adamw_`` (cpp) against the pure-PyTorch reference
:func:`masked_optim.functional.masked_adamw` (docs/algorithm.md §2.8).

Kernel-level parity, as tests/test_backends.py does for ``masked_sgd_``: each step the kernel is fed
the reference's per-tensor scalars ``[alpha, beta]`` (and, per channel, the reference's unit scores),
so its mask must be bit-identical to the one the reference draws with them; parameters and moments
must agree within the dtype tolerance table over 10 steps. Run again with the scalars it computes
itself, it must keep the same units on these gradients. Its mask is also the SGD kernel's for the
same key. Modes 1..4 only: the dense and scale AdamW steps are ``torch.optim.AdamW``'s own.
"""

import os

import pytest
import torch

from masked_optim.backends import backend_status
from masked_optim.functional import masked_adamw
from masked_optim.modes import Mode
from masked_optim.rng import derive_key
from test_backends import _grad, _reference_scalars  # the SGD kernel tests' gradients and reference scalars
from tolerances import TOLERANCES, assert_close_normwise

CPU = torch.device("cpu")
MODES = [Mode.UNIFORM, Mode.UNIFORM_UNBIASED, Mode.AMSS, Mode.AMSS_PLUS]
SHAPES = [(0,), (1,), (4097,), (278011,), (5, 123, 123), (64, 3, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STEPS = 4  # each step changes the rate (0.3, 0.7, 0.05) and the moments it starts from
BIG = (278011,)  # 3 steps only: the reference's water-filling at this size costs ~1 s a step
LR, BETA1, BETA2, EPS = 1e-2, 0.9, 0.999, 1e-8


def _require_cpp():
    reason = backend_status("cpp", CPU)
    if reason is not None:
        if os.environ.get("MASKED_OPTIM_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the C++ extension is required here but unavailable: {reason}")
        pytest.skip(f"cpp unavailable: {reason}")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("masked_optim::masked_adamw_", "CPU"), (
        "masked_optim._C loaded but registers no CPU kernel for masked_adamw_ (a stale build?)"
    )


def _kernel(p, g, m, v, vmax, scores, scalars, key, rate, mode, channel, *, weight_decay, step, amsgrad, maximize,
            lr=LR, smoothing=0.5, max_iter=4):
    return torch.ops.masked_optim.masked_adamw_(
        p, g, m, v, vmax, scores, scalars, key, rate, smoothing, max_iter, int(mode), channel, lr, BETA1, BETA2, EPS,
        weight_decay, float(step), amsgrad, maximize,
    )


def _grid():
    for mode in MODES:
        for granularity in ("element", "channel"):
            for dtype in DTYPES:
                for shape in SHAPES:
                    if shape == BIG and dtype != torch.float32:  # test_backends runs it in every dtype for the shared mask
                        continue
                    name = f"{mode.name.lower()}-{granularity}-{str(dtype).split('.')[1]}-{'x'.join(map(str, shape))}"
                    yield pytest.param(mode, granularity, dtype, shape, id=name)


@pytest.mark.parametrize("mode,granularity,dtype,shape", list(_grid()))
def test_kernel_matches_reference(mode, granularity, dtype, shape):
    _require_cpp()
    channel = granularity == "channel"
    amsgrad = mode in (Mode.UNIFORM_UNBIASED, Mode.AMSS_PLUS)
    maximize = mode == Mode.AMSS_PLUS
    weight_decay = 0.0 if mode == Mode.AMSS else 1e-2
    gen = torch.Generator().manual_seed(1)
    p_ref = torch.randn(shape, generator=gen).to(dtype)
    m_ref, v_ref = torch.zeros_like(p_ref), torch.zeros_like(p_ref)
    vmax_ref = torch.zeros_like(p_ref) if amsgrad else None
    step_ref = torch.tensor(0.0)
    p_ker, m_ker, v_ker = p_ref.clone(), m_ref.clone(), v_ref.clone()
    vmax_ker = vmax_ref.clone() if amsgrad else torch.empty(0, dtype=dtype)
    hyper = dict(weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    for step in range(3 if shape == BIG else STEPS):
        rate = [0.3, 0.7, 0.05][step % 3]
        key = derive_key(7, step, 3)
        g = _grad(shape, dtype, step)
        scores, scalars = _reference_scalars(g, rate, mode, granularity, maximize)
        before = [t.clone() for t in (p_ker, m_ker, v_ker, vmax_ker)]
        (ref_kept,) = masked_adamw(
            [p_ref], [g], [m_ref], [v_ref], [vmax_ref], [step_ref], [key], lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
            mask=mode.mask, unbiased=mode.unbiased, rate=rate, granularity=granularity, smoothing=0.5, max_iter=4,
            **hyper,
        )
        kept, out_scalars = _kernel(p_ker, g, m_ker, v_ker, vmax_ker, scores if channel else None, scalars, key, rate,
                                    mode, channel, step=step_ref, **hyper)
        assert int(kept) == int(ref_kept), f"step {step}: kept {int(kept)} != reference {int(ref_kept)}"
        for a, b in ((p_ker, p_ref), (m_ker, m_ref), (v_ker, v_ref)) + (((vmax_ker, vmax_ref),) if amsgrad else ()):
            assert_close_normwise(a, b)
        if p_ref.numel() == 0:  # nothing sampled: [alpha, beta] = [0, 1]
            assert torch.equal(out_scalars, torch.tensor([0.0, 1.0], dtype=out_scalars.dtype))
            continue
        assert torch.equal(out_scalars, scalars), "the given [alpha, beta] are the output"
        # The scalars the kernel computes itself (its own stage 1, masked_sgd_'s): the same as the
        # reference's within the table, and the same units kept on these gradients. exp_avg and
        # exp_avg_sq do not depend on the unit weight 1/q, so they show the mask bit for bit.
        own = [t.clone() for t in before]
        own_kept, own_scalars = _kernel(own[0], g, own[1], own[2], own[3], None, None, key, rate, mode, channel,
                                        step=step_ref, **hyper)
        torch.testing.assert_close(own_scalars.to(scalars.dtype), scalars, **TOLERANCES[scalars.dtype])
        assert int(own_kept) == int(kept), f"step {step}: own scalars kept {int(own_kept)} != {int(kept)}"
        assert torch.equal(own[1], m_ker) and torch.equal(own[2], v_ker), f"step {step}: own scalars moved other units"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_mask_is_the_sgd_kernels(mode, granularity, dtype):
    """For the same (grad, rate, key, mode, granularity) masked_adamw_ and masked_sgd_ keep the same
    units (each computing its own stage 1): the units whose exp_avg moved are those whose parameter
    moved under SGD. Gradients bounded away from 0, so that every kept unit moves."""
    _require_cpp()
    channel = granularity == "channel"
    maximize = mode == Mode.AMSS
    for shape, rate, seed in [((4097,), 0.3, 0), ((64, 3, 3, 3), 0.5, 1), ((37, 5), 0.05, 2), ((20000,), 0.9, 3)]:
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = (g.sign() * (0.1 + g.abs())).to(dtype)
        key = derive_key(11, seed, 2)
        p_sgd = torch.zeros(shape, dtype=dtype)
        kept_sgd, scalars_sgd = torch.ops.masked_optim.masked_sgd_(
            p_sgd, g, torch.empty(0, dtype=dtype), None, None, key, rate, 0.5, 4, int(mode), channel, 1.0, 0.0, 0.0,
            0.0, False, maximize, False,
        )
        p, m, v = torch.ones(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        kept, scalars = _kernel(p, g, m, v, torch.empty(0, dtype=dtype), None, None, key, rate, mode, channel,
                                weight_decay=1e-2, step=3, amsgrad=False, maximize=maximize)
        assert int(kept) == int(kept_sgd) and 0 < int(kept) < (shape[0] if channel else g.numel())
        assert torch.equal(scalars, scalars_sgd)
        assert torch.equal(m != 0, p_sgd != 0)
        assert torch.equal(p != 1, p_sgd != 0) and torch.equal(v != 0, p_sgd != 0)
        if maximize:  # -g: the first moment moves against the gradient
            assert torch.equal((m > 0) & (m != 0), (g < 0) & (m != 0))


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_rate_one_is_adamw(amsgrad, granularity):
    """rate 1 samples nothing (the optimizer runs torch's step itself then; the kernel is still
    well-defined): every unit is kept with weight 1, which is torch.optim.AdamW's step."""
    _require_cpp()
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    ref = p.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.1, amsgrad=amsgrad,
                            foreach=False)
    m, v, vmax = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p) if amsgrad else torch.empty(0, dtype=p.dtype)
    for step in range(1, 6):
        g = torch.randn(12, 7, generator=gen, dtype=torch.float64)
        kept, scalars = _kernel(p, g, m, v, vmax, None, None, 5, 1.0, Mode.AMSS_PLUS, granularity == "channel",
                                weight_decay=0.1, step=step, amsgrad=amsgrad, maximize=False)
        ref.grad = g
        opt.step()
        assert int(kept) == (12 if granularity == "channel" else 84)
        assert torch.equal(scalars, torch.tensor([0.0, 1.0], dtype=torch.float64))
    state = opt.state[ref]
    torch.testing.assert_close(p, ref.detach(), **TOLERANCES[torch.float64])
    torch.testing.assert_close(m, state["exp_avg"], **TOLERANCES[torch.float64])
    torch.testing.assert_close(v, state["exp_avg_sq"], **TOLERANCES[torch.float64])
    if amsgrad:
        torch.testing.assert_close(vmax, state["max_exp_avg_sq"], **TOLERANCES[torch.float64])


def test_unkept_units_are_untouched_bit_for_bit():
    """A unit that is not kept keeps its parameter and moments exactly (half types included: no
    round trip through float32 changes them). The kept units are masked_sgd_'s for the same key."""
    _require_cpp()
    for dtype in DTYPES:
        gen = torch.Generator().manual_seed(9)
        state = [torch.randn(5000, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4)]
        state[2] = state[2].abs()
        state[3] = state[2] + 0.5
        before = [t.clone() for t in state]
        g = torch.randn(5000, generator=gen, dtype=torch.float64)
        g = (g.sign() * (0.1 + g.abs())).to(dtype)
        p_sgd = torch.zeros_like(g)
        torch.ops.masked_optim.masked_sgd_(p_sgd, g, torch.empty(0, dtype=dtype), None, None, 77, 0.2, 0.5, 4,
                                           int(Mode.AMSS_PLUS), False, 1.0, 0.0, 0.0, 0.0, False, False, False)
        keep = p_sgd != 0
        kept, _ = _kernel(state[0], g, state[1], state[2], state[3], None, None, 77, 0.2, Mode.AMSS_PLUS, False,
                          weight_decay=0.1, step=4, amsgrad=True, maximize=False, lr=0.1)
        assert 0 < int(keep.sum()) == int(kept) < 5000
        for t, b in zip(state, before):
            assert torch.equal(t[~keep], b[~keep])
        assert (state[0][keep] != before[0][keep]).float().mean() > 0.9  # the kept ones did move


def _args(dtype=torch.float32, shape=(6, 5, 3), *, mode=Mode.AMSS_PLUS, channel=False, rate=0.4, amsgrad=True,
          given=False, maximize=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    param, grad, m = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    v = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    vmax = (v + 0.1) if amsgrad else torch.empty(0, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scalars = scores = None
    if given:  # the caller's [alpha, beta] (and per-channel scores), as an optimizer would pass them
        scalars = torch.tensor([0.3, 0.05], dtype=acc)
        if channel:
            scores = grad.to(acc).reshape(shape[0], -1).square().sum(1)
    return [param, grad, m, v, vmax, scores, scalars, 12345, rate, 0.5, 4, int(mode), channel, 1e-3, 0.9, 0.999, 1e-8,
            1e-2, 3.0, amsgrad, maximize]


def test_kernel_rejects_bad_input():
    _require_cpp()
    op = torch.ops.masked_optim.masked_adamw_

    def call(**changes):
        a = _args()
        names = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "scores", "scalars", "key", "rate",
                 "smoothing", "max_iter", "kernel_mode", "channel", "lr", "beta1", "beta2", "eps", "weight_decay",
                 "step", "amsgrad", "maximize"]
        for k, v in changes.items():
            a[names.index(k)] = v
        return op(*a)

    for mode in (0, 5, -1, 6):
        with pytest.raises(RuntimeError, match=rf"masked_adamw_: mode must be in 1\.\.4 .*got {mode}"):
            call(kernel_mode=mode)
    with pytest.raises(RuntimeError, match=r"masked_adamw_: grad must match param in device, dtype and shape"):
        call(grad=torch.zeros(6, 5, 4))
    with pytest.raises(RuntimeError, match=r"masked_adamw_: grad must match param"):
        call(grad=torch.zeros(6, 5, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"masked_adamw_: exp_avg must be a contiguous tensor like param"):
        call(exp_avg=torch.zeros(6, 5))
    with pytest.raises(RuntimeError, match=r"masked_adamw_: exp_avg_sq must be a contiguous tensor like param"):
        call(exp_avg_sq=torch.zeros(3, 5, 6).transpose(0, 2))
    with pytest.raises(RuntimeError, match=r"masked_adamw_: max_exp_avg_sq must be a contiguous tensor like param when amsgrad"):
        call(max_exp_avg_sq=torch.empty(0))
    for rate in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(RuntimeError, match=r"masked_adamw_: rate must be in \(0, 1\]"):
            call(rate=rate)
    with pytest.raises(RuntimeError, match=r"masked_adamw_: key must be >= 0"):
        call(key=-1)
    with pytest.raises(RuntimeError, match=r"masked_adamw_: step must be >= 1"):
        call(step=0.0)
    with pytest.raises(RuntimeError, match=r"masked_adamw_: beta1 must be in \[0, 1\)"):
        call(beta1=1.0)
    with pytest.raises(RuntimeError, match=r"masked_adamw_: beta2 must be in \[0, 1\)"):
        call(beta2=-0.5)
    with pytest.raises(RuntimeError, match=r"masked_adamw_: scores must be 1-D with 6 units"):
        call(channel=True, scores=torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"masked_adamw_: scalars must hold \[alpha, beta\]"):
        call(scalars=torch.zeros(3))
    # Without amsgrad, max_exp_avg_sq is not read: an empty tensor is fine.
    kept, _ = call(amsgrad=False, max_exp_avg_sq=torch.empty(0))
    assert kept.dtype == torch.int64 and kept.shape == ()


OPCHECK_CASES = [
    pytest.param(mode, channel, dtype, amsgrad, given, maximize,
                 id=f"{mode.name.lower()}-{'channel' if channel else 'element'}-{str(dtype)[6:]}"
                    f"{'-amsgrad' if amsgrad else ''}{'-given' if given else ''}{'-maximize' if maximize else ''}")
    for mode, channel, dtype, amsgrad, given, maximize in [
        (Mode.UNIFORM, False, torch.float32, False, False, False),
        (Mode.UNIFORM_UNBIASED, True, torch.float64, True, False, False),
        (Mode.AMSS, True, torch.float32, False, False, True),
        (Mode.AMSS, False, torch.float64, True, False, False),
        (Mode.AMSS_PLUS, False, torch.float32, True, False, False),
        (Mode.AMSS_PLUS, True, torch.float32, True, True, False),
        (Mode.AMSS_PLUS, False, torch.bfloat16, False, True, True),
        (Mode.AMSS_PLUS, True, torch.float16, True, False, False),
    ]
]


@pytest.mark.parametrize("mode,channel,dtype,amsgrad,given,maximize", OPCHECK_CASES)
def test_opcheck_masked_adamw(mode, channel, dtype, amsgrad, given, maximize):
    """torch.library.opcheck (as tests/test_ops.py for the other ops): schema mutation annotations,
    the fake kernel against the real one, AOTAutograd tracing."""
    _require_cpp()
    args = _args(dtype, mode=mode, channel=channel, amsgrad=amsgrad, given=given, maximize=maximize)
    torch.library.opcheck(torch.ops.masked_optim.masked_adamw_.default, tuple(args))
