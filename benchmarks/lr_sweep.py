"""Choose each dataset's learning rate for joint training on the validation split (docs/algorithm.md §7).

For every dataset and learning rate, trains ``joint`` for a few seeds (and every fold) and prints the
mean validation accuracy of the fused head at its best epoch; the test split is never looked at.
The chosen rates are ``masked_optim.experiments.training.DATASET_DEFAULTS`` and are reused by every method.

    python benchmarks/lr_sweep.py --datasets mfeat:fac+zer watch --lrs 0.003 0.01 0.03 0.1 --seeds 2

``--optimizer adamw`` sweeps joint under AdamW (``MaskedMultiModalAdamW`` with ``mask="none"``, i.e.
torch.optim.AdamW; the chosen rates are ``DATASET_DEFAULTS[family]["lr_adamw"]``). Synthetic data sets
run every draw of ``--data-seeds`` (default 0,1: the development draws; the studies hold out 2,3).
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
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float, default=None, help="default: TrainConfig's")
    p.add_argument("--data-seeds", default="0,1", help="synthetic data draws (comma-separated; default %(default)s)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lr_sweep.json"))
    args = p.parse_args()
    rows = []
    draws_all = [int(d) for d in args.data_seeds.split(",") if d.strip()]
    extra = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}
    for dataset in args.datasets:
        draws = draws_all if dataset.startswith("synthetic") else [0]
        for lr in args.lrs:
            accs, epochs, start = [], [], time.perf_counter()
            for fold, draw in [(f, d) for f in range(num_folds(dataset)) for d in draws]:
                data = load_dataset(dataset, fold=fold, seed=draw)
                for seed in range(args.seeds):
                    r = train(TrainConfig(dataset=dataset, method="joint", lr=lr, seed=seed, fold=fold, data_seed=draw,
                                          epochs=args.epochs, probe=False, optimizer=args.optimizer, **extra), data)
                    accs.append(r["val"]["accuracy"])
                    epochs.append(r["best_epoch"])
            row = {"dataset": dataset, "optimizer": args.optimizer, "data_seeds": draws, "lr": lr, "val_accuracy_mean": statistics.mean(accs),
                   "val_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": len(accs),
                   "best_epochs": epochs, "seconds": time.perf_counter() - start}
            rows.append(row)
            _save(args, rows)
            print(f"{dataset:>16} lr {lr:<6g} val acc {100 * row['val_accuracy_mean']:.2f} ± {100 * row['val_accuracy_std']:.2f} "
                  f"({len(accs)} runs, best epochs {min(epochs)}-{max(epochs)}, {row['seconds']:.0f} s)", flush=True)
    _save(args, rows)
    print(f"wrote {args.out}")


def _save(args: argparse.Namespace, rows: list) -> None:
    """Write what is finished so far (after every row, atomically): a sweep that dies keeps its rows."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"date": datetime.date.today().isoformat(), "machine": machine()["cpu"], "torch": torch.__version__,
                   "optimizer": args.optimizer, "seeds": args.seeds, "rows": rows}, fh, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
