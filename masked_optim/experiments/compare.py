"""Several methods x seeds x folds on one dataset: runs, a summary table, a JSON and a figure.

Every method is run with the same seeds (same initial weights, same batches), so the table reports
each metric's mean ± std over runs and the *paired* difference from ``joint`` ± its standard error
over the (seed, fold) pairs (docs/algorithm.md §7).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Iterable, Optional, Sequence

import torch

from .data import load_dataset, num_folds
from .metrics import mean_std, paired_difference
from .training import TrainConfig, parse_method, train

__all__ = ["SCHEMA", "run_compare", "read_journal", "merge_comparisons", "summarise", "format_table", "save_json", "plot_curves", "validate_result"]

SCHEMA = "masked_optim.compare/1"
BASELINE = "joint"


class _Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, one line per run otherwise)."""

    def __init__(self, total: int, stream=None, enabled: bool = True) -> None:
        self.total, self.done, self.stream, self.enabled = total, 0, stream or sys.stderr, enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def _bar(self, frac: float, width: int = 24) -> str:
        filled = int(round(frac * width))
        return "[" + "#" * filled + "." * (width - filled) + "]"

    def update(self, label: str, epoch: int, epochs: int) -> None:
        if not self.enabled or not self.tty:
            return
        frac = (self.done + epoch / epochs) / self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac * (1 - frac) if frac > 0 else 0.0
        self.stream.write(f"\r{self._bar(frac)} run {self.done + 1}/{self.total} {label} epoch {epoch}/{epochs}  eta {eta:5.0f}s ")
        self.stream.flush()

    def finish_run(self, label: str, summary: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        prefix = "\r" if self.tty else ""
        clear = "\033[K" if self.tty else ""
        self.stream.write(f"{prefix}{self._bar(self.done / self.total)} {self.done}/{self.total} {label}: {summary} ({elapsed:.0f}s){clear}\n")
        self.stream.flush()


def _environment() -> dict[str, str]:
    from .. import __version__
    from .benchmark import machine

    return {
        "masked_optim": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": machine()["cpu"] or "unknown",
        "cpu_threads": str(torch.get_num_threads()),
    }


def _parse_folds(dataset: str, folds: Optional[Iterable[int]]) -> list[int]:
    total = num_folds(dataset)
    if folds is None:
        return list(range(total))
    out = list(folds)
    for f in out:
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < total:
            raise ValueError(f"Invalid fold: {f!r}; allowed: an int in [0, {total}) for dataset {dataset!r}")
    return out


def run_compare(
    dataset: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    folds: Optional[Iterable[int]] = None,
    base: Optional[TrainConfig] = None,
    progress: bool = True,
    stream=None,
    data_seeds: Optional[Sequence[int]] = None,
    journal: Optional[str] = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every method for every seed, fold and data draw; returns the JSON-ready comparison.

    ``base`` supplies every other :class:`TrainConfig` field (its ``dataset``, ``method``, ``seed``,
    ``fold`` and ``data_seed`` are replaced). The data of each fold and draw is loaded once and
    shared by the methods. ``folds=None`` runs every fold of the dataset (one for datasets without
    folds); ``data_seeds=None`` runs ``base.data_seed`` only (draws matter for synthetic data).
    Runs are paired with ``joint`` by (seed, fold, data draw).

    ``journal``: a file path (the CLI's ``<out>/<name>.partial.jsonl``); every finished run is
    appended to it as one JSON line, flushed and fsynced, so a run that dies keeps the runs it
    finished. The caller removes it once the final JSON is written. If it exists already,
    ``resume=False`` refuses (``ValueError``: nothing is overwritten silently); ``resume=True``
    reuses its runs: a run is reused only if its whole config (method, seed, fold, data seed and
    every other :class:`TrainConfig` field, after defaults are filled in) equals the one this call
    would train; a run of the journal with another config, or one this call would not train,
    raises ``ValueError`` naming it and the first differing field. The other runs are trained and
    appended, and the result is that of an uninterrupted call (runs in the same order, the same
    summary) except ``created``, ``environment`` and ``total_wall_time_s`` (this call's time plus
    the reused runs' ``wall_time_s``).
    """
    if not methods:
        raise ValueError(f"Invalid methods: {list(methods)!r}; allowed: at least one method")
    for m in methods:
        parse_method(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"Invalid methods: {list(methods)!r}; allowed: each method once")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"Invalid seeds: {list(seeds)!r}; allowed: one or more distinct ints >= 0")
    fold_list = _parse_folds(dataset, folds)
    base = base or TrainConfig()
    draws = [base.data_seed] if data_seeds is None else list(data_seeds)
    if not draws or len(set(draws)) != len(draws) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in draws):
        raise ValueError(f"Invalid data_seeds: {draws!r}; allowed: one or more distinct ints >= 0")
    plan = [(draw, fold, seed, method) for draw in draws for fold in fold_list for seed in seeds for method in methods]
    configs = {(m, s, f, d): replace(base, dataset=dataset, method=m, seed=s, fold=f, data_seed=d) for d, f, s, m in plan}
    done = _reusable_runs(journal, resume, configs) if journal is not None else {}
    if done:
        print(f"resume: reusing {len(done)} of {len(plan)} runs from {journal}", file=stream or sys.stderr, flush=True)
    bar = _Progress(len(plan) - len(done), stream=stream, enabled=progress)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    reused_time = sum(run["wall_time_s"] for run in done.values())
    loaded: dict[tuple[int, int], Any] = {}
    for draw, fold, seed, method in plan:
        key = (method, seed, fold, draw)
        if key in done:
            runs.append(done[key])
            continue
        if (draw, fold) not in loaded:  # once per fold and draw, and not at all if every run of it is reused
            loaded = {(draw, fold): load_dataset(dataset, fold=fold, seed=draw)}
        label = (f"{method} seed {seed}" + (f" fold {fold}" if len(fold_list) > 1 or fold else "")
                 + (f" draw {draw}" if len(draws) > 1 or draw else ""))
        result = train(configs[key], loaded[(draw, fold)],
                       progress=lambda ev, lab=label: bar.update(lab, ev["epoch"], ev["epochs"]))
        if journal is not None:
            _append_line(journal, result)
        slices = " ".join(f"{m} {v:.3f}" for m, v in result["test"]["slice_accuracy"].items())
        bar.finish_run(label, f"test acc {result['test']['accuracy']:.3f}, slices {slices}")
        runs.append(result)
    comparison = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(),
        "dataset": dataset,
        "dataset_name": runs[0]["dataset"],
        "modalities": runs[0]["modalities"],
        "methods": list(methods),
        "seeds": list(seeds),
        "folds": fold_list,
        "data_seeds": draws,
        "total_wall_time_s": time.perf_counter() - started + reused_time,
        "runs": runs,
    }
    comparison["summary"] = summarise(comparison)
    return comparison


def _append_line(path: str, run: dict[str, Any]) -> None:
    """Append one run as a JSON line, flushed and fsynced (a kill mid-write can only cut the last line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(run, separators=(",", ":"), allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_journal(path: str) -> list[dict[str, Any]]:
    """The runs of a ``run_compare`` journal (JSON lines); a cut last line (a kill mid-write) is dropped."""
    with open(path) as fh:
        lines = fh.read().split("\n")
    runs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, without its newline: the write that was cut
                break
            raise ValueError(f"Invalid journal {path}: line {i + 1} is not JSON; allowed: one run per line") from None
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict) or not isinstance(run.get("test"), dict):
            raise ValueError(f"Invalid journal {path}: line {i + 1} is not a run; allowed: one run per line")
        runs.append(run)
    return runs


def _reusable_runs(journal: str, resume: bool, configs: dict[tuple, TrainConfig]) -> dict[tuple, dict[str, Any]]:
    """The journal's runs by (method, seed, fold, data seed), checked against the configs to train.

    Rewrites the journal (atomically) without a cut last line, so that new runs append cleanly.
    """
    if not os.path.exists(journal):
        return {}
    if not resume:
        raise ValueError(
            f"Invalid output: {journal} holds the finished runs of an interrupted compare; "
            "allowed: --resume to reuse them, or delete the file to start over"
        )
    runs = read_journal(journal)
    done: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        c = run["config"]
        key = (c.get("method"), c.get("seed"), c.get("fold"), c.get("data_seed"))
        name = f"run (method, seed, fold, data seed) = {key}"
        if key not in configs:
            raise ValueError(
                f"Invalid --resume: {name} of {journal} is not one this compare runs; allowed: the methods, seeds, folds and "
                "data seeds of the interrupted compare (more may be added), or delete the file to start over"
            )
        if key in done:
            raise ValueError(f"Invalid --resume: {name} appears twice in {journal}; allowed: each run once")
        expected = asdict(configs[key].resolved())
        for field in list(expected) + [f for f in c if f not in expected]:
            if field not in c or field not in expected or c[field] != expected[field]:
                raise ValueError(
                    f"Invalid --resume: {name} of {journal} has {field} {c.get(field, '(missing)')!r}, this compare "
                    f"{expected.get(field, '(missing)')!r}; allowed: the options of the interrupted compare, "
                    "or delete the file to start over"
                )
        done[key] = run
    tmp = journal + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(run, separators=(",", ":"), allow_nan=True) + "\n" for run in runs)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, journal)
    return done


def merge_comparisons(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One comparison from several of the same dataset: folds or seeds run in separate processes,
    or methods added to an earlier comparison.

    Raises ``ValueError`` if the parts differ in dataset or modalities, or if a (method, seed, fold,
    data draw) run appears twice. Runs keep their order (part by part); methods are the union in first-seen
    order; seeds and folds are the sorted unions; the summary is recomputed (paired differences
    use the ``joint`` runs of any part); ``total_wall_time_s`` is the sum of the parts'.
    """
    if not parts:
        raise ValueError("Invalid parts: none; allowed: one or more comparisons")
    for i, part in enumerate(parts):
        validate_result(part)
        for key in ("dataset", "modalities"):
            if part[key] != parts[0][key]:
                raise ValueError(f"Invalid parts[{i}]: {key} {part[key]!r} differs from {parts[0][key]!r}; allowed: the same in every part")
    optimizers = {run["config"].get("optimizer", "sgd") for part in parts for run in part["runs"]}
    if len(optimizers) > 1:  # joint under one optimizer is no baseline for a method under the other
        raise ValueError(f"Invalid parts: runs of optimizers {sorted(optimizers)}; allowed: one optimizer in a comparison")
    seen = set()
    runs = []
    for part in parts:
        for run in part["runs"]:
            key = (run["config"]["method"], *_pair_key(run))
            if key in seen:
                raise ValueError(
                    f"Invalid parts: run (method, seed, fold, data draw) = {key} appears twice; allowed: each run once"
                )
            seen.add(key)
            runs.append(run)
    merged = dict(parts[0])
    merged.update(
        runs=runs,
        methods=list(dict.fromkeys(m for p in parts for m in p["methods"])),
        seeds=sorted({s for p in parts for s in p["seeds"]}),
        folds=sorted({f for p in parts for f in p["folds"]}),
        data_seeds=sorted({d for p in parts for d in p.get("data_seeds", [0])}),
        total_wall_time_s=sum(p["total_wall_time_s"] for p in parts),
        merged_from=len(parts),
    )
    merged["summary"] = summarise(merged)
    return merged


def _pair_key(run: dict[str, Any]) -> tuple[int, int, int]:
    """(seed, fold, data draw): what a run is paired with ``joint`` by."""
    config = run["config"]
    return config["seed"], config["fold"], config.get("data_seed", 0)


def _metric_rows(run: dict[str, Any]) -> dict[str, float]:
    t = run["test"]
    row = {"accuracy": t["accuracy"], "macro_f1": t["macro_f1"], "wall_time_s": run["wall_time_s"], "best_epoch": run["best_epoch"]}
    for m, v in t["slice_accuracy"].items():
        row[f"slice:{m}"] = v
    for m, v in t.get("probe_accuracy", {}).items():
        row[f"probe:{m}"] = v
    if run.get("steps", 1) > 0:  # a run that diverged in its first epoch has no meaningful mean rate
        for m, v in run["mean_rates"].items():
            row[f"rate:{m}"] = v
    return row


def summarise(comparison: dict[str, Any]) -> dict[str, Any]:
    """Per method and metric: mean, std (ddof 1), n, and the paired difference from ``joint`` ± its s.e."""
    by_method: dict[str, dict[tuple[int, int, int], dict[str, float]]] = {}
    for run in comparison["runs"]:
        key = _pair_key(run)
        by_method.setdefault(run["config"]["method"], {})[key] = _metric_rows(run)
    baseline = by_method.get(BASELINE)
    summary: dict[str, Any] = {}
    for method, rows in by_method.items():
        metrics = list(dict.fromkeys(k for r in rows.values() for k in r))  # first-seen order
        entry: dict[str, Any] = {"n": len(rows)}
        for metric in metrics:
            values = [r[metric] for r in rows.values() if metric in r]
            mean, std = mean_std(values)
            item = {"mean": mean, "std": std}
            if baseline is not None and method != BASELINE and not metric.startswith(("rate:", "wall", "best")):
                keys = [k for k in rows if k in baseline and metric in baseline[k] and metric in rows[k]]
                if keys:
                    diff, se = paired_difference([rows[k][metric] for k in keys], [baseline[k][metric] for k in keys])
                    item["diff_vs_joint"] = diff
                    item["diff_se"] = se
            entry[metric] = item
        summary[method] = entry
    return summary


def _pm(item: Optional[dict[str, float]], scale: float = 100.0, digits: int = 1) -> str:
    if item is None:
        return "-"
    return f"{item['mean'] * scale:.{digits}f} ± {item['std'] * scale:.{digits}f}"


def _diff(item: Optional[dict[str, float]]) -> str:
    if item is None or "diff_vs_joint" not in item:
        return "-"
    se = item["diff_se"]
    se_text = "nan" if not math.isfinite(se) else f"{se * 100:.1f}"
    return f"{item['diff_vs_joint'] * 100:+.1f} ± {se_text}"


def format_table(comparison: dict[str, Any], markdown: bool = False, compact: bool = False) -> str:
    """The results table (accuracies in %, mean ± std over runs; Δ = paired difference from joint ± s.e.).

    ``markdown=True`` gives a GitHub table (no caption line) instead of aligned text; ``compact``
    leaves out the absolute slice and probe accuracies (for many modalities), keeping the Δ columns.
    """
    summary = comparison["summary"]
    mods = comparison["modalities"]
    header = ["method", "n", "accuracy", "Δ acc", "macro-F1"]
    header += ([] if compact else [f"slice {m}" for m in mods]) + [f"Δ slice {m}" for m in mods]
    header += ([] if compact else [f"probe {m}" for m in mods]) + ["rates " + "/".join(mods), "time s"]
    rows = [header]
    for method in comparison["methods"]:
        e = summary.get(method)
        if e is None:
            continue
        row = [method, str(e["n"]), _pm(e["accuracy"]), _diff(e["accuracy"]), _pm(e["macro_f1"])]
        row += ([] if compact else [_pm(e.get(f"slice:{m}")) for m in mods]) + [_diff(e.get(f"slice:{m}")) for m in mods]
        row += [] if compact else [_pm(e.get(f"probe:{m}")) for m in mods]
        row.append("/".join(f"{e[f'rate:{m}']['mean']:.2f}" if f"rate:{m}" in e else "-" for m in mods))
        row.append(f"{e['wall_time_s']['mean']:.1f}")
        rows.append(row)
    if markdown:
        md = ["| " + " | ".join(r) + " |" for r in rows]
        md.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        return "\n".join(md)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    folds = comparison["folds"]
    optimizers = sorted({run["config"].get("optimizer", "sgd") for run in comparison["runs"]})
    lines.append(
        f"{comparison['dataset_name']}" + (f" ({'/'.join(optimizers)})" if optimizers != ["sgd"] else "")
        + ": test split at the epoch with the best validation accuracy; "
        f"{len(comparison['seeds'])} seeds" + (f" x {len(folds)} folds" if len(folds) > 1 else "")
        + (f" x {len(comparison['data_seeds'])} data draws" if len(comparison.get("data_seeds", [0])) > 1 else "")
        + "; accuracies in %, mean ± std over runs; Δ = paired difference from joint ± standard error; "
        "rates = mean keep rate per modality (1 = dense)"
    )
    return "\n".join(lines)


def save_json(comparison: dict[str, Any], path: str) -> None:
    """Write the comparison (atomically: a temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(comparison, fh, separators=(",", ":"), allow_nan=True)
    os.replace(tmp, path)


def validate_result(comparison: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing or mistyped field of a comparison JSON."""

    def need(obj, key, typ, where):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"Invalid comparison: missing {where}{key}")
        if not isinstance(obj[key], typ):
            raise ValueError(f"Invalid comparison: {where}{key} is {type(obj[key]).__name__}; allowed: {typ}")
        return obj[key]

    if need(comparison, "schema", str, "") != SCHEMA:
        raise ValueError(f"Invalid comparison: schema {comparison['schema']!r}; allowed: {SCHEMA!r}")
    for key, typ in (("dataset", str), ("modalities", list), ("methods", list), ("seeds", list), ("folds", list),
                     ("runs", list), ("summary", dict), ("environment", dict), ("created", str)):
        need(comparison, key, typ, "")
    mods = comparison["modalities"]
    for i, run in enumerate(comparison["runs"]):
        w = f"runs[{i}]."
        for key, typ in (("config", dict), ("test", dict), ("val", dict), ("history", list), ("mean_rates", dict),
                         ("best_epoch", int), ("wall_time_s", float)):
            need(run, key, typ, w)
        for key, typ in (("accuracy", float), ("macro_f1", float), ("slice_accuracy", dict)):
            need(run["test"], key, typ, w + "test.")
        if sorted(run["test"]["slice_accuracy"]) != sorted(mods):
            raise ValueError(f"Invalid comparison: {w}test.slice_accuracy has {sorted(run['test']['slice_accuracy'])}; allowed: {sorted(mods)}")
        for h in run["history"]:
            for key in ("epoch", "train_loss", "rate", "kept_fraction", "val"):
                need(h, key, (int, float, dict), w + "history[].")


def plot_curves(comparison: dict[str, Any], path: str) -> None:
    """PNG: validation accuracy over epochs (mean over runs), fused and each modality's slice, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["fused", *comparison["modalities"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, sharex=True)
    for method in comparison["methods"]:
        runs = [r for r in comparison["runs"] if r["config"]["method"] == method]
        if not runs:
            continue
        # Runs that diverged stop early: each epoch averages the runs that reached it.
        epochs = max(len(r["history"]) for r in runs)
        for ax, panel in zip(axes[0], panels):
            curve = []
            for e in range(epochs):
                vals = [r["history"][e]["val"][panel] for r in runs if len(r["history"]) > e]
                curve.append(sum(vals) / len(vals))
            ax.plot(range(1, epochs + 1), [100 * c for c in curve], label=method, lw=1.4,
                    ls="--" if method == BASELINE else "-")
    for ax, panel in zip(axes[0], panels):
        ax.set_title("fused head" if panel == "fused" else f"slice {panel}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    n = len(comparison["seeds"]) * len(comparison["folds"]) * len(comparison.get("data_seeds", [0]))
    fig.suptitle(f"{comparison['dataset_name']}: mean of {n} runs per method", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
