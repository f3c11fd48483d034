"""Loads the compiled extension ``masked_optim._C`` once, in one place.

A missing or broken extension is never an error at import time: the package falls back to the
pure-PyTorch reference. ``available()`` says whether it loaded and ``unavailable_reason()`` why not;
an explicit request for a compiled backend turns that reason into an error.
"""

from __future__ import annotations

import importlib
import os

_LOADED = False
_LIB = None
_REASON: str | None = None

DISABLE_ENV = "MASKED_OPTIM_DISABLE_EXTENSION"


def _load() -> None:
    global _LOADED, _LIB, _REASON
    if _LOADED:
        return
    _LOADED = True
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _REASON = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        return
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        _LIB = importlib.import_module("masked_optim._C")
    except ImportError as exc:
        _REASON = (
            f"masked_optim._C is not built or does not load ({exc}); "
            "build it with `pip install --no-build-isolation -e .` after installing torch"
        )
        return
    from . import _fake  # noqa: F401  (register fake kernels for torch.compile / meta tensors)


def available() -> bool:
    """True when the compiled extension loaded."""
    _load()
    return _LIB is not None


def unavailable_reason() -> str | None:
    """Why the compiled extension is not available, or None when it is."""
    _load()
    return _REASON


def build_info() -> dict[str, str]:
    """Compiler, flags and torch version the extension was built with (empty when absent)."""
    if not available():
        return {}
    import torch

    text = torch.ops.masked_optim.build_info()
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)
