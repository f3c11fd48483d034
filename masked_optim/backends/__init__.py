"""Backend selection, in one place.

``"reference"`` is the pure-PyTorch step of :mod:`masked_optim.functional` and runs on every
device. ``"auto"`` picks the fastest implementation available for the tensors' device; until the
fused kernels land it is always the reference. The backend that actually ran is reported in
:meth:`MaskedMultiModalSGD.last_step_stats`.
"""

from __future__ import annotations

from . import _cpp_lib

__all__ = ["BACKENDS", "resolve_backend", "extension_available", "extension_unavailable_reason"]

BACKENDS = ("auto", "reference")

extension_available = _cpp_lib.available
extension_unavailable_reason = _cpp_lib.unavailable_reason


def resolve_backend(requested: str) -> str:
    """The implementation that runs for a requested backend name."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    return "reference"
