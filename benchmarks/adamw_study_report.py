"""The AdamW study's table (docs/results.md, "The AdamW study").

Reads the JSONs of ``benchmarks/run_adamw_study.sh`` (first argument, default
``benchmarks/results/adamw_study``): per setting ``<name>_base`` (joint, OGM-GE), ``<name>_scale``
(scale@ratio, the default release), ``<name>_norelease`` (scale@ratio, ``release_at=inf``, shown as
``scale@ratio (no release)``) and, on the synthetic settings, ``<name>_masked`` (amss@ratio,
amss+@ratio, uniform@ratio); ``<name>_<part>_more`` adds seeds to a part (watch). Every method is paired with ``joint`` on (seed, fold, data draw);
differences are in points of test accuracy ± the s.e. of the paired difference. Missing parts are
left blank, so the report runs on a partial study. Prints a markdown table, the criteria of the
study (the default beats joint by > 2 s.e. on both synthetic settings and loses no more than 1 s.e.
on mfeat and watch), the lr chosen per dataset from ``lr_sweep_adamw.json``, and the wall times.

    python benchmarks/adamw_study_report.py benchmarks/results/adamw_study
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from masked_optim.experiments.compare import summarise, validate_result
from release_study_report import table  # the same table as the release study's (a sibling script)
from rule_study_report import WEAK  # the modality joint training under-uses, per dataset (a sibling script)

SETTINGS = ("synthetic_xor", "synthetic_parity3", "mfeat_fac_zer", "watch")
DEFAULT = "scale@ratio"
NO_RELEASE = DEFAULT + " (no release)"
METHODS = ["joint", "ogm-ge", DEFAULT, NO_RELEASE, "uniform@ratio", "amss@ratio", "amss+@ratio"]


def load(path: str) -> list[dict] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        comparison = json.load(fh)
    validate_result(comparison)
    runs = comparison["runs"]
    bad = {r["config"].get("optimizer", "sgd") for r in runs} - {"adamw"}
    if bad:
        raise ValueError(f"{path}: runs with optimizer {sorted(bad)}; this study is AdamW's")
    return runs


def setting_runs(out: str, name: str) -> tuple[list[dict], float]:
    runs, wall = [], 0.0
    for part in ("base", "scale", "norelease", "masked"):
        for suffix in ("", "_more"):  # _more: further seeds of the same part (watch seeds 2-4)
            got = load(os.path.join(out, f"{name}_{part}{suffix}.json"))
            if got is None:
                continue
            wall += sum(r["wall_time_s"] for r in got)
            if part == "norelease":
                got = [{**r, "config": {**r["config"], "method": NO_RELEASE}} for r in got]
            runs += got
    return runs, wall


def main(out: str = os.path.join(os.path.dirname(__file__), "results", "adamw_study")) -> None:
    groups, walls = {}, {}
    for name in SETTINGS:
        runs, walls[name] = setting_runs(out, name)
        if runs:
            groups[name] = runs
    summaries = table(groups, METHODS, "AdamW study (--optimizer adamw; held out: synthetic draws 2-3 x seeds 0-4, "
                      "mfeat seeds 5-9, watch 5 folds x seeds)")
    print(f"\nCriteria ({DEFAULT}, release_at 0.2, under AdamW):")
    for name in SETTINGS:
        s = summaries.get(name, {}).get(DEFAULT)
        if s is None:
            print(f"- {name}: not run")
            continue
        diff, se = 100 * s["accuracy"]["diff_vs_joint"], 100 * s["accuracy"]["diff_se"]
        z = diff / se if se > 0 else float("nan")
        if name.startswith("synthetic"):
            print(f"- {name}: Δ {diff:+.2f} ± {se:.2f} = {z:+.1f} s.e. (> 2 s.e.: {'MET' if diff > 2 * se else 'NOT MET'})")
        else:
            print(f"- {name}: Δ {diff:+.2f} ± {se:.2f} = {z:+.1f} s.e. (no worse than -1 s.e.: {'MET' if diff >= -se else 'NOT MET'})")

    for name in SETTINGS:
        for lr in ("0.001",):
            runs = load(os.path.join(out, f"{name}_lr{lr}.json"))
            if runs is None:
                continue
            s = summarise({"runs": runs})
            acc = s[DEFAULT]["accuracy"]
            print(f"\nlr {lr} ({name}): joint {100 * s['joint']['accuracy']['mean']:.1f}, {DEFAULT} "
                  f"{100 * acc['diff_vs_joint']:+.2f} ± {100 * acc['diff_se']:.2f} (n={s[DEFAULT]['n']})")

    sgd_reference(groups, os.path.join(os.path.dirname(os.path.abspath(out)), "release_study"),
                  os.path.join(os.path.dirname(os.path.abspath(out)), "rule_study"))

    sweep = os.path.join(out, "lr_sweep_adamw.json")
    if os.path.isfile(sweep):
        with open(sweep) as fh:
            rows = json.load(fh)["rows"]
        from masked_optim.experiments.training import DATASET_DEFAULTS

        print("\nlr sweep (joint, AdamW, validation accuracy %, mean ± std; * = lr_adamw, the one used; "
              "synthetic: one lr for both settings, the best mean):")
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            mine = [r for r in rows if r["dataset"] == dataset]
            used = DATASET_DEFAULTS[dataset.partition(":")[0]]["lr_adamw"]
            print(f"- {dataset}: " + ", ".join(
                f"{r['lr']:g} {100 * r['val_accuracy_mean']:.2f} ± {100 * r['val_accuracy_std']:.2f}" + ("*" if r["lr"] == used else "")
                for r in mine) + f" ({mine[0]['runs']} runs each)")
    print("\nwall time (training, sum over runs): " + ", ".join(f"{n} {walls[n]:.0f} s" for n in SETTINGS if walls.get(n)))


def sgd_reference(groups: dict[str, list[dict]], release: str, rule: str) -> None:
    """AdamW's joint against SGD's joint and SGD's default (scale@ratio) on the same runs: the release
    study's held-out JSONs (same draws, seeds, folds), watch from the rule and release studies."""
    files = {
        "synthetic_xor": [os.path.join(release, "synthetic_xor_heldout.json")],
        "synthetic_parity3": [os.path.join(release, "synthetic_parity3_heldout.json")],
        "mfeat_fac_zer": [os.path.join(release, "mfeat_fac_zer_heldout.json")],
        "watch": [os.path.join(rule, "watch.json"), os.path.join(release, "watch_scale.json")],
    }

    def key(r):
        c = r["config"]
        return c["seed"], c["fold"], c.get("data_seed", 0)

    print("\nAdamW joint vs SGD (the same data, seeds, folds; SGD from the release / rule studies; points ± s.e.):")
    for name, runs in groups.items():
        adamw = {key(r): r["test"]["accuracy"] for r in runs if r["config"]["method"] == "joint"}
        sgd: dict[str, dict] = {"joint": {}, DEFAULT: {}}
        for path in files[name]:
            if not os.path.isfile(path):
                continue
            with open(path) as fh:
                for r in json.load(fh)["runs"]:
                    if r["config"]["method"] in sgd and r["config"].get("optimizer", "sgd") == "sgd":
                        sgd[r["config"]["method"]][key(r)] = r["test"]["accuracy"]
        parts = []
        for method, accs in sgd.items():
            keys = sorted(k for k in adamw if k in accs)
            if len(keys) < 2:
                continue
            d = [100 * (adamw[k] - accs[k]) for k in keys]
            parts.append(f"vs SGD {method} ({100 * statistics.mean(accs[k] for k in keys):.1f}): "
                         f"{statistics.mean(d):+.2f} ± {statistics.stdev(d) / len(d) ** 0.5:.2f} (n={len(d)})")
        print(f"- {name}: AdamW joint {100 * statistics.mean(adamw.values()):.1f}; " + "; ".join(parts))


if __name__ == "__main__":
    main(*sys.argv[1:])
