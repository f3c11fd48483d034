"""Optimizer-step microbenchmark: torch.optim.SGD / AdamW against MaskedMultiModalSGD / AdamW, side by side.

The implementation behind ``benchmarks/bench_step.py`` and ``python -m masked_optim bench``.

What is timed, per size (a realistic mix of fp32 tensors, momentum 0.9, one modality at ``--rate``):

* ``torch.optim.SGD(momentum=0.9)``, ``foreach=True`` (the baseline of every ratio) and the
  for-loop (``foreach=False``);
* ``MaskedMultiModalSGD`` on each fused backend that runs on ``--device`` (and the pure-PyTorch
  reference with ``--reference``), for every mode: ``scale`` (no granularity), and ``uniform``,
  ``amss``, ``amss+`` at element and channel granularity;
* with ``--optimizer adamw``: ``torch.optim.AdamW`` (foreach, the baseline, for-loop and fused) against
  ``MaskedMultiModalAdamW`` in the same modes (default hyperparameters, no momentum option);
* the split of each masked step: **stage 1**, everything before the first parameter is written
  (routing, per-tensor scalars and water-filling, the non-finite check and its verdict), timed on
  its own; the update is the step minus stage 1;
* ``(g*g).sum()`` of the same gradients, the yardstick of stage 1 (one memory-bound reduction).

Every provider steps the same parameters and gradients (shared, so that the memory each one
touches is the same), and each has its own momentum buffers. The measurement is **interleaved**:
each repeat times one step of every provider, in an order rotated from repeat to repeat, so that
the machine's drift (other tenants, clocks) falls on all of them alike. Reported: median and
20th/80th percentiles of ``--repeats`` (default 15) single-step wall times after ``--warmup``
untimed steps, and the ratio of medians to ``SGD(foreach)`` and to ``SGD(for-loop)``. On CUDA each
step is bracketed by ``torch.cuda.synchronize()``.

    python benchmarks/bench_step.py                          # 1M and 10M fp32 parameters
    python benchmarks/bench_step.py --sizes 100 --repeats 15
    python benchmarks/bench_step.py --device cuda --sizes 10,100
    python -m masked_optim bench                             # quick: 1M, every mode
    python benchmarks/bench_summary.py benchmarks/results/bench_step-*.json   # several runs

Results are printed and saved as JSON (machine, versions, date, every time) under
``benchmarks/results/``.
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
from typing import Callable, Optional

import torch

from .. import __version__
from ..backends import _cpp_lib, backend_status
from ..backends.dispatch import prepare
from ..modes import Mode
from ..adamw import MaskedMultiModalAdamW
from ..optim import MaskedMultiModalSGD
from ..rng import derive_key

BASELINE = "torch.optim.SGD(foreach)"
LOOP = "torch.optim.SGD(for-loop)"
# per --optimizer: (baseline name, for-loop name, torch class, masked class, keyword arguments of both)
OPTIMIZERS = {
    "sgd": (BASELINE, LOOP, torch.optim.SGD, MaskedMultiModalSGD, {"lr": 1e-3, "momentum": 0.9}),
    "adamw": ("torch.optim.AdamW(foreach)", "torch.optim.AdamW(for-loop)", torch.optim.AdamW, MaskedMultiModalAdamW,
              {"lr": 1e-3}),
}
SUMSQ = "(g*g).sum() of the same gradients"


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


def make_params(shapes, device, seed=0):
    """Parameters and Gaussian gradients, drawn on the CPU (the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=gen).to(device)
        params.append(p)
    return params


class Stage1:
    """Stage 1 of a masked optimizer's step, alone: what ``step()`` does before it writes anything
    (gather the groups, route, run each backend's preparation, decide the non-finite verdict)."""

    def __init__(self, opt: MaskedMultiModalSGD) -> None:
        self.opt = opt

    def step(self) -> None:
        opt, batches, reducers, index = self.opt, [], {}, 0
        for gi, group in enumerate(opt.param_groups):
            batches.append(opt._init_group(gi, group, index, {}, reducers))
            index += len(group["params"])
        probes = prepare(batches, opt._resolve, check=opt.nonfinite != "ignore")
        if opt._nonfinite_verdict(batches, probes) is not None:
            raise RuntimeError("the benchmark's gradients are finite: the verdict should be None")


class SumOfSquares:
    """``(g*g).sum()`` of every gradient, the yardstick of stage 1."""

    def __init__(self, params) -> None:
        self.grads = [p.grad for p in params]

    def step(self) -> None:
        for g in self.grads:
            (g * g).sum()


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


def mode_grid(modes: list[str], granularities: list[str]) -> list[tuple[str, str]]:
    """(mask, granularity) pairs to time: ``scale`` once (it has no granularity), others per granularity."""
    allowed = {m.mask for m in Mode if m is not Mode.DENSE}
    grid = []
    for mode in modes:
        if mode not in allowed:
            raise ValueError(f"Invalid --modes entry: {mode!r}; allowed: {sorted(allowed)}")
        for gran in (["element"] if mode == "scale" else granularities):
            if gran not in ("element", "channel"):
                raise ValueError(f"Invalid --granularities entry: {gran!r}; allowed: element, channel")
            grid.append((mode, gran))
    return grid


def label(backend: str, mode: str, gran: str) -> str:
    return f"masked {backend} ({mode})" if mode == "scale" else f"masked {backend} ({mode}, {gran})"


def fused_backends(device: torch.device, optimizer: str = "sgd") -> list[str]:
    """The fused backends that run ``optimizer``'s step on ``device`` here (Triton on a CPU runs only
    in its interpreter: not timed)."""
    out = []
    for backend in ("cpp", "cuda", "triton"):
        reason = backend_status(backend, device, optimizer)
        if reason is None and not (backend == "triton" and device.type != "cuda"):
            out.append(backend)
        else:
            print(f"# {backend}: not timed ({reason or 'Triton on a CPU runs only in its interpreter'})")
    return out


def providers(params, grid, rate: float, device: torch.device, backends: list[str], reference: bool,
              with_compile: bool, optimizer: str = "sgd") -> list[tuple[str, dict, object]]:
    """``(name, description, object with .step())`` for every provider of one size."""
    base, loop, torch_cls, masked_cls, kw = OPTIMIZERS[optimizer]
    out = [
        (base, {"kind": "sgd"}, torch_cls(params, foreach=True, **kw)),
        (loop, {"kind": "sgd"}, torch_cls(params, foreach=False, **kw)),
        (SUMSQ, {"kind": "sumsq"}, SumOfSquares(params)),
    ]
    if optimizer == "adamw":  # torch's fused AdamW kernel (one pass, CPU and CUDA): the fastest torch step
        out.insert(2, ("torch.optim.AdamW(fused)", {"kind": "sgd"}, torch_cls(params, fused=True, **kw)))
    for mode, gran in grid:
        for backend in backends + (["reference"] if reference else []):
            opt = masked_cls([{"params": params, "modality": "m"}], mask=mode, granularity=gran, backend=backend, **kw)
            opt.set_rates({"m": rate})
            desc = {"kind": "step", "backend": backend, "mode": mode, "granularity": gran}
            out.append((label(backend, mode, gran), desc, opt))
            if backend != "reference":
                out.append((f"  stage 1 of {label(backend, mode, gran)}", dict(desc, kind="stage1"), Stage1(opt)))
        if with_compile and optimizer == "sgd":
            out.append((f"torch.compile(reference) ({mode}, {gran})", {"kind": "compile", "mode": mode, "granularity": gran},
                        CompiledReference(params, mode, gran, rate)))
    return out


def run_interleaved(provs, repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Single-step wall times of every provider, interleaved (order rotated every repeat)."""
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    failed: dict[str, str] = {}
    for name, _, obj in provs:
        try:
            for _ in range(warmup):
                obj.step()
            sync()
        except Exception as exc:  # a provider that cannot run here is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"# {name.strip()}: failed: {failed[name]}")
    live = [(n, o) for n, _, o in provs if n not in failed]
    times: dict[str, list[float]] = {n: [] for n, _ in live}
    for r in range(repeats):
        k = r % len(live)
        for name, obj in live[k:] + live[:k]:
            sync()
            t0 = time.perf_counter()
            obj.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [med] * 4
    return {"median_ms": med * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[-1] * 1e3}


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def machine(device: torch.device = torch.device("cpu")) -> dict:
    """Where a benchmark ran. A VM's model name can stay the same ("AMD EPYC") while the host under
    it changes generation, so the CPU family and model numbers are recorded too (e.g. family 25 is
    AMD Zen 3/4, 26 is Zen 5)."""
    info_cpu = _cpuinfo()
    cpu = info_cpu.get("model name") or platform.processor()
    info = {
        "cpu": cpu,
        "cpu_family": info_cpu.get("cpu family", ""),
        "cpu_model": info_cpu.get("model", ""),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "masked_optim": __version__,
        "extension": _cpp_lib.available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,10", help="millions of parameters, comma separated (default 1,10)")
    ap.add_argument("--modes", default="scale,uniform,amss,amss+", help="masks to time (default: every one)")
    ap.add_argument("--granularities", default="element,channel")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=15, help="timed steps per provider (default 15)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_step-<date>.json)")
    ap.add_argument("--reference", action="store_true", help="also time the (slow) pure-PyTorch reference backend")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference SGD step (slow to compile)")
    ap.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS),
                    help="sgd: torch.optim.SGD(momentum=0.9) vs MaskedMultiModalSGD (default); adamw: torch.optim.AdamW vs MaskedMultiModalAdamW")
    return ap


def main(argv=None, prog=None) -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if not 0 < args.rate <= 1:
        ap.error(f"--rate must be in (0, 1], got {args.rate}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device must be cpu, or cuda where a GPU is visible; got {args.device!r}")
    try:
        grid = mode_grid(args.modes.split(","), args.granularities.split(","))
        sizes = [float(s) for s in args.sizes.split(",")]
    except ValueError as exc:
        ap.error(str(exc))

    info = machine(device)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    family = f" (family {info['cpu_family']} model {info['cpu_model']})" if info["cpu_family"] else ""
    where = info.get("gpu", f"{info['cpu']}{family}, {info['cores']} cores")
    print(f"# {date}  {where}  torch {info['torch']} ({info['torch_threads']} threads), device {device}")
    what = "momentum 0.9" if args.optimizer == "sgd" else "AdamW defaults"
    print(f"# interleaved single steps: {args.repeats} repeats after {args.warmup} warm-up, rate {args.rate}, {what}")
    backends = fused_backends(device, args.optimizer)
    baseline, loop_name = OPTIMIZERS[args.optimizer][:2]
    rows = []
    for size in sizes:
        shapes = tensor_mix(int(size * 1e6))
        params = make_params(shapes, device)
        n = sum(p.numel() for p in params)
        provs = providers(params, grid, args.rate, device, backends, args.reference, args.compile, args.optimizer)
        times = run_interleaved(provs, args.repeats, args.warmup, device)
        base, loop = statistics.median(times[baseline]), statistics.median(times[loop_name])
        print(f"\n{n / 1e6:.1f}M parameters in {len(shapes)} tensors")
        print(f"{'provider':<50} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8} {'x foreach':>10} {'x loop':>7}")
        for name, desc, _ in provs:
            if name not in times:
                continue
            row = {"params": n, "tensors": len(shapes), "provider": name.strip(), **desc, "rate": args.rate,
                   **summarize(times[name]), "times_s": times[name]}
            row["ratio_to_sgd_foreach"] = row["median_ms"] / (base * 1e3)
            row["ratio_to_sgd_loop"] = row["median_ms"] / (loop * 1e3)
            rows.append(row)
            print(f"{name:<50} {row['median_ms']:>10.2f} {row['p20_ms']:>8.2f} {row['p80_ms']:>8.2f} "
                  f"{row['ratio_to_sgd_foreach']:>10.2f} {row['ratio_to_sgd_loop']:>7.2f}")
        # The split of each fused step: stage 1 against one sum of squares, and the update.
        sumsq = statistics.median(times[SUMSQ]) if SUMSQ in times else float("nan")
        split = [(name, desc) for name, desc, _ in provs if desc["kind"] == "step" and f"  stage 1 of {name}" in times]
        if split:
            print(f"\n{'where the time goes':<50} {'stage 1 ms':>10} {'x (g*g).sum()':>14} {'update ms':>10}")
        for name, desc in split:
            s1 = statistics.median(times[f"  stage 1 of {name}"])
            upd = statistics.median(times[name]) - s1
            rows.append({"params": n, "provider": name, **dict(desc, kind="split"), "stage1_ms": s1 * 1e3,
                         "stage1_over_sumsq": s1 / sumsq, "update_ms": upd * 1e3})
            print(f"{name:<50} {s1 * 1e3:>10.2f} {s1 / sumsq:>14.2f} {upd * 1e3:>10.2f}")
        sys.stdout.flush()
        del provs, params
    stem = "bench_step" if args.optimizer == "sgd" else f"bench_step-{args.optimizer}"
    out = args.out or os.path.join("benchmarks", "results", f"{stem}-{date[:10]}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"schema": "masked_optim.bench_step/2", "date": date, "machine": info, "args": vars(args),
                   "results": rows}, f, indent=1)
    print(f"saved {out}")
    return 0


def summarize_runs(paths: list[str]) -> list[dict]:
    """Several runs of this script (their JSON files) side by side: per size and provider, each
    run's ratio of medians to ``SGD(foreach)``, their median and range; the same for the ratio of
    stage 1 to ``(g*g).sum()``. Every file must come from the same machine and arguments."""
    if len(paths) < 2:
        raise ValueError(f"Invalid paths: {paths!r}; allowed: two or more JSON files of bench_step.py")
    runs = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        if run.get("schema") != "masked_optim.bench_step/2":
            raise ValueError(f"Invalid file {path!r}: schema {run.get('schema')!r}; allowed: 'masked_optim.bench_step/2'")
        runs.append(run)
    keys = ("sizes", "modes", "granularities", "rate", "repeats", "device", "optimizer")
    for path, run in zip(paths[1:], runs[1:]):
        if any(run["args"].get(k, "sgd") != runs[0]["args"].get(k, "sgd") for k in keys) or any(
            run["machine"].get(k) != runs[0]["machine"].get(k) for k in ("cpu", "cpu_family", "cpu_model")
        ):
            raise ValueError(f"Invalid file {path!r}: other arguments or machine than {paths[0]!r}")
    table: dict[tuple, dict] = {}
    for run in runs:
        for row in run["results"]:
            key = (row["params"], row["provider"], row["kind"])
            entry = table.setdefault(key, {"params": row["params"], "provider": row["provider"], "kind": row["kind"],
                                           "medians_ms": [], "ratios": []})
            if row["kind"] == "split":
                entry["medians_ms"].append(row["stage1_ms"])
                entry["ratios"].append(row["stage1_over_sumsq"])
            else:
                entry["medians_ms"].append(row["median_ms"])
                entry["ratios"].append(row["ratio_to_sgd_foreach"])
    out = []
    for entry in table.values():
        entry["median_ratio"] = statistics.median(entry["ratios"])
        entry["min_ratio"], entry["max_ratio"] = min(entry["ratios"]), max(entry["ratios"])
        out.append(entry)
    return out


def summary_main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Summarise several runs of bench_step.py (JSON files).")
    ap.add_argument("paths", nargs="+", help="two or more JSON files written by bench_step.py")
    args = ap.parse_args(argv)
    try:
        rows = summarize_runs(args.paths)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        ap.error(str(exc))
    print(f"# {len(args.paths)} runs: {', '.join(os.path.basename(p) for p in args.paths)}")
    for params in sorted({r["params"] for r in rows}):
        print(f"\n{params / 1e6:.1f}M parameters: x the torch optimizer's foreach step, per run, median [min, max]")
        for r in rows:
            if r["params"] == params and r["kind"] in ("sgd", "step", "sumsq"):
                per = " ".join(f"{x:.2f}" for x in r["ratios"])
                print(f"{r['provider']:<50} {per:<20} {r['median_ratio']:.2f} [{r['min_ratio']:.2f}, {r['max_ratio']:.2f}]")
        print(f"stage 1 / (g*g).sum(), per run, median [min, max]")
        for r in rows:
            if r["params"] == params and r["kind"] == "split":
                per = " ".join(f"{x:.2f}" for x in r["ratios"])
                print(f"{r['provider']:<50} {per:<20} {r['median_ratio']:.2f} [{r['min_ratio']:.2f}, {r['max_ratio']:.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
