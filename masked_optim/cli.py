"""The ``masked-optim`` command line: ``demo``, ``env`` and ``bench``."""

from __future__ import annotations

import argparse
import platform
import sys
import warnings

__all__ = ["main", "environment"]


def environment() -> dict[str, str]:
    """Versions and which optional components are present, and why not."""
    import torch

    from . import __version__
    from .backends import _cpp_lib

    info = {
        "masked_optim": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch cuda": str(torch.version.cuda),
        "cuda available": str(torch.cuda.is_available()),
        "cpu threads": str(torch.get_num_threads()),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
    }
    if _cpp_lib.available():
        build = _cpp_lib.build_info()
        info["extension masked_optim._C"] = "built and loaded (" + ", ".join(f"{k}={v}" for k, v in build.items()) + ")"
    else:
        info["extension masked_optim._C"] = f"not available: {_cpp_lib.unavailable_reason()}"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not installed ({exc})"
    from .backends import backend_status, resolve_backend

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name in ("reference", "cpp", "cuda", "triton"):
        for device in devices:
            reason = backend_status(name, device)
            info[f"backend {name} on {device.type}"] = "usable" if reason is None else f"no: {reason}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for device in devices:
            info[f"backend='auto' on {device.type}"] = resolve_backend("auto", device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="masked-optim", description="Balanced multimodal learning with masked SGD.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on synthetic two-modality data, printing rates and kept fractions")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--mask", default="amss", choices=["none", "uniform", "amss", "amss+"])
    demo.add_argument("--granularity", default="element", choices=["element", "channel"])
    demo.add_argument("--setting", default="xor", choices=["xor", "parity3"])
    demo.add_argument("--n", type=int, default=5000, help="number of samples (60/20/20 split)")
    demo.add_argument("--no-baseline", action="store_true", help="skip the plain-SGD run for comparison")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("env", help="print versions and which backends are built and usable")
    sub.add_parser(
        "bench", help="time the optimizer step against torch.optim.SGD (quick default; --help for options)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .benchmark import main as bench_main

        quick = ["--sizes", "1", "--modes", "amss+", "--granularities", "element", "--repeats", "5"]
        return bench_main(quick + rest, prog="masked-optim bench")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        if args.epochs < 1:
            parser.error(f"--epochs must be >= 1, got {args.epochs}")
        from .demo import run_demo

        run_demo(
            epochs=args.epochs, mask=args.mask, granularity=args.granularity, n=args.n, setting=args.setting, seed=args.seed,
            baseline=not args.no_baseline,
        )
    elif args.command == "env":
        for key, value in environment().items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
