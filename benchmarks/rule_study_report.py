"""The rule study's cross-dataset table and figure (docs/results.md, "The rule study").

For every method: the paired difference from ``joint`` (± s.e.) of the fused head's test accuracy
and of the weak modality's slice accuracy, and the mean keep rates, on each dataset. Writes a
markdown table to stdout and a figure (two panels per dataset) next to the JSONs.

    python benchmarks/rule_study_report.py benchmarks/results/rule_study/{synthetic_xor,synthetic_parity3,mfeat_fac_zer,watch}.json
"""

from __future__ import annotations

import json
import os
import sys

from masked_optim.experiments.compare import summarise, validate_result

# The modality joint training under-uses on each dataset (docs/results.md, "Results on real and synthetic data").
WEAK = {"synthetic:xor": "b", "synthetic:parity3": "b", "mfeat:fac+zer": "zer", "watch": "gyro"}


def load(path: str) -> dict:
    with open(path) as fh:
        comparison = json.load(fh)
    validate_result(comparison)
    comparison["summary"] = summarise(comparison)
    return comparison


def cell(item: dict) -> str:
    if "diff_vs_joint" not in item:
        return "-"
    return f"{100 * item['diff_vs_joint']:+.1f} ± {100 * item['diff_se']:.1f}"


def main(paths: list[str]) -> None:
    comparisons = [load(p) for p in paths]
    methods = list(dict.fromkeys(m for c in comparisons for m in c["methods"]))
    header = ["method"] + [f"{c['dataset']} Δ fused / Δ {WEAK[c['dataset']]} slice / rates" for c in comparisons]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(comparisons))
    for method in methods:
        row = [f"`{method}`"]
        for c in comparisons:
            s = c["summary"].get(method)
            if s is None:
                row.append("")
                continue
            weak = WEAK[c["dataset"]]
            rates = "/".join(f"{s[f'rate:{m}']['mean']:.2f}" for m in c["modalities"] if f"rate:{m}" in s) or "-"
            acc = f"{100 * s['accuracy']['mean']:.1f}" if method == "joint" else cell(s["accuracy"])
            sl = f"{100 * s[f'slice:{weak}']['mean']:.1f}" if method == "joint" else cell(s[f"slice:{weak}"])
            row.append(f"{acc} / {sl} / {rates}")
        print("| " + " | ".join(row) + " |")
    runs = ", ".join(f"{c['dataset']} n={c['summary']['joint']['n']}" for c in comparisons)
    print(f"\njoint: absolute accuracies (%); others: paired difference from joint ± s.e. (points); runs per method: {runs}")
    plot(comparisons, methods, os.path.join(os.path.dirname(paths[0]), "rule_study.png"))


def plot(comparisons: list[dict], methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [m for m in methods if m != "joint"]
    fig, axes = plt.subplots(1, len(comparisons), figsize=(4.2 * len(comparisons), 4.6), squeeze=False, sharey=False)
    for ax, c in zip(axes[0], comparisons):
        weak = WEAK[c["dataset"]]
        ys = range(len(others))
        for offset, metric, color, label in ((-0.2, "accuracy", "tab:blue", "fused"), (0.2, f"slice:{weak}", "tab:orange", f"{weak} slice")):
            vals = [100 * c["summary"][m][metric].get("diff_vs_joint", float("nan")) if m in c["summary"] else float("nan") for m in others]
            errs = [100 * c["summary"][m][metric].get("diff_se", 0.0) if m in c["summary"] else 0.0 for m in others]
            ax.barh([y + offset for y in ys], vals, height=0.4, xerr=errs, color=color, label=label, capsize=2)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(others if ax is axes[0][0] else [""] * len(others), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(c["dataset_name"], fontsize=9)
        ax.set_xlabel("test accuracy vs joint (points)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
