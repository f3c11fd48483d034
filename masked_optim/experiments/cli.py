"""The ``masked-optim`` command line: ``train``, ``compare``, ``demo``, ``env`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import re
import platform
import sys
import warnings

__all__ = ["main", "environment"]


def environment() -> dict[str, str]:
    """Versions and which optional components are present, and why not."""
    import torch

    from .. import __version__
    from ..backends import _cpp_lib

    info = {
        "masked_optim": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch cuda": str(torch.version.cuda),
        "cuda available": str(torch.cuda.is_available()),
        "cpu threads": str(torch.get_num_threads()),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
    }
    if _cpp_lib.available():
        build = _cpp_lib.build_info()
        info["extension masked_optim._C"] = "built and loaded (" + ", ".join(f"{k}={v}" for k, v in build.items()) + ")"
    else:
        info["extension masked_optim._C"] = f"not available: {_cpp_lib.unavailable_reason()}"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not installed ({exc})"
    from ..backends import backend_status, resolve_backend

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name in ("reference", "cpp", "cuda", "triton"):
        for device in devices:
            reason = backend_status(name, device)
            info[f"backend {name} on {device.type}"] = "usable" if reason is None else f"no: {reason}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for device in devices:
            info[f"backend='auto' on {device.type}"] = resolve_backend("auto", device)
    return info


# The rule study (docs/results.md, "The rule study: which rule and which mask"): every mode under both rate rules, named
# explicitly so that the table does not depend on the default rule, against joint training and OGM-GE.
DEFAULT_METHODS = (
    "joint,ogm-ge,uniform@softmax,uniform@ratio,amss@softmax,amss@ratio,amss+@softmax,amss+@ratio,scale@softmax,scale@ratio"
)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .training import TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="mfeat:<view>+<view> (views fac fou kar mor pix zer) | "
                   "mfeat:all | watch | synthetic:xor | synthetic:parity3 (default %(default)s)")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="synthetic data draw (real data has fixed splits)")
    p.add_argument("--epochs", type=int, default=None, help="default: the dataset's (see training.DATASET_DEFAULTS)")
    p.add_argument("--lr", type=float, default=None, help="default: the dataset's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the dataset's")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"],
                   help="MaskedMultiModalSGD or MaskedMultiModalAdamW under every method (default %(default)s; "
                        "adamw's default --lr is the dataset's lr_adamw)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD only")
    p.add_argument("--adam-betas", type=float, nargs=2, default=(d.adam_beta1, d.adam_beta2), metavar=("B1", "B2"),
                   help="AdamW only (default %(default)s)")
    p.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW only (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="passed as given to either optimizer: SGD's L2 term, AdamW's decoupled decay (default %(default)s "
                        "for both; torch's AdamW default would be 0.01)")
    p.add_argument("--smoothing", type=float, default=d.smoothing, help="importance smoothing gamma (docs/algorithm.md §2)")
    p.add_argument("--backend", default=d.backend, choices=["auto", "reference", "cpp", "cuda", "triton"])
    p.add_argument("--fusion", default=d.fusion, choices=["concat", "attention"],
                   help="concat head (slice logits) or cross-attention over modality tokens (no slices; needs "
                        "--signal probes) (default %(default)s)")
    p.add_argument("--signal", default=d.signal, choices=["slices", "probes"],
                   help="per-modality logits for the estimator and per-modality accuracies: the concat head's slices, "
                        "or linear probes trained online on detached features (docs/algorithm.md §3.8) (default %(default)s)")
    p.add_argument("--probe-lr", type=float, default=d.probe_lr,
                   help="the probes' own SGD learning rate (--signal probes only; default %(default)s)")
    p.add_argument("--fusion-params", default=d.fusion_params, choices=["shared", "modality"],
                   help="--fusion attention: its per-modality token projections in the shared group (dense) or each in "
                        "its modality's group (rebalanced at its rate) (default %(default)s)")
    g = p.add_argument_group("keep-rate estimator (ModalSignificance, docs/algorithm.md §3)")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--offset", type=float, default=d.offset)
    g.add_argument("--bias", type=float, default=d.bias)
    g.add_argument("--min-rate", type=float, default=d.min_rate)
    g.add_argument("--max-rate", type=float, default=d.max_rate)
    g.add_argument("--beta", type=float, default=d.beta, help="EMA of the rate statistics across steps")
    g.add_argument("--no-estimator-features", action="store_true", help="rate from I_m + c alone, without feature entropy")
    g.add_argument("--rule", default=d.rule, choices=["softmax", "ratio"],
                   help="rate rule for masked methods without '@rule' in their name (default %(default)s)")
    g.add_argument("--power", type=float, default=d.power, help="exponent of the ratio rule")
    g.add_argument("--release-at", type=float, default=d.release_at,
                   help="end rebalancing once every modality's EMA of I_m / H_Y reaches this; 'inf' never "
                        "(default: 0.2 for the ratio rule, never for softmax)")
    g.add_argument("--release-beta", type=float, default=d.release_beta, help="EMA factor of the release statistic")
    g = p.add_argument_group("OGM-GE (docs/algorithm.md §6)")
    g.add_argument("--ogm-alpha", type=float, default=d.ogm_alpha)
    g.add_argument("--ogm-start", type=int, default=d.ogm_start, help="first modulated epoch (0-based)")
    g.add_argument("--ogm-end", type=int, default=d.ogm_end, help="first epoch no longer modulated (default: never stops)")
    g = p.add_argument_group("Diagnosing & Re-learning (docs/algorithm.md §5; methods relearn, relearn+<mask>)")
    g.add_argument("--relearn-lam", type=float, default=d.relearn_lam, help="alpha = tanh(lam * |purity gap|)")
    g.add_argument("--relearn-every", type=int, default=d.relearn_every, help="diagnose after every N-th epoch")
    g.add_argument("--relearn-times", type=int, default=d.relearn_times, help="at most this many re-initialisations")
    g.add_argument("--relearn-reset-buffers", action="store_true", help="also pull batch-norm statistics back")
    g.add_argument("--relearn-reset-optimizer", action="store_true", help="drop the encoders' momentum after re-learning")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probes on frozen encoder features")


def _config_from(args: argparse.Namespace, **extra):
    from .training import TrainConfig

    return TrainConfig(
        dataset=args.dataset, data_seed=args.data_seed, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        optimizer=args.optimizer, momentum=args.momentum, adam_beta1=args.adam_betas[0], adam_beta2=args.adam_betas[1],
        adam_eps=args.adam_eps, weight_decay=args.weight_decay, smoothing=args.smoothing, backend=args.backend,
        temperature=args.temperature, offset=args.offset, bias=args.bias, min_rate=args.min_rate,
        max_rate=args.max_rate, beta=args.beta, estimator_features=not args.no_estimator_features,
        rule=args.rule, power=args.power, release_at=args.release_at, release_beta=args.release_beta,
        ogm_alpha=args.ogm_alpha, ogm_start=args.ogm_start, ogm_end=args.ogm_end, relearn_lam=args.relearn_lam,
        relearn_every=args.relearn_every, relearn_times=args.relearn_times, relearn_reset_buffers=args.relearn_reset_buffers,
        relearn_reset_optimizer=args.relearn_reset_optimizer, probe=not args.no_probe, fusion=args.fusion,
        signal=args.signal, probe_lr=args.probe_lr, fusion_params=args.fusion_params, **extra,
    )


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid {what}: {text!r}; allowed: comma-separated ints") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"Invalid {what}: {text!r}; allowed: comma-separated ints >= 0")
    return values


def _checkpoint_every(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"Invalid --checkpoint-every: {text!r}; allowed: an int >= 1")
    return value


def _seeds(text: str) -> list[int]:
    """``5`` -> seeds 0..4; ``3,7`` -> seeds 3 and 7."""
    if "," not in text:
        n = _int_list(text, "--seeds")[0]
        if n < 1:
            raise argparse.ArgumentTypeError(f"Invalid --seeds: {text!r}; allowed: a count >= 1 or a comma-separated list")
        return list(range(n))
    return _int_list(text, "--seeds")


def _data_seeds(text: str) -> list[int]:
    """Like ``--seeds``, for ``--data-seeds``."""
    try:
        return _seeds(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--seeds", "--data-seeds")) from None


def _slug(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", dataset).strip("_")


def _run_train(args: argparse.Namespace) -> int:
    from .training import train

    config = _config_from(args, method=args.method, seed=args.seed, fold=args.fold)
    if args.checkpoint_every is not None and args.checkpoint is None:
        raise ValueError("Invalid --checkpoint-every without --checkpoint; allowed: with --checkpoint PATH")
    if args.resume is not None and not os.path.isfile(args.resume):
        raise ValueError(f"Invalid --resume: {args.resume!r}: no such file")

    def progress(ev):
        v = ev["val"]
        print(f"epoch {ev['epoch']:>3}/{ev['epochs']}  loss {ev['train_loss']:.4f}  val "
              + "  ".join(f"{k} {x:.3f}" for k, x in v.items())
              + (f"  (checkpoint {ev['checkpoint']})" if "checkpoint" in ev else ""), file=sys.stderr)

    result = train(config, progress=None if args.quiet else progress, checkpoint=args.checkpoint,
                   checkpoint_every=args.checkpoint_every or 1, resume=args.resume)
    t = result["test"]
    print(f"{result['dataset']} {config.method} ({config.optimizer}) seed {config.seed} fold {config.fold}: best epoch {result['best_epoch']}, "
          f"test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}, wall {result['wall_time_s']:.1f} s")
    for m in result["modalities"]:
        probe = t.get("probe_accuracy", {}).get(m)
        print(f"  {m:>6}: slice accuracy {t['slice_accuracy'][m]:.4f}" + (f", linear probe {probe:.4f}" if probe is not None else "")
              + f", mean keep rate {result['mean_rates'][m]:.3f}")
    if args.json:
        from .compare import save_json

        save_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    folds = None if args.folds == "all" else _int_list(args.folds, "--folds")
    stem = os.path.join(args.out, args.name or _slug(args.dataset))
    journal = stem + ".partial.jsonl"  # every finished run, as it finishes; superseded by <stem>.json
    comparison = run_compare(args.dataset, methods, args.seeds, folds=folds, base=_config_from(args), progress=not args.quiet,
                             data_seeds=args.data_seeds, journal=journal, resume=args.resume)
    _write_outputs(comparison, stem, not args.no_plot)
    if os.path.exists(journal):
        os.remove(journal)
    print(f"total {comparison['total_wall_time_s']:.0f} s")
    return 0


def _write_outputs(comparison: dict, stem: str, plot: bool) -> None:
    from .compare import format_table, plot_curves, save_json

    print(format_table(comparison))
    save_json(comparison, stem + ".json")
    print(f"wrote {stem}.json")
    if plot:
        try:
            plot_curves(comparison, stem + ".png")
            print(f"wrote {stem}.png")
        except ImportError as exc:
            print(f"no figure: {exc} (pip install matplotlib)", file=sys.stderr)


def _run_merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from .compare import merge_comparisons

    parts = []
    for path in args.inputs:
        try:
            with open(path) as fh:
                parts.append(json.load(fh))
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"cannot read {path}: {exc}")
    try:
        merged = merge_comparisons(parts)
    except ValueError as exc:
        parser.error(str(exc))
    _write_outputs(merged, os.path.splitext(args.out)[0], not args.no_plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``masked-optim`` argument parser (its defaults are the library's; docs/guide.md lists the options)."""
    parser = argparse.ArgumentParser(prog="masked-optim", description="Balanced multimodal learning with masked SGD.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on synthetic two-modality data, printing rates and kept fractions")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--mask", default="amss", choices=["none", "uniform", "amss", "amss+", "scale"])
    demo.add_argument("--granularity", default="element", choices=["element", "channel"])
    demo.add_argument("--rule", default="ratio", choices=["softmax", "ratio"],
                      help="ModalSignificance's rate rule (default ratio; softmax is the paper's)")
    demo.add_argument("--setting", default="xor", choices=["xor", "parity3"])
    demo.add_argument("--n", type=int, default=5000, help="number of samples (60/20/20 split)")
    demo.add_argument("--no-baseline", action="store_true", help="skip the plain-SGD run for comparison")
    demo.add_argument("--seed", type=int, default=0)
    from .training import METHODS

    train_p = sub.add_parser("train", help="train one method on one dataset split and report test metrics")
    train_p.add_argument("--method", default="scale", help=f"one of {sorted(METHODS)} or relearn+<masked one>; masked ones optionally ':channel' "
                         "and '@softmax' / '@ratio' (default %(default)s, with --rule)")
    train_p.add_argument("--seed", type=int, default=0)
    train_p.add_argument("--fold", type=int, default=0, help="watch: subject fold 0-4")
    train_p.add_argument("--json", default=None, help="write the run (config, history, metrics) to this file")
    train_p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    train_p.add_argument("--checkpoint", default=None, metavar="PATH",
                         help="save the whole run here (atomically) after every --checkpoint-every epochs and the last")
    train_p.add_argument("--checkpoint-every", type=_checkpoint_every, default=None, metavar="N",
                         help="epochs between checkpoints (default 1; needs --checkpoint)")
    train_p.add_argument("--resume", default=None, metavar="PATH",
                         help="continue the run of this checkpoint, bit-identically; give the options of the run that "
                              "wrote it (only --epochs, --backend and --no-probe may change); may equal --checkpoint")
    _add_train_options(train_p)
    cmp_p = sub.add_parser("compare", help="several methods x seeds (x folds): results table, JSON and PNG")
    cmp_p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated (default %(default)s)")
    cmp_p.add_argument("--seeds", type=_seeds, default=list(range(5)), help="a count (5 = seeds 0-4, the default) or a list 0,3,7")
    cmp_p.add_argument("--folds", default="all", help="'all' (default) or a list such as 0,1")
    cmp_p.add_argument("--data-seeds", type=_data_seeds, default=None,
                       help="synthetic data draws: a count (2 = draws 0-1) or a list 0,3 (default: --data-seed)")
    cmp_p.add_argument("--out", default="results", help="folder for <name>.json and <name>.png (default %(default)s)")
    cmp_p.add_argument("--name", default=None, help="file stem (default: from the dataset)")
    cmp_p.add_argument("--no-plot", action="store_true")
    cmp_p.add_argument("--quiet", action="store_true", help="no progress bar")
    cmp_p.add_argument("--resume", action="store_true",
                       help="reuse the finished runs of an interrupted compare (every run is appended to "
                            "<out>/<name>.partial.jsonl as it finishes; the final <name>.json replaces it) and train the "
                            "rest: the table and JSON are those of an uninterrupted run. Give the same options: a kept run "
                            "whose config differs in any field (e.g. --lr), or that this compare would not run, is an error "
                            "naming the field, never rerun or mixed in silently. Without --resume an existing "
                            "<name>.partial.jsonl is an error too (delete it to start over)")
    _add_train_options(cmp_p)
    merge_p = sub.add_parser("merge", help="merge compare JSONs of one dataset (e.g. folds run in parallel): table, JSON, PNG")
    merge_p.add_argument("inputs", nargs="+", help="compare JSON files")
    merge_p.add_argument("--out", required=True, help="the merged JSON (the PNG goes beside it)")
    merge_p.add_argument("--no-plot", action="store_true")
    sub.add_parser("env", help="print versions and which backends are built and usable")
    sub.add_parser(
        "bench", help="time the optimizer step against torch.optim.SGD (quick default; --help for options)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .benchmark import main as bench_main

        quick = ["--sizes", "1", "--repeats", "5"]
        return bench_main(quick + rest, prog="masked-optim bench")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        if args.epochs < 1:
            parser.error(f"--epochs must be >= 1, got {args.epochs}")
        from .demo import run_demo

        run_demo(
            epochs=args.epochs, mask=args.mask, granularity=args.granularity, rule=args.rule, n=args.n,
            setting=args.setting, seed=args.seed, baseline=not args.no_baseline,
        )
    elif args.command == "merge":
        return _run_merge(args, parser)
    elif args.command in ("train", "compare"):
        try:
            return _run_train(args) if args.command == "train" else _run_compare(args)
        except (ValueError, ModuleNotFoundError, argparse.ArgumentTypeError) as exc:
            # Bad input (dataset spec, method, fold, missing data package): one line, no traceback.
            parser.error(str(exc))
    elif args.command == "env":
        for key, value in environment().items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
