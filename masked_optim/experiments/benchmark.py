"""Optimizer-step microbenchmark: torch.optim.SGD against MaskedMultiModalSGD, side by side.

The implementation behind ``benchmarks/bench_step.py`` and ``python -m masked_optim bench``.

Every provider steps the same parameters and gradients in one process; each measurement is the
wall time of ``optimizer.step()`` alone (gradients preset), repeated, reported as the median and
the 20th/80th percentiles. "GB/s" is the traffic of a fused masked step divided by the median:
per element, one read of the gradient for the per-tensor reduction, then one read each of
gradient, parameter and momentum and one write each of parameter and momentum (6 accesses).

    python benchmarks/bench_step.py                      # 1M and 10M fp32 parameters
    python benchmarks/bench_step.py --sizes 1 --repeats 3 --modes amss+
    python -m masked_optim bench                         # quick: 1M, amss+, element

Results are printed and saved as JSON (machine, versions, date) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch

from .. import __version__
from ..backends import _cpp_lib, backend_status
from ..optim import MaskedMultiModalSGD
from ..rng import derive_key


def tensor_mix(total: int) -> list[tuple[int, ...]]:
    """A realistic mix summing to about ``total`` elements: big matrices, convs, biases."""
    shapes = []
    big = total // 12
    for i in range(10):
        rows = 2 ** (9 + i % 3)
        shapes.append((rows, max(1, big // rows)))
    shapes.append((max(1, big // 288), 32, 3, 3))
    rest = total - sum(torch.Size(s).numel() for s in shapes)
    shapes.append((max(1, rest),))
    shapes += [(512,), (1024,), (7,)]
    return shapes


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def time_step(opt, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


class CompiledReference:
    """torch.compile of the reference step of one tensor (keys passed as tensors, so no recompiles)."""

    def __init__(self, params, mode, granularity, rate):
        from ..functional import masked_gradient

        self.params, self.rate, self.step_count = params, rate, 0
        self.bufs = [torch.zeros_like(p) for p in params]

        def one(p, g, b, key):
            gm, _ = masked_gradient(g, rate=rate, key=int(key), mask=mode, granularity=granularity)
            b.mul_(0.9).add_(gm)
            p.add_(b, alpha=-1e-3)

        self.fn = torch.compile(one, dynamic=True, fullgraph=False)

    def step(self):
        self.step_count += 1
        with torch.no_grad():
            for i, (p, b) in enumerate(zip(self.params, self.bufs)):
                self.fn(p, p.grad, b, derive_key(0, self.step_count, i))


def providers(mode: str, granularity: str, rate: float, device: torch.device, with_compile: bool):
    yield "torch.optim.SGD(foreach)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)
    yield "torch.optim.SGD(for-loop)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=False)

    def masked(backend):
        def build(ps):
            opt = MaskedMultiModalSGD(
                [{"params": ps, "modality": "m"}], lr=1e-3, momentum=0.9, mask=mode, granularity=granularity, backend=backend
            )
            opt.set_rates({"m": rate})
            return opt

        return build

    yield f"masked reference ({mode}, {granularity})", masked("reference")
    if with_compile:
        yield f"torch.compile(reference) ({mode}, {granularity})", lambda ps: CompiledReference(ps, mode, granularity, rate)
    for backend in ("cpp", "cuda", "triton"):
        reason = backend_status(backend, device)
        if reason is None and not (backend == "triton" and device.type != "cuda"):
            yield f"masked {backend} ({mode}, {granularity})", masked(backend)
        elif (mode, granularity) == ("uniform", "element"):
            print(f"# {backend}: skipped ({reason or 'Triton on CPU runs only in its interpreter: not timed'})")


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "masked_optim": __version__,
        "extension": _cpp_lib.available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,10", help="millions of parameters, comma separated")
    ap.add_argument("--modes", default="uniform,amss,amss+")
    ap.add_argument("--granularities", default="element,channel")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_step-<date>.json)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference step (slow to compile)")
    ap.add_argument("--skip-reference", action="store_true", help="do not time the (slow) pure-PyTorch reference")
    args = ap.parse_args(argv)

    info = machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"# {date}  {info['cpu']}  {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)")
    rows = []
    header = f"{'params':>7} {'tensors':>7}  {'provider':<40} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8} {'GB/s':>6} {'x SGD':>7}"
    print(header)
    for size in [float(s) for s in args.sizes.split(",")]:
        shapes = tensor_mix(int(size * 1e6))
        n = sum(torch.Size(s).numel() for s in shapes)
        seen = set()
        baseline = None
        for mode in args.modes.split(","):
            for gran in args.granularities.split(","):
                for name, build in providers(mode, gran, args.rate, torch.device("cpu"), args.compile):
                    if name in seen or (args.skip_reference and name.startswith("masked reference")):
                        continue
                    seen.add(name)
                    params = make_params(shapes)
                    try:
                        times = time_step(build(params), args.repeats, args.warmup)
                    except Exception as exc:  # a provider that cannot run here is reported, not fatal
                        print(f"# {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                        continue
                    med = statistics.median(times)
                    q = statistics.quantiles(times, n=5) if len(times) > 1 else [med] * 4
                    if name == "torch.optim.SGD(foreach)":
                        baseline = med
                    row = {
                        "params": n, "tensors": len(shapes), "provider": name, "mode": mode, "granularity": gran,
                        "rate": args.rate, "median_ms": med * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[-1] * 1e3,
                        "gb_per_s": 6 * 4 * n / med / 1e9, "ratio_to_sgd_foreach": med / baseline, "times_s": times,
                    }
                    rows.append(row)
                    print(
                        f"{n / 1e6:>6.1f}M {len(shapes):>7}  {name:<40} {row['median_ms']:>10.2f} {row['p20_ms']:>8.2f} "
                        f"{row['p80_ms']:>8.2f} {row['gb_per_s']:>6.1f} {row['ratio_to_sgd_foreach']:>7.1f}"
                    )
                    sys.stdout.flush()
    out = args.out or os.path.join("benchmarks", "results", f"bench_step-{date[:10]}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"date": date, "machine": info, "args": vars(args), "results": rows}, f, indent=1)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
