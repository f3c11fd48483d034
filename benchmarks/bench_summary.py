"""Several runs of bench_step.py side by side: each run's ratio to torch.optim.SGD(foreach), their
median and range, and the same for stage 1 against (g*g).sum() (masked_optim/experiments/benchmark.py).

    for i in 1 2 3; do python benchmarks/bench_step.py --sizes 10,100 --out /tmp/bench-$i.json; done
    python benchmarks/bench_summary.py /tmp/bench-1.json /tmp/bench-2.json /tmp/bench-3.json
"""

import sys

from masked_optim.experiments.benchmark import summary_main

if __name__ == "__main__":
    sys.exit(summary_main(prog="bench_summary.py"))
