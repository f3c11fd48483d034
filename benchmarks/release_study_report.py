"""The release study's tables and figure (docs/results.md, "The release study").

Reads the JSONs of ``benchmarks/run_release_study.sh`` (first argument) and the rule study's
(second argument: its joint and OGM-GE runs on watch, and its ratio-rule runs without release, as
``<method> (no release)``). Every method is paired with ``joint`` on (seed, fold, data draw);
differences are in points of test accuracy ± the s.e. of the paired difference.

Prints four markdown tables: the development runs (the rule study's seeds and draws) with the
issue's criteria checked, the sensitivity to ``release_at``, the held-out runs, and the joint
reproduction check. Writes ``release_study.png`` next to the JSONs.

    python benchmarks/release_study_report.py benchmarks/results/release_study benchmarks/results/rule_study
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from masked_optim.experiments.compare import summarise, validate_result
from rule_study_report import WEAK  # the modality joint training under-uses, per dataset (a sibling script)

SETTINGS = ("synthetic_xor", "synthetic_parity3", "mfeat_fac_zer", "watch")
DEFAULT = "scale@ratio"
NO_RELEASE = " (no release)"


def load(path: str) -> list[dict]:
    with open(path) as fh:
        comparison = json.load(fh)
    validate_result(comparison)
    return comparison["runs"]


def relabel(runs: list[dict], suffix: str, only: set[str] | None = None) -> list[dict]:
    out = []
    for run in runs:
        method = run["config"]["method"]
        if only is not None and method not in only:
            continue
        if method != "joint":
            run = {**run, "config": {**run["config"], "method": method + suffix}}
        out.append(run)
    return out


def table(groups: dict[str, list[dict]], methods: list[str], title: str) -> dict[str, dict]:
    """One markdown table: a column per group (dataset), a row per method."""
    summaries = {name: summarise({"runs": runs}) for name, runs in groups.items()}
    print(f"\n{title}\n")
    print("| method | " + " | ".join(f"{name}: Δ fused / Δ weak slice / rates / release epoch" for name in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for method in methods:
        row = [f"`{method}`"]
        for name, runs in groups.items():
            s = summaries[name].get(method)
            if s is None:
                row.append("")
                continue
            dataset = runs[0]["config"]["dataset"]
            weak = WEAK[dataset]
            mine = [r for r in runs if r["config"]["method"] == method]
            rates = "/".join(f"{s[k]['mean']:.2f}" for k in s if k.startswith("rate:"))
            released = [r.get("release_epoch") for r in mine]
            epoch = "-" if all(e is None for e in released) else (
                f"{statistics.mean(e for e in released if e is not None):.0f}"
                + ("" if None not in released else f" ({released.count(None)} never)"))
            if method == "joint":
                row.append(f"{100 * s['accuracy']['mean']:.1f} / {100 * s[f'slice:{weak}']['mean']:.1f} / - / - (n={s['n']})")
            else:
                acc, sl = s["accuracy"], s[f"slice:{weak}"]
                row.append(f"{100 * acc['diff_vs_joint']:+.2f} ± {100 * acc['diff_se']:.2f} / "
                           f"{100 * sl['diff_vs_joint']:+.1f} ± {100 * sl['diff_se']:.1f} / {rates} / {epoch}")
        print("| " + " | ".join(row) + " |")
    print("\njoint: absolute test accuracy (%) of the fused head and the weak modality's slice; others: paired "
          "difference from joint ± s.e. (points); rates: mean keep rate per modality; release epoch: mean first "
          "epoch at whose end the estimator was released")
    return summaries


def criteria(summaries: dict[str, dict]) -> None:
    """Issue 7's 'Done when' for the default configuration, on the development runs."""
    def d(name, method=DEFAULT):
        a = summaries[name][method]["accuracy"]
        return 100 * a["diff_vs_joint"], 100 * a["diff_se"]
    print("\nCriteria (default configuration = scale@ratio with release_at 0.2):")
    for name in ("synthetic_xor", "synthetic_parity3"):
        diff, se = d(name)
        print(f"- {name}: Δ {diff:+.2f} ± {se:.2f} = {diff / se:+.1f} s.e. (> 2 s.e.: {'MET' if diff > 2 * se else 'NOT MET'})")
    ours = statistics.mean(d(n)[0] for n in ("synthetic_xor", "synthetic_parity3"))
    ogm = statistics.mean(d(n, "ogm-ge")[0] for n in ("synthetic_xor", "synthetic_parity3"))
    print(f"- §8 average: {ours:+.2f} vs OGM-GE {ogm:+.2f} ({'MET' if ours > ogm else 'NOT MET'})")
    for name in ("mfeat_fac_zer", "watch"):
        diff, se = d(name)
        print(f"- {name}: Δ {diff:+.2f} ± {se:.2f} = {diff / se:+.1f} s.e. (no worse than -1 s.e.: {'MET' if diff >= -se else 'NOT MET'})")


def reproduction(new: list[dict], old: list[dict], name: str) -> None:
    """joint and OGM-GE of this study against the rule study's runs of the same seeds and draws."""
    def key(r):
        c = r["config"]
        return c["method"], c["seed"], c["fold"], c.get("data_seed", 0)
    before = {key(r): r["test"]["accuracy"] for r in old}
    pairs = [(r["test"]["accuracy"], before.get(key(r))) for r in new if r["config"]["method"] in ("joint", "ogm-ge")]
    same = sum(a == b for a, b in pairs)
    print(f"- {name}: {same} of {len(pairs)} joint / OGM-GE runs have the rule study's test accuracy exactly")


def main(out: str, rule_study: str) -> None:
    p = lambda *parts: os.path.join(*parts)  # noqa: E731
    dev = {}
    for name in SETTINGS[:3]:
        runs = load(p(out, f"{name}.json"))
        old = relabel(load(p(rule_study, f"{name}.json")), NO_RELEASE, {"uniform@ratio", "amss@ratio", "amss+@ratio", DEFAULT})
        dev[name] = runs + [r for r in old if r["config"]["method"] != "joint"]
    watch_old = load(p(rule_study, "watch.json"))
    dev["watch"] = (relabel(watch_old, "", {"joint", "ogm-ge"}) + load(p(out, "watch_scale.json"))
                    + [r for r in relabel(watch_old, NO_RELEASE, {DEFAULT}) if r["config"]["method"] != "joint"])
    methods = ["joint", "ogm-ge", *(f"{m}{s}" for m in ("uniform@ratio", "amss@ratio", "amss+@ratio", DEFAULT) for s in ("", NO_RELEASE))]
    summaries = table(dev, methods, "Development runs (the rule study's seeds and data draws; watch: 5 folds x 5 seeds)")
    criteria(summaries)

    sweep = {}
    for name in SETTINGS[:3]:
        runs = [r for r in load(p(out, f"{name}.json")) if r["config"]["method"] in ("joint", DEFAULT)]
        runs = relabel(runs, " release_at=0.2")
        for t in ("0.1", "0.3"):
            runs += [r for r in relabel(load(p(out, f"{name}_release{t}.json")), f" release_at={t}") if r["config"]["method"] != "joint"]
        runs += [r for r in relabel(load(p(rule_study, f"{name}.json")), " release_at=inf", {DEFAULT}) if r["config"]["method"] != "joint"]
        sweep[name] = runs
    table(sweep, ["joint", *(f"{DEFAULT} release_at={t}" for t in ("0.1", "0.2", "0.3", "inf"))],
          "Sensitivity to release_at (development runs)")

    held = {}
    for name in SETTINGS[:3]:
        held[name] = load(p(out, f"{name}_heldout.json")) + [
            r for r in relabel(load(p(out, f"{name}_heldout_norelease.json")), NO_RELEASE) if r["config"]["method"] != "joint"]
    held_summaries = table(held, ["joint", "ogm-ge", DEFAULT, DEFAULT + NO_RELEASE],
                           "Held-out runs (synthetic data draws 2-3 x 5 seeds; mfeat seeds 5-9)")

    print("\nReproduction check:")
    for name in SETTINGS[:3]:
        reproduction(load(p(out, f"{name}.json")), load(p(rule_study, f"{name}.json")), name)
    plot(summaries, held_summaries, p(out, "release_study.png"))


def plot(dev: dict[str, dict], held: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [("ogm-ge", "OGM-GE", "tab:gray"), (DEFAULT + NO_RELEASE, "scale@ratio, no release", "tab:orange"),
                (DEFAULT, "scale@ratio, release 0.2 (default)", "tab:blue")]
    panels = [(f"{n}", dev[n]) for n in dev] + [(f"{n} held-out", held[n]) for n in held]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, summary) in zip(axes[0], panels):
        for i, (method, label, color) in enumerate(variants):
            item = summary.get(method, {}).get("accuracy", {})
            ax.bar(i, 100 * item.get("diff_vs_joint", float("nan")), yerr=100 * item.get("diff_se", 0.0),
                   color=color, label=label, capsize=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks([])
        ax.set_title(title.replace("_", " "), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("fused test accuracy vs joint (points)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
