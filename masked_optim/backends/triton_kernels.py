"""Triton backend of the fused masked SGD step of ONE tensor (kernel contract, docs/algorithm.md §2 and §4).

Two passes over the tensor:

* **stage 1** (modes 3/4, only when the caller does not give ``[alpha, beta]``): a reduction kernel
  computes the per-unit scores (channel granularity: ``sum g*g`` over each slice along dim 0) or the
  per-program partial sum and max of ``g*g`` (element granularity), finished with torch ops on the
  small result. When ``budget * max pt > 1`` the water-filling constant is found by ``max_iter``
  rounds of a second reduction kernel (element) or by the reference
  :func:`masked_optim.functional.inclusion_scalars` on the score vector (channel). Everything stays
  on the device: no host synchronisation; a device-side flag makes the water-filling rounds cheap
  no-ops when nothing saturates.
* **stage 2**: one fused kernel draws the Philox uniform of each unit with ``tl.rand4x`` (bit-identical
  to :func:`masked_optim.rng.philox_uniform`), forms ``q = min(1, alpha*s + beta)``, masks and
  rescales the gradient, and applies ``torch.optim.SGD``'s update (weight decay, momentum with
  dampening and nesterov, maximize), writing the parameter and the momentum buffer in their own
  dtype from float32 (float64 for float64 tensors) arithmetic. It also writes per-program counts of
  kept units, summed afterwards.
* **mode 5** (``mask="scale"``) has no stage 1 and draws no random numbers: the same kernel,
  specialised on ``MODE`` (a ``tl.constexpr``), multiplies the gradient by ``grad_scale`` (the rate,
  a runtime argument rounded once to the compute dtype, the product rounded on its own) and applies
  the same SGD update; every unit counts as kept and ``[alpha, beta] = [0, 1]``.

Bit parity of the mask with the reference needs ``q`` rounded exactly as torch rounds
``scores * alpha + beta`` (a product, then a sum): every kernel is launched and compiled with
``enable_fp_fusion=False`` so that no fused multiply-add is ever formed (Triton fuses ``a*b + c``
into an FMA by default; in the stage-1 reductions an FMA would only move the sums by rounding, in
stage 2 it would change masks). ``1/q`` uses IEEE round-to-nearest division.

Runtime scalars (lr, momentum, dampening, weight decay, key, ...) are kernel arguments, never
``tl.constexpr``: changing them does not recompile. Float scalars are float64 kernel arguments
rounded once to the compute dtype inside the kernel (as torch rounds a Python scalar), and
``[alpha, beta]`` is read from device memory.

The op ``masked_optim::masked_sgd_triton_`` (schema and fake kernel in
:mod:`masked_optim.backends._ops`, shared with ``masked_sgd_``) is implemented by this module for CUDA
tensors, and for CPU tensors under ``TRITON_INTERPRET=1``, once it is imported (never at package
import: the backend selection imports it lazily). :func:`masked_sgd_triton_` is the same step called
directly, with a ``block`` argument and ``ValueError`` for invalid arguments.

Importing this module never fails: without triton, :func:`triton_available` says why.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Optional

import torch
from torch import Tensor

from ..modes import Mode
from . import _ops

__all__ = [
    "TRITON_IMPORT_ERROR",
    "triton_available",
    "masked_sgd_triton_",
    "masked_adamw_triton_",
    "compile_for_gpu",
    "OP",
    "OP_ADAMW",
    "OP_BLOCK",
]

# The op masked_optim::masked_sgd_triton_ (schema and fake kernel: masked_optim/backends/_ops.py),
# implemented below for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) once triton imports.
OP = f"{_ops.NAMESPACE}::masked_sgd_triton_"
OP_ADAMW = f"{_ops.NAMESPACE}::masked_adamw_triton_"  # the lazy AdamW step, implemented the same way
# The block size of the op's launches (the op's schema has no block argument; masked_sgd_triton_ does).
OP_BLOCK = 1024
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

try:  # pragma: no cover - exercised through both branches in CI
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken install raising anything else
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_INTERPRETED = False  # set below once the kernels exist

if triton is not None:
    # The mode codes as compile-time constants of the kernels (globals a @triton.jit function may read).
    _DENSE = tl.constexpr(int(Mode.DENSE))
    _UNIFORM = tl.constexpr(int(Mode.UNIFORM))
    _UNIFORM_UNBIASED = tl.constexpr(int(Mode.UNIFORM_UNBIASED))
    _AMSS_PLUS = tl.constexpr(int(Mode.AMSS_PLUS))
    _SCALE = tl.constexpr(int(Mode.SCALE))


def triton_available() -> tuple[bool, Optional[str]]:
    """``(True, None)`` when triton imported, else ``(False, reason)``."""
    if TRITON_IMPORT_ERROR is not None:
        return False, f"triton is not importable ({TRITON_IMPORT_ERROR}); pip install triton"
    return True, None


def _interpreting() -> bool:
    """Whether this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 was set when
    they were defined, i.e. when this module was first imported)."""
    return _INTERPRETED


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _to_storage(x, DST: tl.constexpr):
        """Round a float32/float64 value to the storage dtype, round-to-nearest-even.

        float32 -> bfloat16 is done on the bits (torch's c10::BFloat16 rounding, NaN -> 0x7FC0): the
        result is what ``cvt.rn.bf16.f32`` gives on the GPU, and Triton's interpreter would truncate.
        """
        if DST == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            lsb = (bits >> 16) & 1
            rounded = (bits + (lsb + 0x7FFF).to(tl.uint32)) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DST)

    @triton.jit
    def _element_reduce_kernel(g_ptr, psum_ptr, pmax_ptr, numel, BLOCK: tl.constexpr, F64: tl.constexpr):
        """Per-program partial sum and max of ``g*g`` (element granularity, stage 1)."""
        cdt = tl.float64 if F64 else tl.float32
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < numel
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(cdt)
        s = g * g
        tl.store(psum_ptr + pid, tl.sum(s, axis=0))
        tl.store(pmax_ptr + pid, tl.max(s, axis=0))

    @triton.jit
    def _channel_scores_kernel(
        g_ptr, out_ptr, n_units, inner, ROWS: tl.constexpr, COLS: tl.constexpr, F64: tl.constexpr
    ):
        """``out[j] = sum over slice j of g*g`` for ROWS units per program (channel granularity)."""
        cdt = tl.float64 if F64 else tl.float32
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_units
        acc = tl.zeros((ROWS, COLS), dtype=cdt)
        for start in range(0, inner, COLS):
            cols = start + tl.arange(0, COLS)
            m = row_ok[:, None] & (cols < inner)[None, :]
            g = tl.load(g_ptr + rows[:, None] * inner + cols[None, :], mask=m, other=0.0).to(cdt)
            acc += g * g
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)

    @triton.jit
    def _waterfill_round_kernel(
        g_ptr,
        state_ptr,
        pcount_ptr,
        prest_ptr,
        numel,
        one_minus_gamma: tl.float64,
        gamma_over_n: tl.float64,
        inv_n: tl.float64,
        BLOCK: tl.constexpr,
        F64: tl.constexpr,
    ):
        """One water-filling round (element granularity): per-program ``#{pt*c >= 1}`` and the
        sum of the unsaturated ``pt``. ``state = [total, c, nothing_saturates]``; when the flag is
        set the round is skipped (its result is discarded anyway)."""
        cdt = tl.float64 if F64 else tl.float32
        pid = tl.program_id(0)
        total = tl.load(state_ptr)
        c = tl.load(state_ptr + 1)
        skip = tl.load(state_ptr + 2)
        count = tl.zeros((), dtype=tl.int32)
        rest = tl.zeros((), dtype=cdt)
        if skip == 0:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inb = offs < numel
            g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(cdt)
            s = g * g
            if F64:
                ratio = s / total
            else:
                ratio = tl.fdiv(s, total, ieee_rounding=True)
            pi = tl.where(total > 0, ratio, tl.full((), inv_n, cdt))
            w = pi * tl.full((), one_minus_gamma, cdt)
            pt = w + tl.full((), gamma_over_n, cdt)
            ptc = pt * c
            sat = (ptc >= 1.0) & inb
            count = tl.sum(sat.to(tl.int32), axis=0)
            rest = tl.sum(tl.where(sat | (offs >= numel), 0.0, pt), axis=0)
        tl.store(pcount_ptr + pid, count)
        tl.store(prest_ptr + pid, rest)

    @triton.jit
    def _sample_units(g, offs, inb, pid, key, inner, scores_ptr, scalars_ptr, BLOCK: tl.constexpr,
                      MODE: tl.constexpr, CHANNEL: tl.constexpr, F64: tl.constexpr):
        """The mask of a (BLOCK/4, 4) tile of a sampled step (modes 1..4), shared by the SGD and AdamW
        kernels so that both draw the same masks: unit j (element ``offs``, or slice ``offs // inner``)
        takes word ``j % 4`` of Philox block ``j // 4`` (``tl.rand4x``), ``q = min(1, alpha*s + beta)``
        (``beta`` alone for the uniform modes) and ``keep = u < q``. ``g`` is the (signed) gradient
        tile in the compute dtype. Returns ``(keep, q, kept units of the tile)``."""
        cdt = tl.float64 if F64 else tl.float32
        QUARTER: tl.constexpr = BLOCK // 4
        r = tl.arange(0, QUARTER)
        w = tl.arange(0, 4)
        if CHANNEL:
            j = offs // inner
            counter = j // 4
            word = j % 4
            u0, u1, u2, u3 = tl.rand4x(key, counter)
            u = tl.where(word == 0, u0, tl.where(word == 1, u1, tl.where(word == 2, u2, u3)))
        else:
            # element: unit j = offs, counter j // 4 = the tile row, word j % 4 = the column.
            counter = pid.to(tl.int64) * QUARTER + r
            u0, u1, u2, u3 = tl.rand4x(key, counter)
            u = tl.where(
                w[None, :] == 0,
                u0[:, None],
                tl.where(w[None, :] == 1, u1[:, None], tl.where(w[None, :] == 2, u2[:, None], u3[:, None])),
            )
        beta = tl.load(scalars_ptr + 1)
        if MODE == _UNIFORM or MODE == _UNIFORM_UNBIASED:
            q = tl.minimum(tl.zeros_like(g) + beta, 1.0, propagate_nan=tl.PropagateNan.ALL)
        else:
            alpha = tl.load(scalars_ptr)
            if CHANNEL:
                s = tl.load(scores_ptr + offs // inner, mask=inb, other=0.0)
            else:
                s = g * g
            prod = alpha * s  # rounded on its own: the kernels run with enable_fp_fusion=False
            lin = prod + beta
            q = tl.minimum(lin, 1.0, propagate_nan=tl.PropagateNan.ALL)
        keep = u.to(cdt) < q
        counted = keep & inb
        if CHANNEL:
            counted = counted & ((offs % inner) == 0)
        return keep, q, tl.sum(tl.sum(counted.to(tl.int32), axis=1), axis=0)

    @triton.jit
    def _reciprocal(q, F64: tl.constexpr):
        """``1 / q``, IEEE round-to-nearest (the weight of a kept unit when unbiased)."""
        if F64:
            return 1.0 / q
        else:
            return tl.fdiv(tl.full(q.shape, 1.0, q.dtype), q, ieee_rounding=True)

    @triton.jit(do_not_specialize=["key"])  # a new key every step must not pick a new variant
    def _masked_sgd_kernel(
        p_ptr,
        g_ptr,
        b_ptr,
        scores_ptr,
        scalars_ptr,
        pkept_ptr,
        numel,
        inner,
        key: tl.int64,
        lr: tl.float64,
        momentum: tl.float64,
        one_minus_dampening: tl.float64,
        weight_decay: tl.float64,
        grad_scale: tl.float64,
        BLOCK: tl.constexpr,
        MODE: tl.constexpr,
        CHANNEL: tl.constexpr,
        HAS_WD: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        FIRST_STEP: tl.constexpr,
        NESTEROV: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        F64: tl.constexpr,
    ):
        """Stage 2 on a (BLOCK/4, 4) tile: element i = 4*r + w of the tile takes Philox word w."""
        cdt = tl.float64 if F64 else tl.float32
        QUARTER: tl.constexpr = BLOCK // 4
        pid = tl.program_id(0)
        r = tl.arange(0, QUARTER)
        w = tl.arange(0, 4)
        offs = pid.to(tl.int64) * BLOCK + r[:, None] * 4 + w[None, :]
        inb = offs < numel

        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(cdt)
        p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(cdt)
        if MAXIMIZE:
            g = -g

        if MODE == _SCALE:
            # scale: g~ = rate * g, no mask (the product is rounded: enable_fp_fusion=False)
            g = g * tl.full((), grad_scale, cdt)
        elif MODE != _DENSE:
            keep, q, n_kept = _sample_units(g, offs, inb, pid, key, inner, scores_ptr, scalars_ptr, BLOCK, MODE,
                                            CHANNEL, F64)
            if MODE == _UNIFORM_UNBIASED or MODE == _AMSS_PLUS:
                g = tl.where(keep, g * _reciprocal(q, F64), 0.0)
            else:
                g = tl.where(keep, g, 0.0)
            tl.store(pkept_ptr + pid, n_kept)

        d = g
        if HAS_WD:
            d = d + tl.full((), weight_decay, cdt) * p
        if HAS_MOMENTUM:
            mu = tl.full((), momentum, cdt)
            if FIRST_STEP:
                buf = d
            else:
                buf = tl.load(b_ptr + offs, mask=inb, other=0.0).to(cdt)
                buf = buf * mu + tl.full((), one_minus_dampening, cdt) * d
            tl.store(b_ptr + offs, _to_storage(buf, b_ptr.dtype.element_ty), mask=inb)
            if NESTEROV:
                d = d + mu * buf
            else:
                d = buf
        p = p - tl.full((), lr, cdt) * d
        tl.store(p_ptr + offs, _to_storage(p, p_ptr.dtype.element_ty), mask=inb)

    @triton.jit(do_not_specialize=["key"])  # a new key every step must not pick a new variant
    def _masked_adamw_kernel(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        vmax_ptr,
        scores_ptr,
        scalars_ptr,
        pkept_ptr,
        numel,
        inner,
        key: tl.int64,
        one_minus_beta1: tl.float64,
        beta2: tl.float64,
        one_minus_beta2: tl.float64,
        step_size: tl.float64,
        bc2_sqrt: tl.float64,
        eps: tl.float64,
        lr_wd: tl.float64,
        BLOCK: tl.constexpr,
        MODE: tl.constexpr,
        CHANNEL: tl.constexpr,
        SAMPLED: tl.constexpr,
        HAS_WD: tl.constexpr,
        AMSGRAD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        F64: tl.constexpr,
    ):
        """The lazy AdamW step (docs/algorithm.md §2.8) on a (BLOCK/4, 4) tile, the mask of the SGD
        kernel (_sample_units). The element update is adamw_update of csrc/masked_sgd_math.h, in its
        order: m' = m + (1 - beta1)(g - m), v' = beta2 v + (1 - beta2) g^2, vmax' = max(vmax, v') (amsgrad),
        denom = sqrt(v' or vmax') / sqrt(bc2) + eps, p' = p - w (step_size m' / denom + lr wd p), with
        IEEE division and square root; units that are not kept are written back unchanged. Without
        SAMPLED (rate 1) every unit is kept with w = 1."""
        cdt = tl.float64 if F64 else tl.float32
        QUARTER: tl.constexpr = BLOCK // 4
        pid = tl.program_id(0)
        r = tl.arange(0, QUARTER)
        w = tl.arange(0, 4)
        offs = pid.to(tl.int64) * BLOCK + r[:, None] * 4 + w[None, :]
        inb = offs < numel

        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(cdt)
        p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(cdt)
        m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(cdt)
        v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(cdt)
        if MAXIMIZE:
            g = -g

        m_new = m + tl.full((), one_minus_beta1, cdt) * (g - m)
        v_new = v * tl.full((), beta2, cdt) + tl.full((), one_minus_beta2, cdt) * (g * g)
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=inb, other=0.0).to(cdt)
            vmax_new = tl.where(vmax > v_new, vmax, v_new)
            v_hat = vmax_new
        else:
            v_hat = v_new
        if F64:
            denom = tl.sqrt(v_hat) / tl.full((), bc2_sqrt, cdt) + tl.full((), eps, cdt)
            ratio = m_new / denom
        else:
            root = tl.sqrt_rn(v_hat)
            denom = tl.fdiv(root, tl.full(root.shape, bc2_sqrt, cdt), ieee_rounding=True) + tl.full((), eps, cdt)
            ratio = tl.fdiv(m_new, denom, ieee_rounding=True)
        delta = tl.full((), step_size, cdt) * ratio
        if HAS_WD:
            delta = delta + tl.full((), lr_wd, cdt) * p

        if SAMPLED:
            keep, q, n_kept = _sample_units(g, offs, inb, pid, key, inner, scores_ptr, scalars_ptr, BLOCK, MODE,
                                            CHANNEL, F64)
            if MODE == _UNIFORM_UNBIASED or MODE == _AMSS_PLUS:
                delta = _reciprocal(q, F64) * delta
            tl.store(pkept_ptr + pid, n_kept)
            p = tl.where(keep, p - delta, p)
            m = tl.where(keep, m_new, m)
            v = tl.where(keep, v_new, v)
            if AMSGRAD:
                vmax = tl.where(keep, vmax_new, vmax)
        else:
            p = p - delta
            m = m_new
            v = v_new
            if AMSGRAD:
                vmax = vmax_new
        tl.store(p_ptr + offs, _to_storage(p, p_ptr.dtype.element_ty), mask=inb)
        tl.store(m_ptr + offs, _to_storage(m, m_ptr.dtype.element_ty), mask=inb)
        tl.store(v_ptr + offs, _to_storage(v, v_ptr.dtype.element_ty), mask=inb)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, _to_storage(vmax, vmax_ptr.dtype.element_ty), mask=inb)

    _INTERPRETED = type(_masked_sgd_kernel).__name__ == "InterpretedFunction"

    _KERNELS = {
        "element_reduce": _element_reduce_kernel,
        "channel_scores": _channel_scores_kernel,
        "waterfill_round": _waterfill_round_kernel,
        "masked_sgd": _masked_sgd_kernel,
        "masked_adamw": _masked_adamw_kernel,
    }


# ---------------------------------------------------------------------------------------- launcher
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_tensors(fn, param, grad, states):
    """param, grad and the state tensors ``states`` ((name, tensor), ...): tensors of one supported
    dtype on one device."""
    for name, t in (("param", param), ("grad", grad), *states):
        if not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if param.dtype not in _DTYPES:
        raise ValueError(f"{fn}: param.dtype must be one of {_DTYPES}, got {param.dtype}")
    for name, t in (("grad", grad), *states):
        if t.dtype != param.dtype:
            raise ValueError(f"{fn}: {name}.dtype must equal param.dtype ({param.dtype}), got {t.dtype}")
        if t.device != param.device:
            raise ValueError(f"{fn}: {name}.device must equal param.device ({param.device}), got {t.device}")


def _check_sampling(fn, key, rate, smoothing, max_iter, channel, block, reals):
    """The sampling arguments of a masked step, and the step's other real numbers ``reals``
    ((name, value), ...): finite."""
    if not isinstance(channel, bool):
        raise ValueError(f"{fn}: channel must be a bool, got {channel!r}")
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**63:
        raise ValueError(f"{fn}: key must be an int in [0, 2**63), got {key!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{fn}: max_iter must be a non-negative int, got {max_iter!r}")
    for name, v in (("rate", rate), ("smoothing", smoothing), *reals):
        if not _is_real(v) or not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must be a finite real number, got {v!r}")
    if not 0 < rate <= 1:  # as the cpp and CUDA kernels
        raise ValueError(f"{fn}: rate must be in (0, 1], got {rate!r}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{fn}: smoothing must be in [0, 1], got {smoothing!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"{fn}: block must be a power of two >= 16, got {block!r}")


def _check_layout(fn, param, grad, contiguous, scores, scalars, n_units):
    """Shapes, contiguity (param, grad and the ``contiguous`` state tensors), the device, and the
    given scores and scalars."""
    if grad.shape != param.shape:
        raise ValueError(f"{fn}: grad.shape must equal param.shape {tuple(param.shape)}, got {tuple(grad.shape)}")
    for name, t in (("param", param), ("grad", grad), *contiguous):
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous, got strides {t.stride()}")
    if param.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{fn}: param.device must be a CUDA device (or set TRITON_INTERPRET=1 before importing triton "
            f"to run on CPU), got {param.device}"
        )
    cdtype = _compute_dtype(param.dtype)
    if scores is not None:
        if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() != n_units:
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"{fn}: scores must be None or a 1-D tensor of {n_units} units, got {got}")
        if scores.dtype != cdtype or scores.device != param.device or not scores.is_contiguous():
            raise ValueError(
                f"{fn}: scores must be a contiguous {cdtype} tensor on {param.device}, got {scores.dtype} "
                f"on {scores.device}"
            )
    if scalars is not None:
        if not isinstance(scalars, Tensor) or scalars.numel() != 2:
            got = tuple(scalars.shape) if isinstance(scalars, Tensor) else type(scalars).__name__
            raise ValueError(f"{fn}: scalars must be None or a 2-element tensor [alpha, beta], got {got}")
        if scalars.dtype != cdtype or scalars.device != param.device:
            raise ValueError(
                f"{fn}: scalars must be a {cdtype} tensor on {param.device}, got {scalars.dtype} on "
                f"{scalars.device}"
            )


def _validate(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, mode, channel,
              lr, momentum, dampening, weight_decay, block, n_units):
    fn = "masked_sgd_triton_"
    _check_tensors(fn, param, grad, (("momentum_buffer", momentum_buffer),))
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in set(Mode):
        modes = ", ".join(f"{m.value} {m.name.lower()}" for m in Mode)
        raise ValueError(f"{fn}: mode must be an int in 0..5 ({modes}), got {mode!r}")
    _check_sampling(fn, key, rate, smoothing, max_iter, channel, block,
                    (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)))
    if grad.shape == param.shape and momentum != 0 and momentum_buffer.shape != param.shape:
        raise ValueError(
            f"{fn}: momentum_buffer.shape must equal param.shape {tuple(param.shape)} when momentum != 0, "
            f"got {tuple(momentum_buffer.shape)}"
        )
    _check_layout(fn, param, grad, (("momentum_buffer", momentum_buffer),), scores, scalars, n_units)


def _element_stage1(grad: Tensor, n: int, rate: float, smoothing: float, max_iter: int, block: int) -> Tensor:
    """``[alpha, beta]`` of element granularity from Triton reductions; no host synchronisation."""
    cdtype = _compute_dtype(grad.dtype)
    f64 = cdtype == torch.float64
    grid = _cdiv(n, block)
    psum = torch.empty(grid, dtype=cdtype, device=grad.device)
    pmax = torch.empty(grid, dtype=cdtype, device=grad.device)
    _element_reduce_kernel[(grid,)](grad, psum, pmax, n, BLOCK=block, F64=f64, enable_fp_fusion=False)
    total = psum.sum()
    mx = pmax.max()
    gamma = float(smoothing)
    budget = float(rate) * n
    has_signal = total > 0
    pi_max = torch.where(has_signal, mx / total, 1.0 / n)
    pt_max = pi_max * (1.0 - gamma) + gamma / n
    nothing_saturates = pt_max * budget <= 1.0
    c = total.new_full((), budget)
    c_iter = c
    if max_iter > 0:
        pcount = torch.empty(grid, dtype=torch.int32, device=grad.device)
        prest = torch.empty(grid, dtype=cdtype, device=grad.device)
        skip = nothing_saturates.to(cdtype)
        for _ in range(max_iter):
            state = torch.stack([total, c_iter, skip])
            _waterfill_round_kernel[(grid,)](
                grad, state, pcount, prest, n, 1.0 - gamma, gamma / n, 1.0 / n,
                BLOCK=block, F64=f64, enable_fp_fusion=False,
            )
            rest = prest.sum()
            free = budget - pcount.sum().to(cdtype)
            c_iter = torch.where(rest > 0, free / rest, math.inf)
    c = torch.where(nothing_saturates, c, c_iter)
    alpha = torch.where(has_signal, c * (1.0 - gamma) / total, 0.0)
    beta = torch.where(has_signal, c * gamma / n, c / n)
    return torch.stack([alpha, beta])


def _channel_scores(grad: Tensor, n_units: int, inner: int, block: int) -> Tensor:
    cdtype = _compute_dtype(grad.dtype)
    cols = min(_next_pow2(inner), block)
    rows = max(1, min(block // cols, _next_pow2(n_units)))
    out = torch.empty(n_units, dtype=cdtype, device=grad.device)
    _channel_scores_kernel[(_cdiv(n_units, rows),)](
        grad, out, n_units, inner, ROWS=rows, COLS=cols, F64=cdtype == torch.float64, enable_fp_fusion=False
    )
    return out


def masked_sgd_triton_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    scores: Optional[Tensor],
    scalars: Optional[Tensor],
    key: int,
    rate: float,
    smoothing: float,
    max_iter: int,
    mode: int,
    channel: bool,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """The masked SGD step of one tensor (kernel contract), in place on ``param`` and
    ``momentum_buffer``. Returns ``(kept, [alpha, beta])``: a 0-d int64 tensor and a 2-element
    tensor in the compute dtype, both on ``param.device`` (never synchronised with the host)."""
    ok, why = triton_available()
    if not ok:
        raise RuntimeError(f"masked_sgd_triton_: {why}")
    n_units_guess = 0
    if isinstance(param, Tensor):
        n_units_guess = param.shape[0] if (channel is True and param.dim() > 0) else param.numel()
    _validate(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, mode, channel,
              lr, momentum, dampening, weight_decay, block, n_units_guess)
    for name, v in (("nesterov", nesterov), ("maximize", maximize), ("first_step", first_step)):
        if not isinstance(v, bool):
            raise ValueError(f"masked_sgd_triton_: {name} must be a bool, got {v!r}")

    channel_units = channel and param.dim() > 0
    n_units = n_units_guess
    device = param.device
    with _device_guard(device):
        return _masked_sgd_impl(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter,
                                mode, channel_units, n_units, lr, momentum, dampening, weight_decay, nesterov,
                                maximize, first_step, block)


def _masked_sgd_op(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, mode, channel, lr,
                   momentum, dampening, weight_decay, nesterov, maximize, first_step):
    """The implementation of the op masked_optim::masked_sgd_triton_: :func:`masked_sgd_triton_` with
    ``block=OP_BLOCK``."""
    return masked_sgd_triton_(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, mode,
                              channel, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                              block=OP_BLOCK)


def _device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


def _stage1(grad, scores, scalars, rate, smoothing, max_iter, mode, channel_units, n_units, inner, block,
            sampled=None):
    """Stage 1 of a masked step, shared by the SGD and AdamW kernels so that both draw the same masks:
    ``([alpha, beta], unit scores)``. ``[alpha, beta]`` is ``[0, 1]`` when nothing is sampled (modes dense
    and scale), a copy of the given ``scalars``, ``[0, rate]`` (uniform modes), or computed (amss/amss+);
    the unit scores are the given ``scores``, or for channel granularity in the amss modes the
    kernel's own (None otherwise). ``sampled``: whether a mask is drawn (default ``mode.sampled``; the
    AdamW step draws none at rate 1). No host synchronisation."""
    device = grad.device
    cdtype = _compute_dtype(grad.dtype)
    numel = grad.numel()
    sampled = mode.sampled if sampled is None else sampled
    if not sampled:  # dense and scale: q = 1 (given scalars are ignored, as the C++/CUDA kernels do)
        out_scalars = torch.ones(2, dtype=cdtype, device=device)
        out_scalars[:1].zero_()
    elif scalars is not None:
        out_scalars = scalars.reshape(2).clone()  # a new tensor, never a view of an input (the op's schema)
    elif not mode.importance:  # uniform: q = rate
        out_scalars = torch.full((2,), float(rate), dtype=cdtype, device=device)
        out_scalars[:1].zero_()
    elif numel == 0:
        out_scalars = torch.zeros(2, dtype=cdtype, device=device)
    elif scores is not None or channel_units:
        from ..functional import inclusion_scalars

        if scores is None:
            scores = _channel_scores(grad, n_units, inner, block)
        alpha, beta = inclusion_scalars(scores, rate, smoothing, max_iter)
        out_scalars = torch.stack([alpha, beta])
    else:
        out_scalars = _element_stage1(grad, numel, rate, smoothing, max_iter, block)

    if sampled and numel > 0 and mode.importance and channel_units and scores is None:
        scores = _channel_scores(grad, n_units, inner, block)
    return out_scalars, scores


def _masked_sgd_impl(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, mode,
                     channel_units, n_units, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                     block):
    device = param.device
    cdtype = _compute_dtype(param.dtype)
    numel = param.numel()
    inner = numel // n_units if n_units > 0 else 0
    mode = Mode(mode)
    out_scalars, scores = _stage1(grad, scores, scalars, rate, smoothing, max_iter, mode, channel_units, n_units,
                                  inner, block)
    if numel == 0:  # scale keeps its (possibly empty) units: (4, 0) per channel is 4 units
        return torch.full((), n_units if mode == Mode.SCALE else 0, dtype=torch.int64, device=device), out_scalars

    # ---- stage 2
    grid = _cdiv(numel, block)
    sampled = mode.sampled
    pkept = torch.empty(grid if sampled else 1, dtype=torch.int32, device=device)
    scalars_arg = out_scalars if out_scalars.is_contiguous() else out_scalars.contiguous()
    has_momentum = momentum != 0
    _masked_sgd_kernel[(grid,)](
        param,
        grad,
        momentum_buffer if has_momentum else param,  # never dereferenced without momentum
        scores if (scores is not None and channel_units) else scalars_arg,  # dereferenced only in channel modes 3/4
        scalars_arg,
        pkept,
        numel,
        max(inner, 1),
        int(key),
        float(lr),
        float(momentum),
        1.0 - float(dampening),
        float(weight_decay),
        float(rate) if mode == Mode.SCALE else 1.0,
        BLOCK=block,
        MODE=int(mode),
        CHANNEL=channel_units and mode != Mode.SCALE,  # one scale variant: granularity does not change it
        HAS_WD=weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        FIRST_STEP=bool(first_step),
        NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize),
        F64=cdtype == torch.float64,
        enable_fp_fusion=False,
    )
    if not sampled:
        kept = torch.full((), n_units, dtype=torch.int64, device=device)
    else:
        kept = pkept.sum(dtype=torch.int64)
    return kept, out_scalars


# ------------------------------------------------------------------------------------ lazy AdamW
def masked_adamw_triton_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
    scores: Optional[Tensor],
    scalars: Optional[Tensor],
    key: int,
    rate: float,
    smoothing: float,
    max_iter: int,
    mode: int,
    channel: bool,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    amsgrad: bool,
    maximize: bool,
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """The lazy AdamW step of one tensor (``masked_optim::masked_adamw_``'s contract, docs/algorithm.md
    §2.8), in place on ``param``, ``exp_avg``, ``exp_avg_sq`` and, with ``amsgrad``, ``max_exp_avg_sq``
    (an empty tensor otherwise): the units kept by the SGD step's mask for the same gradient, key, rate,
    mode (1..4) and granularity take the AdamW step (weighted by ``1/q`` in the unbiased modes), the
    others are untouched. ``step`` is the tensor's step count after this step's increment. Returns
    ``(kept, [alpha, beta])`` as :func:`masked_sgd_triton_` does (never synchronised with the host)."""
    fn = "masked_adamw_triton_"
    ok, why = triton_available()
    if not ok:
        raise RuntimeError(f"{fn}: {why}")
    states = (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_exp_avg_sq))
    _check_tensors(fn, param, grad, states)
    if isinstance(mode, bool) or not isinstance(mode, int) or not Mode.UNIFORM <= mode <= Mode.AMSS_PLUS:
        raise ValueError(f"{fn}: mode must be an int in 1..4 (1 uniform, 2 uniform unbiased, 3 amss, 4 amss+), "
                         f"got {mode!r}")
    _check_sampling(fn, key, rate, smoothing, max_iter, channel, block,
                    (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay),
                     ("step", step)))
    for name, v in (("amsgrad", amsgrad), ("maximize", maximize)):
        if not isinstance(v, bool):
            raise ValueError(f"{fn}: {name} must be a bool, got {v!r}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{fn}: beta1 and beta2 must be in [0, 1), got {beta1!r} and {beta2!r}")
    if eps < 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps!r}")
    if step < 1:
        raise ValueError(f"{fn}: step must be >= 1 (the step count after the increment), got {step!r}")
    required = states if amsgrad else states[:2]
    if grad.shape == param.shape:
        for name, t in required:
            if t.shape != param.shape:
                raise ValueError(f"{fn}: {name}.shape must equal param.shape {tuple(param.shape)}"
                                 f"{' with amsgrad' if name == 'max_exp_avg_sq' else ''}, got {tuple(t.shape)}")
    channel_units = channel and param.dim() > 0
    n_units = param.shape[0] if channel_units else param.numel()
    _check_layout(fn, param, grad, required, scores, scalars, n_units)
    with _device_guard(param.device):
        return _masked_adamw_impl(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scores, scalars, key, rate,
                                  smoothing, max_iter, Mode(mode), channel_units, n_units, lr, beta1, beta2, eps,
                                  weight_decay, step, amsgrad, maximize, block)


def _masked_adamw_impl(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scores, scalars, key, rate, smoothing,
                       max_iter, mode, channel_units, n_units, lr, beta1, beta2, eps, weight_decay, step, amsgrad,
                       maximize, block):
    device = param.device
    cdtype = _compute_dtype(param.dtype)
    numel = param.numel()
    inner = numel // n_units if n_units > 0 else 0
    sampled = rate < 1.0 and n_units > 0  # as step_sampled in csrc/masked_sgd_math.h
    out_scalars, scores = _stage1(grad, scores, scalars, rate, smoothing, max_iter, mode, channel_units, n_units,
                                  inner, block, sampled=sampled)
    if numel == 0:
        return torch.full((), 0 if sampled else n_units, dtype=torch.int64, device=device), out_scalars

    grid = _cdiv(numel, block)
    pkept = torch.empty(grid if sampled else 1, dtype=torch.int32, device=device)
    scalars_arg = out_scalars if out_scalars.is_contiguous() else out_scalars.contiguous()
    # The hyper-parameters of make_adam_hyper (csrc/masked_sgd_math.h), in float64, rounded once in the kernel.
    step = float(step)
    _masked_adamw_kernel[(grid,)](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq if amsgrad else param,  # never dereferenced without amsgrad
        scores if (scores is not None and channel_units) else scalars_arg,  # dereferenced only in channel modes 3/4
        scalars_arg,
        pkept,
        numel,
        max(inner, 1),
        int(key),
        1.0 - float(beta1),
        float(beta2),
        1.0 - float(beta2),
        float(lr) / (1.0 - math.pow(float(beta1), step)),
        math.sqrt(1.0 - math.pow(float(beta2), step)),
        float(eps),
        float(lr) * float(weight_decay),
        BLOCK=block,
        MODE=int(mode),
        CHANNEL=channel_units,
        SAMPLED=sampled,
        HAS_WD=weight_decay != 0,
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize),
        F64=cdtype == torch.float64,
        enable_fp_fusion=False,
    )
    kept = pkept.sum(dtype=torch.int64) if sampled else torch.full((), n_units, dtype=torch.int64, device=device)
    return kept, out_scalars


def _masked_adamw_op(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scores, scalars, key, rate, smoothing, max_iter,
                     mode, channel, lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize):
    """The implementation of the op masked_optim::masked_adamw_triton_: :func:`masked_adamw_triton_` with
    ``block=OP_BLOCK``."""
    return masked_adamw_triton_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scores, scalars, key, rate,
                                smoothing, max_iter, mode, channel, lr, beta1, beta2, eps, weight_decay, step, amsgrad,
                                maximize, block=OP_BLOCK)


if triton is not None:  # the op's kernels: CUDA tensors, and CPU tensors in the interpreter only
    _ops.LIB.impl("masked_sgd_triton_", _masked_sgd_op, "CUDA")
    if _INTERPRETED:
        _ops.LIB.impl("masked_sgd_triton_", _masked_sgd_op, "CPU")
    _ops.LIB.impl("masked_adamw_triton_", _masked_adamw_op, "CUDA")
    if _INTERPRETED:
        _ops.LIB.impl("masked_adamw_triton_", _masked_adamw_op, "CPU")


# ------------------------------------------------------------------------------ offline compilation
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}


def _compile_specs(dtype: torch.dtype):
    """(name, kernel, signature, constexprs) of each kernel for a parameter dtype."""
    p = _PTR[dtype]
    c = "*fp64" if dtype == torch.float64 else "*fp32"
    f64 = dtype == torch.float64
    specs = [
        ("element_reduce", _element_reduce_kernel,
         {"g_ptr": p, "psum_ptr": c, "pmax_ptr": c, "numel": "i64", "BLOCK": "constexpr", "F64": "constexpr"},
         {"BLOCK": 1024, "F64": f64}),
        ("channel_scores", _channel_scores_kernel,
         {"g_ptr": p, "out_ptr": c, "n_units": "i64", "inner": "i64",
          "ROWS": "constexpr", "COLS": "constexpr", "F64": "constexpr"},
         {"ROWS": 4, "COLS": 256, "F64": f64}),
        ("waterfill_round", _waterfill_round_kernel,
         {"g_ptr": p, "state_ptr": c, "pcount_ptr": "*i32", "prest_ptr": c, "numel": "i64",
          "one_minus_gamma": "fp64", "gamma_over_n": "fp64", "inv_n": "fp64",
          "BLOCK": "constexpr", "F64": "constexpr"},
         {"BLOCK": 1024, "F64": f64}),
    ]
    sgd_sig = {"p_ptr": p, "g_ptr": p, "b_ptr": p, "scores_ptr": c, "scalars_ptr": c, "pkept_ptr": "*i32",
               "numel": "i64", "inner": "i64", "key": "i64", "lr": "fp64", "momentum": "fp64",
               "one_minus_dampening": "fp64", "weight_decay": "fp64", "grad_scale": "fp64"}
    for flag in ("BLOCK", "MODE", "CHANNEL", "HAS_WD", "HAS_MOMENTUM", "FIRST_STEP", "NESTEROV", "MAXIMIZE", "F64"):
        sgd_sig[flag] = "constexpr"
    for channel in (False, True):
        consts = dict(BLOCK=1024, MODE=int(Mode.AMSS_PLUS), CHANNEL=channel, HAS_WD=True, HAS_MOMENTUM=True, FIRST_STEP=False,
                      NESTEROV=True, MAXIMIZE=False, F64=f64)
        specs.append((f"masked_sgd_{'channel' if channel else 'element'}", _masked_sgd_kernel, sgd_sig, consts))
    # mode 5 (scale) is its own specialisation; channel has no effect on it, so one variant
    consts = dict(BLOCK=1024, MODE=int(Mode.SCALE), CHANNEL=False, HAS_WD=True, HAS_MOMENTUM=True, FIRST_STEP=False,
                  NESTEROV=True, MAXIMIZE=True, F64=f64)
    specs.append(("masked_sgd_scale", _masked_sgd_kernel, sgd_sig, consts))
    adamw_sig = {"p_ptr": p, "g_ptr": p, "m_ptr": p, "v_ptr": p, "vmax_ptr": p, "scores_ptr": c, "scalars_ptr": c,
                 "pkept_ptr": "*i32", "numel": "i64", "inner": "i64", "key": "i64", "one_minus_beta1": "fp64",
                 "beta2": "fp64", "one_minus_beta2": "fp64", "step_size": "fp64", "bc2_sqrt": "fp64", "eps": "fp64",
                 "lr_wd": "fp64"}
    for flag in ("BLOCK", "MODE", "CHANNEL", "SAMPLED", "HAS_WD", "AMSGRAD", "MAXIMIZE", "F64"):
        adamw_sig[flag] = "constexpr"
    for channel in (False, True):
        consts = dict(BLOCK=1024, MODE=int(Mode.AMSS_PLUS), CHANNEL=channel, SAMPLED=True, HAS_WD=True, AMSGRAD=True,
                      MAXIMIZE=False, F64=f64)
        specs.append((f"masked_adamw_{'channel' if channel else 'element'}", _masked_adamw_kernel, adamw_sig, consts))
    return specs


def _compile_in_process(arch: int, with_ptx: bool, prefix: str = "") -> dict:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", int(arch), 32)
    result = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for name, kernel, signature, constexprs in _compile_specs(dtype):
            if not name.startswith(prefix):
                continue
            src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"enable_fp_fusion": False})
            ptx = compiled.asm["ptx"]
            result[f"{name}[{tag}]"] = ptx if with_ptx else len(ptx)
    return result


def compile_for_gpu(arch: int, *, with_ptx: bool = False, prefix: str = "") -> dict:
    """Compile every kernel for ``GPUTarget("cuda", arch, 32)`` without a GPU, float32 and bfloat16
    variants. Returns ``{"<kernel>[<dtype>]": len(ptx)}`` (the PTX text itself with ``with_ptx``).
    ``prefix``: only the kernels whose name starts with it (``"masked_adamw"``: the AdamW kernel's).

    Under ``TRITON_INTERPRET=1`` the kernels are interpreter objects that cannot be compiled, so the
    compilation runs in a subprocess with ``TRITON_INTERPRET=0``.
    """
    ok, why = triton_available()
    if not ok:
        raise RuntimeError(f"compile_for_gpu: {why}")
    if isinstance(arch, bool) or not isinstance(arch, int) or arch < 50:
        raise ValueError(f"compile_for_gpu: arch must be an int compute capability such as 80 or 90, got {arch!r}")
    if not isinstance(prefix, str):
        raise ValueError(f"compile_for_gpu: prefix must be a str, got {prefix!r}")
    if not _interpreting():
        return _compile_in_process(arch, with_ptx, prefix)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="0")
    code = (
        "import json, sys\n"
        "from masked_optim.backends.triton_kernels import compile_for_gpu\n"
        f"res = compile_for_gpu({int(arch)}, with_ptx={bool(with_ptx)}, prefix={prefix!r})\n"
        "sys.stdout.write('\\n@@JSON@@' + json.dumps(res))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or "@@JSON@@" not in proc.stdout:
        raise RuntimeError(
            f"compile_for_gpu({arch}) failed in a TRITON_INTERPRET=0 subprocess (rc {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.rsplit("@@JSON@@", 1)[1])
