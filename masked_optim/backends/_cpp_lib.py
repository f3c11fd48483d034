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
# Lowers the hand-written CPU paths (read by the library when it loads; for tests and comparisons).
ISA_ENV = "MASKED_OPTIM_CPU_ISA"
ISA_CHOICES = ("avx512", "avx2", "generic")
# How the AVX-512 Philox forms the low words of its products (unset: by the CPU's vendor; csrc/cpu).
PHILOX_LOW_ENV = "MASKED_OPTIM_PHILOX_LOW"
PHILOX_LOW_CHOICES = ("mullo", "shuffle")
# Software prefetch distance of the streaming CPU passes, in bytes (unset: by the CPU's vendor).
PREFETCH_ENV = "MASKED_OPTIM_PREFETCH"


def _load() -> None:
    global _LOADED, _LIB, _REASON
    if _LOADED:
        return
    _LOADED = True
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _REASON = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        return
    isa = os.environ.get(ISA_ENV, "")
    if isa not in ("",) + ISA_CHOICES:
        _REASON = f"invalid {ISA_ENV}={isa!r}; allowed: one of {ISA_CHOICES} (or unset for the best this CPU supports)"
        return
    low = os.environ.get(PHILOX_LOW_ENV, "")
    if low not in ("",) + PHILOX_LOW_CHOICES:
        _REASON = f"invalid {PHILOX_LOW_ENV}={low!r}; allowed: one of {PHILOX_LOW_CHOICES} (or unset for the CPU's best)"
        return
    prefetch = os.environ.get(PREFETCH_ENV, "")
    if prefetch and not (prefetch.isdigit() and int(prefetch) <= 1 << 20):
        _REASON = f"invalid {PREFETCH_ENV}={prefetch!r}; allowed: a distance in bytes from 0 (none) to {1 << 20}"
        return
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        # The op schemas and fake kernels: declared before the library registers implementations.
        from . import _ops  # noqa: F401

        stale = _stale_build()
        if stale is not None:
            _REASON = stale
            return
        _LIB = importlib.import_module("masked_optim._C")
    except ImportError as exc:
        _REASON = (
            f"masked_optim._C is not built or does not load ({exc}); "
            "build it with `pip install --no-build-isolation -e .` after installing torch"
        )
        return


# A library built before the schemas moved to _ops.py defines them again with TORCH_LIBRARY, which
# the dispatcher refuses in a static initialiser: the process would abort on import.
_OLD_SCHEMA = b"masked_sgd_(Tensor(a!) param"


def _stale_build() -> str | None:
    """Why the built masked_optim._C must not be loaded (it predates _ops.py), or None."""
    import importlib.util
    import mmap

    try:
        spec = importlib.util.find_spec("masked_optim._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None  # the import below reports it
    try:
        with open(spec.origin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            found = m.find(_OLD_SCHEMA) != -1
    except (OSError, ValueError):
        return None
    if not found:
        return None
    return (
        f"{spec.origin} was built from older sources that define the op schemas in C++ (now declared in "
        "masked_optim/backends/_ops.py); loading it would abort the process. Rebuild it: "
        "`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`"
    )


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
