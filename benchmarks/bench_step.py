"""Optimizer-step microbenchmark (see masked_optim/benchmark.py for what is measured and how).

    python benchmarks/bench_step.py --sizes 1,10 --repeats 7
    python benchmarks/bench_step.py --sizes 100 --modes amss+ --granularities element --skip-reference

Prints a table (medians, 20th/80th percentiles, effective GB/s, ratio to torch.optim.SGD) and
saves JSON with the machine, versions and date under benchmarks/results/.
"""

import sys

from masked_optim.experiments.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_step.py"))
