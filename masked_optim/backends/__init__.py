"""Backend selection, in one place.

Implementations of the masked step, all computing docs/algorithm.md §2 with the Philox stream of docs/algorithm.md §4:

* ``"reference"``: the pure-PyTorch single-tensor step of :mod:`masked_optim.functional`; every
  device, every option (the only one with ``sampler="multinomial"``).
* ``"cpp"``: the fused C++ kernel ``torch.ops.masked_optim.masked_sgd_`` on CPU tensors.
* ``"cuda"``: the same op's CUDA kernel, when the extension was built with CUDA.
* ``"triton"``: Triton kernels on CUDA tensors, when triton is installed (on CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the tests run them without a GPU).

``"auto"`` picks, per parameter group and device, ``cuda > triton > reference`` on GPU tensors and
``cpp > reference`` on CPU tensors; a fallback to the reference warns once. An explicit backend that
cannot run raises :class:`BackendUnavailable` with the reason. The backend that ran is reported by
:meth:`MaskedMultiModalSGD.last_step_stats`.

The kernel contract (one call per tensor)::

    masked_sgd_(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, mode,
                channel, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
        -> (kept units: int64 0-d tensor, [alpha, beta])

updates ``param`` and ``momentum_buffer`` in place (contiguous, same dtype; the buffer is an empty
tensor when ``momentum == 0`` and is written as ``b = d`` when ``first_step``). ``mode`` is 0 dense,
1 uniform, 2 uniform unbiased, 3 amss, 4 amss+, 5 scale. ``scores`` (per-unit importance) and ``scalars``
(``[alpha, beta]`` with ``q = min(1, alpha s + beta)``) are computed by the kernel when ``None``;
tests pass the reference's to compare masks bit for bit.

Mode 5 (``mask="scale"``) samples nothing and draws no random numbers: ``g~ = rate * g`` (the
product rounded once in the compute dtype), then the same SGD update. ``scores``, ``scalars``,
``key``, ``smoothing``, ``max_iter`` and ``channel`` are ignored; it returns ``N`` kept units (every
unit of the requested granularity) and ``[alpha, beta] = [0, 1]`` (``q = 1``), as the dense mode.

:mod:`masked_optim.backends.dispatch` runs a param group's step on these backends:
:func:`~masked_optim.backends.dispatch.prepare` picks each tensor's backend and runs its
preparation (the cpp backend's stage 1 ``torch.ops.masked_optim.tensor_scalars_multi``, one call
per group, whose sums of ``g**2`` double as the non-finite check), then
:func:`~masked_optim.backends.dispatch.masked_sgd_step` runs the kernels (the cpp backend's
``masked_sgd_multi_``: the contract below for a list of tensors, docs/backends.md).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from ..modes import Mode
from . import _cpp_lib

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "MODE_CODES",
    "SHARDED_BACKENDS",
    "backend_status",
    "resolve_backend",
    "kernel_for",
    "adamw_kernel_for",
    "OPTIMIZERS",
    "extension_available",
    "extension_unavailable_reason",
    "GroupTensors",
    "prepare",
    "masked_sgd_step",
    "masked_adamw_step",
]

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
FUSED = ("cpp", "cuda", "triton")
# The backends that can update sharded (DTensor, FSDP) parameters: only the reference takes a global unit offset.
SHARDED_BACKENDS = ("auto", "reference")
# (mask, unbiased) -> kernel mode of the masked modes; kept for compatibility, use masked_optim.modes.Mode.
MODE_CODES = {(m.mask, m.unbiased): int(m) for m in Mode if m is not Mode.DENSE}

extension_available = _cpp_lib.available
extension_unavailable_reason = _cpp_lib.unavailable_reason


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


OPTIMIZERS = ("sgd", "adamw")  # the update rules the kernels implement: masked_sgd_ and masked_adamw_


def _has_kernel(dispatch_key: str, op: str = "sgd") -> bool:
    return _cpp_lib.available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"masked_optim::masked_{op}_", dispatch_key)


def _triton_status(op: str = "sgd") -> Optional[str]:
    try:
        from . import triton_kernels  # noqa: PLC0415  (imports triton lazily)
    except ImportError as exc:  # pragma: no cover - the module guards its own triton import
        return f"masked_optim.backends.triton_kernels does not import: {exc}"
    ok, reason = triton_kernels.triton_available()
    if ok and not hasattr(triton_kernels, f"masked_{op}_triton_"):
        return f"the Triton kernels have no masked_{op}_ step yet"
    return None if ok else reason


def backend_status(name: str, device: torch.device, op: str = "sgd") -> Optional[str]:
    """None when backend ``name`` can run ``op``'s step (``"sgd"`` or ``"adamw"``) on ``device``, else
    the reason it cannot."""
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type} tensors"
        if not _cpp_lib.available():
            return _cpp_lib.unavailable_reason()
        if not _has_kernel("CPU", op):
            return f"masked_optim._C was built without the CPU masked_{op}_ kernel; rebuild the package"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type} tensors"
        if not _cpp_lib.available():
            return _cpp_lib.unavailable_reason()
        if not _has_kernel("CUDA"):
            return "masked_optim._C was built without CUDA (needs a CUDA build of torch and nvcc at install time)"
        if not _has_kernel("CUDA", op):
            return f"masked_optim._C was built without the CUDA masked_{op}_ kernel; rebuild the package"
        return None
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            return f"the triton backend runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got {device.type} tensors"
        return _triton_status(op)
    raise ValueError(f"Invalid backend: {name!r}; allowed: one of {BACKENDS}")


_WARNED: set = set()


def resolve_backend(requested: str, device: torch.device, sampler: str = "poisson", op: str = "sgd") -> str:
    """The backend that runs ``op``'s step (``"sgd"`` or ``"adamw"``) for ``requested`` on ``device``
    (raises if an explicit one cannot)."""
    if requested not in BACKENDS:
        raise ValueError(f"Invalid backend: {requested!r}; allowed: one of {', '.join(map(repr, BACKENDS))}")
    if sampler != "poisson":
        if requested in FUSED:
            raise BackendUnavailable(
                f"backend={requested!r} cannot run sampler={sampler!r}: the multinomial sampler is "
                "implemented by the reference backend only; use backend='reference' or 'auto'"
            )
        return "reference"
    if requested != "auto":
        reason = backend_status(requested, device, op)
        if reason is not None:
            raise BackendUnavailable(f"backend={requested!r} is unavailable: {reason}")
        return requested
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpp",) if device.type == "cpu" else ()
    reasons = []
    for name in candidates:
        reason = backend_status(name, device, op)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    if candidates and (device.type, op) not in _WARNED:
        _WARNED.add((device.type, op))
        warnings.warn(
            f"masked_optim: no fused {op} backend for {device.type} tensors ({'; '.join(reasons)}); "
            "using the pure-PyTorch reference, which is correct but much slower",
            stacklevel=3,
        )
    return "reference"


def kernel_for(name: str) -> Callable:
    """The per-tensor kernel of a fused backend (the contract above)."""
    if name in ("cpp", "cuda"):
        return torch.ops.masked_optim.masked_sgd_
    if name == "triton":
        from .triton_kernels import masked_sgd_triton_

        return masked_sgd_triton_
    raise ValueError(f"Invalid fused backend: {name!r}; allowed: one of {FUSED}")


def adamw_kernel_for(name: str) -> Callable:
    """The per-tensor lazy AdamW kernel of a fused backend (``masked_optim::masked_adamw_``'s contract,
    masked_optim/backends/_ops.py ``MASKED_ADAMW_ARGS``; docs/algorithm.md §2.8): the op itself for
    cpp and cuda (dispatched on the tensors' device), :func:`.triton_kernels.masked_adamw_triton_` for
    triton. Same masks as :func:`kernel_for`'s kernel for the same key."""
    if name in ("cpp", "cuda"):
        return torch.ops.masked_optim.masked_adamw_
    if name == "triton":
        from .triton_kernels import masked_adamw_triton_

        return masked_adamw_triton_
    raise ValueError(f"Invalid fused backend: {name!r}; allowed: one of {FUSED}")


from .dispatch import GroupTensors, masked_adamw_step, masked_sgd_step, prepare  # noqa: E402  (dispatch uses the names above)
