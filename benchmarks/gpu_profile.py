"""Where a masked step's time goes on a GPU: per-step times with and without the non-finite check,
and torch.profiler tables (host and device time per op) over a few steps.

    python benchmarks/gpu_profile.py --size 10 --backends cuda,triton --modes scale,amss+

The step benchmark (bench_step.py --device cuda) says how long; this says why (kernel time, launch
count, host synchronisations).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from masked_optim import MaskedMultiModalSGD
from masked_optim.experiments.benchmark import make_params, tensor_mix


def timed(opt, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=10, help="millions of parameters")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--modes", default="scale,amss+")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("a CUDA device is needed")
    dev = torch.device("cuda")
    params = make_params(tensor_mix(int(args.size * 1e6)), dev)
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    timed(sgd, 3)
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M parameters; "
          f"torch.optim.SGD(foreach) {timed(sgd, args.steps):.3f} ms")
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            for nonfinite in ("raise", "ignore"):
                opt = MaskedMultiModalSGD([{"params": params, "modality": "m"}], lr=1e-3, momentum=0.9, mask=mode,
                                          backend=backend, nonfinite=nonfinite)
                opt.set_rates({"m": 0.5})
                timed(opt, 3)
                print(f"{backend} {mode} nonfinite={nonfinite}: {timed(opt, args.steps):.3f} ms")
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    opt.step()
                torch.cuda.synchronize()
            print(f"\n--- {backend} {mode} (nonfinite='ignore'), 3 steps: by host time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
            print(f"--- {backend} {mode}, 3 steps: by device time")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
