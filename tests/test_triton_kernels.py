"""Parity of the Triton backend (masked_optim.backends.triton_kernels) with the pure-PyTorch reference.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). The reference side is masked_optim.functional itself:
``unit_scores`` and ``inclusion_scalars`` for [alpha, beta], ``masked_gradient_given_scalars`` (the
masking of ``masked_gradient``, given the scalars the kernel used) for the masked gradient, then
``_single_tensor_masked_sgd``'s torch.optim.SGD update. The tests hold no copy of the rule.
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from masked_optim.backends import triton_kernels as tk  # noqa: E402
from masked_optim.functional import (  # noqa: E402
    _single_tensor_masked_sgd,
    inclusion_scalars,
    masked_gradient,
    masked_gradient_given_scalars,
    unit_scores,
)
from masked_optim.modes import Mode  # noqa: E402
from masked_optim.rng import derive_key  # noqa: E402

from tolerances import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = list(Mode)
SAMPLED = [m for m in Mode if m != Mode.DENSE]  # every mode with a mask name of its own
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"
DEVICE = "cuda" if GPU else "cpu"
BLOCK = 4096
BIG_BLOCK = 32768  # few program instances for the interpreter on the largest tensors

# (momentum, dampening, nesterov, weight_decay, maximize)
SGD_CONFIGS = [
    (0.0, 0.0, False, 0.0, False),
    (0.9, 0.0, False, 1e-2, False),
    (0.9, 0.0, True, 0.0, True),
    (0.5, 0.1, False, 1e-2, True),
]


def _cdtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _n_units(shape, channel):
    return shape[0] if channel and len(shape) > 0 else math.prod(shape)


def _grad(shape, dtype, kind="randn"):
    g = torch.randn(shape, dtype=torch.float64)
    if kind == "heavy":  # a few dominant units: many saturate, water-filling takes several rounds
        g = g * torch.where(torch.rand(shape, dtype=torch.float64) < 0.02, 100.0, 1.0)
    elif kind == "zeros":
        g = torch.zeros(shape, dtype=torch.float64)
    return g.to(dtype).to(DEVICE)


def ref_scalars(grad, channel, rate, smoothing=0.5, max_iter=4, maximize=False):
    g = grad.to(_cdtype(grad.dtype))
    scores = unit_scores(-g if maximize else g, "channel" if channel else "element")
    alpha, beta = inclusion_scalars(scores, rate, smoothing, max_iter)
    return torch.stack([alpha, beta]), scores


def ref_masked_grad(grad, key, mode, channel, rate, scalars, scores=None, maximize=False):
    """The reference's masked gradient g~ (compute dtype) and kept count, given [alpha, beta]."""
    mode = Mode(mode)
    g = grad.to(_cdtype(grad.dtype))
    masked, kept = masked_gradient_given_scalars(
        -g if maximize else g, rate=rate, key=key, mask=mode.mask, granularity="channel" if channel else "element",
        scalars=scalars, scores=scores, unbiased=mode.unbiased,
    )
    return masked, int(kept)


def ref_update(param, masked_grad, buf_list, lr, momentum, dampening, weight_decay, nesterov):
    """torch.optim.SGD's update on the (already negated for maximize) masked gradient."""
    _single_tensor_masked_sgd(
        [param], [masked_grad], buf_list, [0],
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=False, mask="none", rate=1.0, granularity="element", smoothing=0.5, sampler="poisson",
        unbiased=None, max_iter=4,
    )


def run_kernel(param, grad, buf, *, key, mode, channel, rate=0.3, scalars=None, scores=None, smoothing=0.5,
               max_iter=4, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
               maximize=False, first_step=True, block=BLOCK):
    return tk.masked_sgd_triton_(
        param, grad, buf, scores, scalars, key, rate, smoothing, max_iter, mode, channel, lr, momentum,
        dampening, weight_decay, nesterov, maximize, first_step, block=block,
    )


def _block(t):
    """The interpreter pays ~10 ms per program instance: big tensors get big blocks (still several
    programs, with a partial last one)."""
    return BLOCK if t.numel() <= 2 * BLOCK else BIG_BLOCK


def _empty_buf(param):
    return torch.empty(0, dtype=param.dtype, device=param.device)


# ------------------------------------------------------------------------------ the module itself
def test_triton_available_and_runtime_scalars_are_not_constexpr():
    ok, why = tk.triton_available()
    assert ok and why is None and tk.TRITON_IMPORT_ERROR is None
    fn = getattr(tk._masked_sgd_kernel, "fn", tk._masked_sgd_kernel)
    params = inspect.signature(fn).parameters
    for name in ("lr", "momentum", "one_minus_dampening", "weight_decay", "grad_scale", "key", "numel", "inner",
                 "scalars_ptr"):
        assert "constexpr" not in str(params[name].annotation), name


def test_reference_helper_equals_masked_gradient():
    """masked_gradient_given_scalars, fed inclusion_scalars' output, is masked_gradient bit for bit."""
    for channel in (False, True):
        gran = "channel" if channel else "element"
        for dtype in DTYPES:
            grad = _grad((7, 33, 5), dtype)
            key = derive_key(3, 1, 2)
            for mode in SAMPLED:
                scalars, scores = ref_scalars(grad, channel, 0.3)
                mine, kept = ref_masked_grad(grad, key, mode, channel, 0.3, scalars, scores)
                theirs, kept_ref = masked_gradient(
                    grad, rate=0.3, key=key, mask=mode.mask, granularity=gran, smoothing=0.5, unbiased=mode.unbiased,
                )
                assert torch.equal(mine, theirs) and kept == int(kept_ref), (gran, dtype, mode)


# -------------------------------------------------------------------------- mask: bit-identical
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
@pytest.mark.parametrize("shape", [(1,), (), (4097,), (5, 123, 123)], ids=str)
def test_masked_gradient_bit_identical(shape, channel, dtype):
    """With param = 0, lr = 1 and no momentum the kernel writes -g~: its support (and, for float32
    and float64, its value) must equal the reference's bit for bit, for every mode."""
    for mode in MODES:
        maximize = mode % 2 == 1
        key = derive_key(11, mode, 0)
        grad = _grad(shape, dtype)
        scalars, scores = ref_scalars(grad, channel, 0.3, maximize=maximize)
        param = torch.zeros(shape, dtype=dtype, device=DEVICE)
        kept, out_scalars = run_kernel(
            param, grad, _empty_buf(param), key=key, mode=mode, channel=channel, lr=1.0, maximize=maximize,
            scalars=scalars if mode.importance else None,
            scores=scores if (channel and mode.importance) else None, block=_block(grad),
        )
        expected, kept_ref = ref_masked_grad(grad, key, mode, channel, 0.3, scalars, scores, maximize)
        what = f"mode {mode}"
        assert int(kept) == kept_ref, what
        assert kept.dtype == torch.int64 and kept.dim() == 0
        assert out_scalars.dtype == _cdtype(dtype) and out_scalars.numel() == 2
        assert torch.equal(param != 0, expected.to(dtype) != 0), what
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(-param, expected), what
        else:
            assert torch.equal(-param, expected.to(dtype)), what


# ------------------------------------------------------------------------- multi-step SGD parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
@pytest.mark.parametrize("mode", MODES)
def test_sgd_steps_match_reference(mode, channel, dtype):
    """4 optimizer configurations x 3 steps with fresh keys: kept counts exact, params and momentum
    buffers within the dtype tolerance. The first step with momentum writes b = d over a NaN buffer."""
    shape = (33, 129) if channel else (4097,)
    rate = 0.3 if mode == Mode.SCALE else 0.25  # scale: g * rate is rounded
    for cfg_index, (momentum, dampening, nesterov, weight_decay, maximize) in enumerate(SGD_CONFIGS):
        param0 = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
        p_kernel, p_ref = param0.clone(), param0.clone()
        buf_kernel = torch.full_like(param0, math.nan) if momentum else _empty_buf(param0)
        buf_ref = [None]
        for step in range(3):
            key = derive_key(cfg_index, step, mode)
            grad = _grad(shape, dtype)
            scalars, scores = ref_scalars(grad, channel, rate, maximize=maximize)
            kept, _ = run_kernel(
                p_kernel, grad, buf_kernel, key=key, mode=mode, channel=channel, rate=rate,
                scalars=scalars if mode.importance else None,
                scores=scores if (channel and mode.importance) else None,
                lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                maximize=maximize, first_step=step == 0,
            )
            g_masked, kept_ref = ref_masked_grad(grad, key, mode, channel, rate, scalars, scores, maximize)
            ref_update(p_ref, g_masked, buf_ref, 0.05, momentum, dampening, weight_decay, nesterov)
            what = f"config {cfg_index} step {step}"
            assert int(kept) == kept_ref, what
            assert_close(p_kernel, p_ref, dtype)
            if momentum:
                assert_close(buf_kernel, buf_ref[0], dtype)
            # keep both sides on the same state so that tolerances do not compound over steps
            p_kernel.copy_(p_ref)
            if momentum:
                buf_kernel.copy_(buf_ref[0])


# ------------------------------------------------------------------------------ stage-1 scalars
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
@pytest.mark.parametrize(
    "shape,kind,rate",
    [((4097,), "randn", 0.3), ((4097,), "heavy", 0.3), ((4097,), "randn", 0.02), ((4097,), "zeros", 0.3),
     ((5, 61, 61), "heavy", 0.5), ((64, 3, 3, 3), "heavy", 0.2), ((1,), "randn", 0.3), ((), "randn", 0.7)],
    ids=lambda v: str(v),
)
def test_stage1_scalars_match_inclusion_scalars(shape, kind, rate, channel, dtype):
    """scalars=None: the kernel's [alpha, beta] match inclusion_scalars (fp32/fp64 tolerance) and,
    with the scalars it computed, its mask is the reference's bit for bit."""
    grad = _grad(shape, dtype, kind)
    for mode in (Mode.AMSS, Mode.AMSS_PLUS):
        key = derive_key(5, mode, 0)
        param = torch.zeros(shape, dtype=dtype, device=DEVICE)
        kept, scalars = run_kernel(param, grad, _empty_buf(param), key=key, mode=mode, channel=channel, rate=rate,
                                   lr=1.0, maximize=mode == Mode.AMSS_PLUS, block=_block(grad))
        expected, _ = ref_scalars(grad, channel, rate, maximize=mode == Mode.AMSS_PLUS)
        assert_close(scalars, expected, _cdtype(dtype))
        # the kernel's own channel scores (summed in another order than torch's)
        n_units = _n_units(shape, channel)
        scores = tk._channel_scores(grad, n_units, grad.numel() // n_units, BLOCK) if channel else None
        if channel:
            assert_close(scores, unit_scores(grad.to(_cdtype(dtype)), "channel"), _cdtype(dtype))
        masked, kept_ref = ref_masked_grad(grad, key, mode, channel, rate, scalars, scores, maximize=mode == Mode.AMSS_PLUS)
        assert int(kept) == kept_ref
        assert torch.equal(param != 0, masked.to(dtype) != 0)
        # and against the reference's own end-to-end result: at most a rounding flip or two
        _, kept_e2e = masked_gradient(-grad if mode == Mode.AMSS_PLUS else grad, rate=rate, key=key, mask=mode.mask,
                                      granularity="channel" if channel else "element", smoothing=0.5)
        if rate < 1.0:
            assert abs(int(kept) - int(kept_e2e)) <= 2


def test_stage1_uniform_and_dense_scalars():
    grad = _grad((100,), torch.float32).cpu()
    for mode, expected in ((Mode.DENSE, [0.0, 1.0]), (Mode.UNIFORM, [0.0, 0.3]), (Mode.UNIFORM_UNBIASED, [0.0, 0.3]),
                           (Mode.SCALE, [0.0, 1.0])):
        param = torch.zeros(100, device=DEVICE)
        kept, scalars = run_kernel(param, grad.to(DEVICE), _empty_buf(param), key=1, mode=mode, channel=False,
                                   rate=0.3)
        assert torch.equal(scalars.cpu(), torch.tensor(expected, dtype=torch.float32))
        if mode == Mode.DENSE:
            assert int(kept) == 100 and torch.equal(param.cpu(), -0.1 * grad)
        if mode == Mode.SCALE:  # scale: every unit kept, g~ = 0.3 * g, and no other factor
            assert int(kept) == 100 and torch.equal(param.cpu(), -0.1 * (grad * 0.3))
            assert not torch.equal(param.cpu(), -0.1 * (grad * 0.09))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_ignores_granularity_key_and_scalars(dtype):
    """Mode 5 samples nothing: channel or element, any key, given scalars or not: the same update,
    kept = every unit of the requested granularity, [alpha, beta] = [0, 1]."""
    grad = _grad((6, 50), dtype)
    outs = []
    for channel, key, scalars in ((False, 1, None), (True, 2, None),
                                  (True, 3, torch.tensor([5.0, 0.1], dtype=_cdtype(dtype), device=DEVICE))):
        p = torch.ones(6, 50, dtype=dtype, device=DEVICE)
        buf = torch.full_like(p, math.nan)
        kept, out_scalars = run_kernel(p, grad, buf, key=key, mode=Mode.SCALE, channel=channel, rate=0.3, scalars=scalars,
                                       momentum=0.9, weight_decay=1e-2, nesterov=True, maximize=True)
        assert int(kept) == (6 if channel else 300)
        assert torch.equal(out_scalars.cpu(), torch.tensor([0.0, 1.0], dtype=_cdtype(dtype)))
        outs.append((p, buf))
    assert all(torch.equal(p, outs[0][0]) and torch.equal(b, outs[0][1]) for p, b in outs)
    p_ref, buf_ref = torch.ones(6, 50, dtype=dtype, device=DEVICE), [None]
    ref_update(p_ref, -grad.to(_cdtype(dtype)) * 0.3, buf_ref, 0.1, 0.9, 0.0, 1e-2, True)
    assert_close(outs[0][0], p_ref, dtype)


# ------------------------------------------------------------------------------ edge shapes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0)], ids=str)
def test_empty_tensors(shape, dtype):
    for mode in MODES:
        for channel in (False, True):
            param = torch.zeros(shape, dtype=dtype, device=DEVICE)
            kept, scalars = run_kernel(param, torch.zeros_like(param), torch.zeros_like(param), key=1, mode=mode,
                                       channel=channel, momentum=0.9)
            units = _n_units(shape, channel) if mode == Mode.SCALE else 0  # scale keeps every (empty) unit
            assert kept.dtype == torch.int64 and kept.dim() == 0 and int(kept) == units
            assert scalars.shape == (2,) and scalars.dtype == _cdtype(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
def test_large_tensor(channel):
    """278011 units, heavy-tailed gradient (water-filling runs), momentum + nesterov + weight decay."""
    shape = (278011,)
    dtype = torch.float32
    grad = _grad(shape, dtype, "heavy")
    param0 = torch.randn(shape).to(DEVICE)
    for mode in (Mode.UNIFORM, Mode.AMSS_PLUS):
        key = derive_key(7, 0, mode)
        # stage 1 from the kernel itself
        kept_self, scalars_self = run_kernel(param0.clone(), grad, torch.empty_like(param0), key=key, mode=mode,
                                             channel=channel, rate=0.1, momentum=0.9, nesterov=True,
                                             weight_decay=1e-3, block=BIG_BLOCK)
        scalars, scores = ref_scalars(grad, channel, 0.1)
        if mode == Mode.AMSS_PLUS:
            assert_close(scalars_self, scalars, torch.float32)
        # parity given the reference's scalars
        p = param0.clone()
        buf = torch.full_like(p, math.nan)
        kept, _ = run_kernel(p, grad, buf, key=key, mode=mode, channel=channel, rate=0.1,
                             scalars=scalars if mode == Mode.AMSS_PLUS else None,
                             scores=scores if channel and mode == Mode.AMSS_PLUS else None,
                             momentum=0.9, nesterov=True, weight_decay=1e-3, block=BIG_BLOCK)
        g_masked, kept_ref = ref_masked_grad(grad, key, mode, channel, 0.1, scalars, scores)
        p_ref, buf_ref = param0.clone(), [None]
        ref_update(p_ref, g_masked, buf_ref, 0.1, 0.9, 0.0, 1e-3, True)
        assert int(kept) == kept_ref
        assert abs(int(kept_self) - kept_ref) <= 2
        assert_close(p, p_ref)
        assert_close(buf, buf_ref[0])


def test_block_size_does_not_change_the_result():
    grad = _grad((3, 100), torch.float32)
    outs = []
    for block in (16, 64, 4096):
        for channel in (False, True):
            p = torch.zeros(3, 100)
            scalars, scores = ref_scalars(grad, channel, 0.3)  # stage 1 sums in a block-dependent order
            kept, _ = run_kernel(p, grad, _empty_buf(p), key=99, mode=Mode.AMSS_PLUS, channel=channel, lr=1.0, block=block,
                                 scalars=scalars, scores=scores if channel else None)
            outs.append((channel, int(kept), p))
    for channel in (False, True):
        same = [o for o in outs if o[0] == channel]
        assert all(o[1] == same[0][1] and torch.equal(o[2], same[0][2]) for o in same)


# ------------------------------------------------------------------------------ validation
def _ok_args():
    p = torch.zeros(8)
    return dict(param=p, grad=torch.zeros(8), momentum_buffer=torch.empty(0), scores=None, scalars=None, key=1,
                rate=0.5, smoothing=0.5, max_iter=4, mode=int(Mode.AMSS_PLUS), channel=False, lr=0.1, momentum=0.0, dampening=0.0,
                weight_decay=0.0, nesterov=False, maximize=False, first_step=True)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(mode=6), "mode must be an int in 0..5"),
        (dict(mode=True), "mode must be an int in 0..5"),
        (dict(grad=torch.zeros(8, dtype=torch.float64)), "grad.dtype must equal param.dtype"),
        (dict(grad=torch.zeros(9)), r"grad.shape must equal param.shape \(8,\)"),
        (dict(param=torch.zeros(8, dtype=torch.int32), grad=torch.zeros(8, dtype=torch.int32),
              momentum_buffer=torch.empty(0, dtype=torch.int32)), "param.dtype must be one of"),
        (dict(param=torch.zeros(4, 4).t(), grad=torch.zeros(4, 4).t()), "param must be contiguous"),
        (dict(momentum=0.9), r"momentum_buffer.shape must equal param.shape"),
        (dict(key=-1), "key must be an int in"),
        (dict(key=2**63), "key must be an int in"),
        (dict(scalars=torch.zeros(3)), "scalars must be None or a 2-element tensor"),
        (dict(scalars=torch.zeros(2, dtype=torch.float64)), "scalars must be a torch.float32 tensor"),
        (dict(scores=torch.zeros(7)), "scores must be None or a 1-D tensor of 8 units"),
        (dict(smoothing=1.5), "smoothing must be in"),
        (dict(rate=0.0), r"rate must be in \(0, 1\], got 0.0"),
        (dict(rate=1.5), r"rate must be in \(0, 1\], got 1.5"),
        (dict(lr=math.nan), "lr must be a finite real number"),
        (dict(max_iter=-1), "max_iter must be a non-negative int"),
    ],
)
def test_validation_errors(change, match):
    args = _ok_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        tk.masked_sgd_triton_(**args)


def test_validation_block():
    with pytest.raises(ValueError, match="block must be a power of two >= 16, got 1000"):
        tk.masked_sgd_triton_(**_ok_args(), block=1000)


# ------------------------------------------------------------------------------ GPU compilation
@pytest.fixture(scope="module")
def compiled_ptx():
    """compile_for_gpu(80) and (90) side by side: each runs in its own TRITON_INTERPRET=0 subprocess."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = {arch: pool.submit(tk.compile_for_gpu, arch, with_ptx=True) for arch in (80, 90)}
        return {arch: f.result() for arch, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_compile_for_gpu_without_a_gpu(arch, compiled_ptx):
    """PTX for sm_80 / sm_90, float32 and bfloat16, with no FMA in any kernel (fusion is off);
    the scale specialisation (mode 5) draws no Philox numbers."""
    ptx = compiled_ptx[arch]
    names = {"element_reduce", "channel_scores", "waterfill_round", "masked_sgd_element", "masked_sgd_channel",
             "masked_sgd_scale", "masked_adamw_element", "masked_adamw_channel"}
    assert set(ptx) == {f"{n}[{t}]" for n in names for t in ("fp32", "bf16")}
    for name, text in ptx.items():
        assert f".target sm_{arch}" in text, name
        assert ".entry" in text and len(text) > 1000, name
        assert "fma.rn" not in text, name  # q = alpha*s + beta rounds the product, then the sum
    assert "div.rn.f32" in ptx["masked_sgd_element[fp32]"]  # 1/q is IEEE-rounded
    for tag in ("fp32", "bf16"):  # Philox's 32 x 32 -> high-word products, in the sampling kernels only
        assert "mul.hi.u32" in ptx[f"masked_sgd_element[{tag}]"]
        assert "mul.hi.u32" not in ptx[f"masked_sgd_scale[{tag}]"] and "div.rn" not in ptx[f"masked_sgd_scale[{tag}]"]


def test_compile_for_gpu_validates_arch():
    with pytest.raises(ValueError, match="arch must be an int compute capability"):
        tk.compile_for_gpu("sm_90")
