"""Choose each dataset's learning rate for joint training on the validation split (docs/algorithm.md §7).

For every dataset and learning rate, trains ``joint`` for a few seeds (and every fold) and prints the
mean validation accuracy of the fused head at its best epoch; the test split is never looked at.
The chosen rates are ``masked_optim.experiments.training.DATASET_DEFAULTS`` and are reused by every method.

    python benchmarks/lr_sweep.py --datasets mfeat:fac+zer watch --lrs 0.003 0.01 0.03 0.1 --seeds 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from masked_optim.experiments.benchmark import machine
from masked_optim.experiments.data import load_dataset, num_folds
from masked_optim.experiments.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["mfeat:fac+zer", "mfeat:pix+mor", "mfeat:all", "watch"])
    p.add_argument("--lrs", nargs="+", type=float, default=[0.003, 0.01, 0.03, 0.1])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lr_sweep.json"))
    args = p.parse_args()
    rows = []
    for dataset in args.datasets:
        for lr in args.lrs:
            accs, epochs, start = [], [], time.perf_counter()
            for fold in range(num_folds(dataset)):
                data = load_dataset(dataset, fold=fold)
                for seed in range(args.seeds):
                    r = train(TrainConfig(dataset=dataset, method="joint", lr=lr, seed=seed, fold=fold, epochs=args.epochs, probe=False), data)
                    accs.append(r["val"]["accuracy"])
                    epochs.append(r["best_epoch"])
            row = {"dataset": dataset, "lr": lr, "val_accuracy_mean": statistics.mean(accs),
                   "val_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": len(accs),
                   "best_epochs": epochs, "seconds": time.perf_counter() - start}
            rows.append(row)
            print(f"{dataset:>16} lr {lr:<6g} val acc {100 * row['val_accuracy_mean']:.2f} ± {100 * row['val_accuracy_std']:.2f} "
                  f"({len(accs)} runs, best epochs {min(epochs)}-{max(epochs)}, {row['seconds']:.0f} s)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"date": datetime.date.today().isoformat(), "machine": machine()["cpu"],
                   "torch": torch.__version__, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
