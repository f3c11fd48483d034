"""The fusion study's tables (docs/results.md, "The fusion study").

Reads the JSONs of ``benchmarks/run_fusion_study.sh`` (first argument, default
``benchmarks/results/fusion_study``): per setting (``synthetic_xor``, ``synthetic_parity3``,
``watch``) and configuration (``concat_slices``, ``concat_probes``, ``attention_probes``) one compare
of ``joint`` and the default ``scale@ratio``; ``attention_probes_modality`` (the attention model's
token projections rebalanced with their modality, ``--fusion-params modality``) has the default
only, paired with ``attention_probes``' joint. Prints

1. the default against joint in each configuration (paired by seed, fold and data draw, within one
   file): Δ test accuracy ± s.e., that in s.e., Δ of the weak modality's per-modality accuracy (the
   head's slice, or under the probe signal the probe's), mean rates, mean release epoch;
2. paired comparisons across configurations: the probe signal against the slice signal (concat,
   default), the attention model against the concat model (joint, and default vs default);
3. the issue's criterion: where the slice-based default wins or ties against joint (Δ > -1 s.e.),
   the probe-signal default (concat and attention) does not lose against its joint by > 1 s.e.

Missing parts are left blank, so the report runs on a partial study.

    python benchmarks/fusion_study_report.py benchmarks/results/fusion_study
"""

from __future__ import annotations

import os
import statistics
import sys

from masked_optim.experiments.metrics import paired_difference
from release_study_report import load as read_runs  # a sibling script: read and validate a compare JSON

SETTINGS = {"synthetic_xor": ("synthetic:xor", "b"), "synthetic_parity3": ("synthetic:parity3", "b"), "watch": ("watch", "gyro")}
CONFIGS = {"concat_slices": "concat, slice signal", "concat_probes": "concat, probe signal", "attention_probes": "attention, probe signal",
           "attention_probes_modality": "attention, probe signal, projections by modality"}
# A configuration that ran the default only takes its joint from another (the same model and data: joint
# never reads which group a parameter is in, as every rate is 1).
JOINT_FROM = {"attention_probes_modality": "attention_probes"}
DEFAULT = "scale@ratio"


def load(path: str) -> list[dict] | None:
    """The runs of one part (validated), or None while it has not finished."""
    return read_runs(path) if os.path.isfile(path) else None


def by_key(runs: list[dict], method: str) -> dict[tuple, dict]:
    """``{(seed, fold, data draw): run}`` of one method."""
    out = {}
    for r in runs:
        c = r["config"]
        if c["method"] == method:
            out[(c["seed"], c["fold"], c.get("data_seed", 0))] = r
    return out


def paired(a: dict[tuple, dict], b: dict[tuple, dict], metric) -> tuple[float, float, int]:
    """Mean paired difference of ``metric(run)`` (points) a - b ± s.e., over the keys both have."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return float("nan"), float("nan"), len(keys)
    d, se = paired_difference([metric(a[k]) for k in keys], [metric(b[k]) for k in keys])
    return 100 * d, 100 * se, len(keys)


def acc(run: dict) -> float:
    return run["test"]["accuracy"]


def weak_of(weak: str):
    return lambda run: run["test"]["slice_accuracy"][weak]


def main(out: str) -> int:
    data = {(s, c): load(os.path.join(out, f"{s}_{c}.json")) for s in SETTINGS for c in CONFIGS}
    if not any(data.values()):
        print(f"no study JSON under {out}", file=sys.stderr)
        return 1
    print("| configuration | " + " | ".join(f"{s}: joint / Δ fused / Δ weak / rates / release" for s in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    verdicts = {}
    for c, label in CONFIGS.items():
        row = [label]
        for s, (_, weak) in SETTINGS.items():
            runs = data[s, c]
            if runs is None or data[s, JOINT_FROM.get(c, c)] is None:
                row.append("")
                continue
            joint, default = by_key(data[s, JOINT_FROM.get(c, c)], "joint"), by_key(runs, DEFAULT)
            d, se, n = paired(default, joint, acc)
            dw, sew, _ = paired(default, joint, weak_of(weak))
            verdicts[s, c] = (d, se)
            rates = "/".join(f"{statistics.mean(r['mean_rates'][m] for r in default.values()):.2f}"
                             for m in next(iter(default.values()))["modalities"])
            released = [r.get("release_epoch") for r in default.values()]
            epoch = "-" if all(e is None for e in released) else (
                f"{statistics.mean(e for e in released if e is not None):.0f}"
                + ("" if None not in released else f" ({released.count(None)} never)"))
            joint_acc = 100 * statistics.mean(acc(r) for r in joint.values())
            row.append(f"{joint_acc:.1f} / **{d:+.2f} ± {se:.2f}** ({d / se:+.1f} s.e.) / {dw:+.1f} ± {sew:.1f} / {rates} / {epoch} (n={n})")
        print("| " + " | ".join(row) + " |")
    print("\njoint: test accuracy (%) of joint training of that model; Δ: the default (scale@ratio, release at 0.2) "
          "minus joint, paired, points ± s.e.; weak: the weak modality's accuracy (the slice, or the probe under the "
          "probe signal); rates: mean keep rate per modality; release: mean epoch of release")

    print("\n| paired comparison | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    pairs = [
        ("default: probe signal - slice signal (concat)", ("concat_probes", DEFAULT), ("concat_slices", DEFAULT)),
        ("joint: attention - concat", ("attention_probes", "joint"), ("concat_slices", "joint")),
        ("default: attention + probes - concat + slices", ("attention_probes", DEFAULT), ("concat_slices", DEFAULT)),
        ("default, attention: projections by modality - shared", ("attention_probes_modality", DEFAULT), ("attention_probes", DEFAULT)),
    ]
    for label, (ca, ma), (cb, mb) in pairs:
        row = [label]
        for s in SETTINGS:
            if data[s, ca] is None or data[s, cb] is None:
                row.append("")
                continue
            d, se, n = paired(by_key(data[s, ca], ma), by_key(data[s, cb], mb), acc)
            row.append(f"{d:+.2f} ± {se:.2f} (n={n})")
        print("| " + " | ".join(row) + " |")

    print("\nCriterion: where the slice-based default wins or ties against joint (Δ > -1 s.e.), the probe-signal "
          "default does not lose against its joint by more than 1 s.e.")
    for s in SETTINGS:
        if (s, "concat_slices") not in verdicts:
            continue
        d, se = verdicts[s, "concat_slices"]
        if d <= -se:
            print(f"- {s}: the slice default loses ({d:+.2f} ± {se:.2f}): no requirement")
            continue
        for c in ("concat_probes", "attention_probes", "attention_probes_modality"):
            if (s, c) in verdicts:
                dp, sep = verdicts[s, c]
                print(f"- {s}, {CONFIGS[c]}: {dp:+.2f} ± {sep:.2f} ({dp / sep:+.1f} s.e.): "
                      f"{'MET' if dp >= -sep else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/fusion_study"))
