"""Optimizer-step microbenchmark (masked_optim/experiments/benchmark.py says what is measured and how).

    python benchmarks/bench_step.py                      # 1M and 10M fp32 parameters, every mode
    python benchmarks/bench_step.py --sizes 100
    python benchmarks/bench_step.py --device cuda --sizes 10,100

Prints, per size, every provider (torch.optim.SGD foreach and for-loop, each mode of each fused
backend, (g*g).sum()) interleaved in one process: medians and 20th/80th percentiles of single-step
times, ratios to SGD, and the split of each masked step (stage 1, update). Saves JSON with the
machine, versions, date and every time under benchmarks/results/; benchmarks/bench_summary.py
summarises several runs.
"""

import sys

from masked_optim.experiments.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_step.py"))
