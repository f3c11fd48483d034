"""The GPU kernels of the lazy AdamW step (masked_optim::masked_adamw_ for CUDA, masked_adamw_triton_ for
Triton; docs/algorithm.md §2.8) without a GPU.

* Triton runs in its interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1) against the
  reference :func:`masked_optim.functional.masked_adamw`: each step the kernel is fed the reference's
  ``[alpha, beta]`` (and per channel its unit scores), so kept counts must be equal and masks identical
  bit for bit; param, exp_avg, exp_avg_sq and max_exp_avg_sq must agree within tests/tolerances.py.
  The mask is read exactly from a probe step on a zero state (a kept unit's exp_avg_sq becomes
  (1 - beta2) g^2 != 0, an unkept one stays 0), and compared with the reference's
  (:func:`~masked_optim.functional.sampled_units`) and with the SGD Triton kernel's for the same key.
* The Triton AdamW kernel compiles to PTX for ``GPUTarget("cuda", 90, 32)``; the CUDA kernels compile
  with ``nvcc -c`` (tests/test_cuda_compile.py's command). tests/test_gpu.py runs both GPU backends on
  CUDA tensors where there is a GPU.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from masked_optim.backends import adamw_kernel_for, kernel_for  # noqa: E402
from masked_optim.backends import triton_kernels as tk  # noqa: E402
from masked_optim.functional import _unit_view, inclusion_scalars, masked_adamw, sampled_units, unit_scores  # noqa: E402
from masked_optim.modes import Mode  # noqa: E402
from masked_optim.rng import derive_key  # noqa: E402

from tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not tk._interpreting(), reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")

ROOT = Path(__file__).resolve().parent.parent
MODES = [Mode.UNIFORM, Mode.UNIFORM_UNBIASED, Mode.AMSS, Mode.AMSS_PLUS]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(0,), (1,), (4097,), (5, 123, 123)]
BLOCK = 4096
BIG_BLOCK = 32768  # few program instances for the interpreter (~4 ms each) on the larger tensors
HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)


def _cdtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(numel):
    return BLOCK if numel <= 2 * BLOCK else BIG_BLOCK


def _grad(shape, dtype, seed):
    """Heavy-tailed, never exactly 0 (the mask probe reads a kept unit from (1 - beta2) g^2 != 0)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(shape, generator=gen, dtype=torch.float64))
    g = g.to(dtype)
    return torch.where(g == 0, torch.ones((), dtype=dtype), g)


def _granularity(channel):
    return "channel" if channel else "element"


def _reference_scalars(grad, mode, channel, rate, maximize):
    """[alpha, beta] and unit scores as masked_adamw computes them (unit_mask: scores of the signed
    gradient in the compute dtype, inclusion_scalars); None for the uniform modes (q = rate)."""
    g = grad.to(_cdtype(grad.dtype))
    scores = unit_scores(-g if maximize else g, _granularity(channel))
    if not mode.importance:
        return None, scores
    return torch.stack(inclusion_scalars(scores, rate, 0.5, 4)), scores


def _reference_keep(grad, key, mode, channel, rate, scalars, scores, maximize):
    """The reference's mask broadcast over grad's shape (sampled_units, as masked_adamw draws it)."""
    g = grad.to(_cdtype(grad.dtype))
    keep, _ = sampled_units(-g if maximize else g, rate=rate, key=key, mask=mode.mask, granularity=_granularity(channel),
                            scalars=scalars, scores=scores, unbiased=mode.unbiased)
    return _unit_view(keep, g, _granularity(channel)).expand(g.shape)


def run_triton(param, grad, m, v, vmax, *, key, mode, channel, rate=0.3, scalars=None, scores=None, weight_decay=1e-2,
               step=1.0, amsgrad=False, maximize=False, block=None, **hyper):
    h = dict(HYPER, **hyper)
    return tk.masked_adamw_triton_(
        param, grad, m, v, vmax, scores, scalars, key, rate, 0.5, 4, int(mode), channel, h["lr"], h["beta1"], h["beta2"],
        h["eps"], weight_decay, step, amsgrad, maximize, block=block or _block(param.numel()),
    )


def _given(mode, channel, scalars, scores):
    """The kernel's scalars/scores arguments: the reference's where they decide q."""
    return dict(scalars=scalars if mode.importance else None, scores=scores if (channel and mode.importance) else None)


def _probe_mask(grad, *, key, mode, channel, rate, maximize, given):
    """The kernel's mask, exactly: one step from a zero state keeps exp_avg_sq at 0 on unkept units only."""
    z = torch.zeros(grad.shape, dtype=grad.dtype)
    v = z.clone()
    kept, _ = run_triton(z.clone(), grad, z.clone(), v, z.new_empty(0), key=key, mode=mode, channel=channel, rate=rate,
                         maximize=maximize, **given)
    return v != 0, int(kept)


# ------------------------------------------------------------------------------ multi-step parity
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_adamw_steps_match_reference(mode, channel, dtype, shape):
    """amsgrad off and on, 3 steps each with fresh keys and rates, weight decay 1e-2, maximize in the odd
    modes: kept counts exact, the kernel's mask the reference's bit for bit, the state within tolerance."""
    maximize = mode % 2 == 1
    for amsgrad in (False, True):
        gen = torch.Generator().manual_seed(int(mode) * 10 + amsgrad)
        p0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        p_ref, p_ker = p0.clone(), p0.clone()
        m_ref, v_ref = torch.zeros_like(p0), torch.zeros_like(p0)
        m_ker, v_ker = torch.zeros_like(p0), torch.zeros_like(p0)
        vmax_ref = torch.zeros_like(p0) if amsgrad else None
        vmax_ker = torch.zeros_like(p0) if amsgrad else torch.empty(0, dtype=dtype)
        step_t = torch.tensor(0.0)
        for step in range(3):
            rate = (0.3, 0.7, 0.05)[step]
            key = derive_key(int(mode), step, 17 + amsgrad)
            grad = _grad(shape, dtype, 100 * int(mode) + 10 * step + amsgrad)
            scalars, scores = _reference_scalars(grad, mode, channel, rate, maximize)
            given = _given(mode, channel, scalars, scores)
            (kept_ref,) = masked_adamw(
                [p_ref], [grad], [m_ref], [v_ref], [vmax_ref], [step_t], [key], weight_decay=1e-2, amsgrad=amsgrad,
                maximize=maximize, mask=mode.mask, rate=rate, granularity=_granularity(channel), smoothing=0.5,
                unbiased=mode.unbiased, max_iter=4, **HYPER,
            )
            kept, out_scalars = run_triton(p_ker, grad, m_ker, v_ker, vmax_ker, key=key, mode=mode, channel=channel,
                                           rate=rate, step=float(step_t), amsgrad=amsgrad, maximize=maximize, **given)
            what = f"amsgrad={amsgrad} step {step}"
            assert kept.dtype == torch.int64 and kept.dim() == 0, what
            assert out_scalars.dtype == _cdtype(dtype) and out_scalars.shape == (2,), what
            assert int(kept) == int(kept_ref), what
            if scalars is not None and p0.numel():
                assert torch.equal(out_scalars, scalars), what
            for name, ker, ref in (("param", p_ker, p_ref), ("exp_avg", m_ker, m_ref), ("exp_avg_sq", v_ker, v_ref),
                                   ("max_exp_avg_sq", vmax_ker, vmax_ref)):
                if ref is not None:
                    assert_close(ker, ref, dtype), f"{what}: {name}"
            if p0.numel():
                mask, probe_kept = _probe_mask(grad, key=key, mode=mode, channel=channel, rate=rate, maximize=maximize,
                                               given=given)
                expected = _reference_keep(grad, key, mode, channel, rate, scalars, scores, maximize)
                assert torch.equal(mask, expected), f"{what}: {int((mask != expected).sum())} keep bits differ"
                assert probe_kept == int(kept), what
            # the same state on both sides, so that tolerances do not compound over the steps
            for ker, ref in ((p_ker, p_ref), (m_ker, m_ref), (v_ker, v_ref), (vmax_ker, vmax_ref)):
                if ref is not None:
                    ker.copy_(ref)


@pytest.mark.slow
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
def test_large_tensor(channel):
    """~278k elements in few large blocks, heavy-tailed gradient (water-filling runs), amsgrad: parity given
    the reference's scalars, and the kernel's own stage 1 close to the reference's."""
    shape = (1021, 273) if channel else (278011,)
    dtype = torch.float32
    for mode in (Mode.UNIFORM, Mode.AMSS_PLUS):
        key = derive_key(7, 0, int(mode))
        grad = _grad(shape, dtype, 5)
        p0 = torch.randn(shape, dtype=dtype)
        m0, v0 = torch.randn(shape).mul_(0.1), torch.rand(shape).mul_(0.01)
        scalars, scores = _reference_scalars(grad, mode, channel, 0.1, False)
        p_ref, m_ref, v_ref, vmax_ref = p0.clone(), m0.clone(), v0.clone(), v0.clone()
        step_t = torch.tensor(4.0)
        (kept_ref,) = masked_adamw([p_ref], [grad], [m_ref], [v_ref], [vmax_ref], [step_t], [key], amsgrad=True,
                                   mask=mode.mask, rate=0.1, granularity=_granularity(channel), smoothing=0.5,
                                   unbiased=mode.unbiased, weight_decay=1e-2, **HYPER)
        p, m, v, vmax = p0.clone(), m0.clone(), v0.clone(), v0.clone()
        kept, _ = run_triton(p, grad, m, v, vmax, key=key, mode=mode, channel=channel, rate=0.1, step=5.0, amsgrad=True,
                             block=BIG_BLOCK, **_given(mode, channel, scalars, scores))
        assert int(kept) == int(kept_ref)
        for ker, ref in ((p, p_ref), (m, m_ref), (v, v_ref), (vmax, vmax_ref)):
            assert_close(ker, ref)
        # stage 1 from the kernel itself
        kept_self, scalars_self = run_triton(p0.clone(), grad, m0.clone(), v0.clone(), v0.clone(), key=key, mode=mode,
                                             channel=channel, rate=0.1, step=5.0, amsgrad=True, block=BIG_BLOCK)
        if mode.importance:
            assert_close(scalars_self, scalars)
        assert abs(int(kept_self) - int(kept_ref)) <= 2


# ------------------------------------------------------------------------------ the SGD step's masks
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
def test_mask_is_the_sgd_kernels_mask(channel, dtype):
    """For the same gradient, key, rate, mode and granularity the AdamW kernel keeps exactly the units the
    SGD Triton kernel keeps, with the scalars given and with each kernel's own stage 1."""
    shape = (5, 123, 123)
    for mode in MODES:
        maximize = mode == Mode.AMSS_PLUS
        key = derive_key(3, int(mode), 1)
        grad = _grad(shape, dtype, int(mode))
        scalars, scores = _reference_scalars(grad, mode, channel, 0.3, maximize)
        for given in (_given(mode, channel, scalars, scores), {}):
            adam_mask, adam_kept = _probe_mask(grad, key=key, mode=mode, channel=channel, rate=0.3, maximize=maximize,
                                               given=given)
            p = torch.zeros(shape, dtype=dtype)
            sgd_kept, _ = kernel_for("triton")(p, grad, torch.empty(0, dtype=dtype), given.get("scores"),
                                               given.get("scalars"), key, 0.3, 0.5, 4, int(mode), channel, 1.0, 0.0, 0.0,
                                               0.0, False, maximize, True, block=BIG_BLOCK)
            what = f"mode {mode.name} {'given' if given else 'own'} scalars"
            assert adam_kept == int(sgd_kept), what
            assert torch.equal(adam_mask, p != 0), what
            if not channel:  # both sides of the threshold occur
                assert 0 < adam_kept < p.numel(), what


# ------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rate_one_is_an_adamw_step_of_every_unit(dtype):
    """rate 1 samples nothing (as step_sampled in csrc/masked_sgd_math.h): every unit takes the step with
    weight 1, kept = every unit, [alpha, beta] = [0, 1]; torch.optim.AdamW's step within tolerance."""
    shape = (7, 40)
    grad = _grad(shape, dtype, 1)
    p0 = torch.randn(shape).to(dtype)
    for mode in MODES:
        for channel in (False, True):
            p, m, v, vmax = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), torch.zeros_like(p0)
            kept, scalars = run_triton(p, grad, m, v, vmax, key=1, mode=mode, channel=channel, rate=1.0, amsgrad=True)
            assert int(kept) == (7 if channel else 280)
            assert torch.equal(scalars, torch.tensor([0.0, 1.0]))
            p_ref, m_ref, v_ref, vmax_ref = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), torch.zeros_like(p0)
            masked_adamw([p_ref], [grad], [m_ref], [v_ref], [vmax_ref], [torch.tensor(0.0)], [1], amsgrad=True,
                         mask=mode.mask, rate=1.0, weight_decay=1e-2, **HYPER)
            for ker, ref in ((p, p_ref), (m, m_ref), (v, v_ref), (vmax, vmax_ref)):
                assert_close(ker, ref, dtype)


def test_empty_tensors():
    for shape in ((0,), (0, 3), (4, 0)):
        for mode in MODES:
            for channel in (False, True):
                p = torch.zeros(shape)
                kept, scalars = run_triton(p, p.clone(), p.clone(), p.clone(), p.new_empty(0), key=1, mode=mode,
                                           channel=channel)
                assert kept.dtype == torch.int64 and kept.dim() == 0 and int(kept) == 0
                assert scalars.shape == (2,) and scalars.dtype == torch.float32


def _ok_args():
    z = torch.zeros(8)
    return dict(param=z.clone(), grad=z.clone(), exp_avg=z.clone(), exp_avg_sq=z.clone(), max_exp_avg_sq=torch.empty(0),
                scores=None, scalars=None, key=1, rate=0.5, smoothing=0.5, max_iter=4, mode=int(Mode.AMSS_PLUS),
                channel=False, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1.0, amsgrad=False,
                maximize=False)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(mode=0), r"mode must be an int in 1..4"),
        (dict(mode=5), r"mode must be an int in 1..4"),
        (dict(exp_avg=torch.zeros(8, dtype=torch.float64)), "exp_avg.dtype must equal param.dtype"),
        (dict(exp_avg_sq=torch.zeros(7)), r"exp_avg_sq.shape must equal param.shape \(8,\)"),
        (dict(amsgrad=True), r"max_exp_avg_sq.shape must equal param.shape \(8,\) with amsgrad"),
        (dict(step=0.0), r"step must be >= 1"),
        (dict(beta2=1.0), r"beta1 and beta2 must be in \[0, 1\)"),
        (dict(eps=math.nan), "eps must be a finite real number"),
        (dict(rate=0.0), r"rate must be in \(0, 1\]"),
        (dict(key=-1), "key must be an int in"),
        (dict(scalars=torch.zeros(2, dtype=torch.float64)), "scalars must be a torch.float32 tensor"),
    ],
)
def test_validation_errors(change, match):
    args = _ok_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        tk.masked_adamw_triton_(**args)


# ------------------------------------------------------------------------------ the op and its access
def test_adamw_kernel_for():
    assert adamw_kernel_for("triton") is tk.masked_adamw_triton_
    for name in ("cpp", "cuda"):
        assert adamw_kernel_for(name) is torch.ops.masked_optim.masked_adamw_
    with pytest.raises(ValueError, match="Invalid fused backend"):
        adamw_kernel_for("reference")


def _op_args(mode, channel, amsgrad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p, g, m = (torch.randn(6, 5, 3, generator=gen) for _ in range(3))
    v = torch.rand(6, 5, 3, generator=gen)
    vmax = v.clone() if amsgrad else torch.empty(0)
    return (p, g, m, v, vmax, None, None, 12345, 0.4, 0.5, 4, int(mode), channel, 0.05, 0.9, 0.999, 1e-8, 1e-2, 3.0,
            amsgrad, mode % 2 == 1)


def test_op_is_the_triton_function(monkeypatch):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("masked_optim::masked_adamw_triton_", "CPU")
    monkeypatch.setattr(tk, "OP_BLOCK", 4096)
    a = _op_args(Mode.AMSS_PLUS, True, True, seed=3)
    b = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a)
    kept_op, scalars_op = torch.ops.masked_optim.masked_adamw_triton_(*a)
    kept_fn, scalars_fn = tk.masked_adamw_triton_(*b)
    assert int(kept_op) == int(kept_fn) and torch.equal(scalars_op, scalars_fn)
    for i in (0, 2, 3, 4):
        assert torch.equal(a[i], b[i])


@pytest.mark.parametrize("mode,channel,amsgrad", [(Mode.AMSS_PLUS, False, True), (Mode.UNIFORM, True, False)],
                         ids=["amss_plus-element-amsgrad", "uniform-channel"])
def test_opcheck_masked_adamw_triton(mode, channel, amsgrad, monkeypatch):
    monkeypatch.setattr(tk, "OP_BLOCK", 4096)  # one program instance per launch in the interpreter
    torch.library.opcheck(torch.ops.masked_optim.masked_adamw_triton_.default, _op_args(mode, channel, amsgrad))


# ------------------------------------------------------------------------------ GPU compilation
@pytest.mark.slow
def test_triton_adamw_compiles_to_ptx_for_sm90():
    """PTX of the AdamW kernel (element and channel, float32 and bfloat16) for GPUTarget("cuda", 90, 32),
    without a GPU: no FMA (fusion is off), IEEE division and square root, Philox in the kernel."""
    ptx = tk.compile_for_gpu(90, with_ptx=True, prefix="masked_adamw")
    assert set(ptx) == {f"masked_adamw_{g}[{t}]" for g in ("element", "channel") for t in ("fp32", "bf16")}
    for name, text in ptx.items():
        assert ".target sm_90" in text and ".entry" in text, name
        assert "fma.rn" not in text, name
        assert "div.rn.f32" in text and "sqrt.rn.f32" in text, name
        assert "div.full" not in text and "sqrt.approx" not in text, name
        assert "mul.hi.u32" in text, name  # Philox's 32 x 32 -> high-word products


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_adamw_kernel_compiles(tmp_path):
    """nvcc -c of csrc/cuda/masked_sgd_cuda.cu for sm_90 (tests/test_cuda_compile.py's command, with the
    build's --fmad=false) defines the AdamW launcher the binding calls."""
    obj = tmp_path / "masked_sgd_cuda_sm90.o"
    cmd = [shutil.which("nvcc"), "-c", "-std=c++17", "-O3", "--fmad=false", "-I", str(ROOT / "csrc"), "-gencode",
           "arch=compute_90,code=sm_90", str(ROOT / "csrc" / "cuda" / "masked_sgd_cuda.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    nm = shutil.which("nm")
    if nm is not None:
        symbols = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
        assert "masked_optim::cuda::launch_masked_adamw_update(" in symbols
