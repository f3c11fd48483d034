"""One training loop for every method, with the metrics of docs/algorithm.md §7.

Methods (``TrainConfig.method``; a masked method takes ``":channel"`` for channel granularity,
e.g. ``"amss:channel"``, and ``"@softmax"`` or ``"@ratio"`` for the estimator's rate rule,
e.g. ``"amss:channel@ratio"``; without it the rule is ``TrainConfig.rule``):

========== =========================================================================================
joint      plain SGD (``MaskedMultiModalSGD`` with ``mask="none"``: bit-identical to torch.optim.SGD), or plain
           AdamW under ``optimizer="adamw"`` (``MaskedMultiModalAdamW`` with ``mask="none"``: torch.optim.AdamW)
ogm-ge     plain SGD with OGM-GE gradient modulation (docs/algorithm.md §6); ``ogm`` is the same without noise
uniform    each modality's units kept uniformly at rate ``rho_m`` (biased)
amss       importance-sampled masks, kept gradients unscaled (the paper's AMSS, biased)
amss+      importance-sampled masks, kept gradients divided by ``q`` (exactly unbiased)
scale      no mask: each modality's gradient multiplied by ``rho_m`` (a per-modality step size)
amss+ref   the official code's sampler and weights: ``ceil(rho_m N)`` units drawn without
           replacement, scaled by ``1 / (pi_j + 1/N)`` (python reference path)
relearn    plain SGD with Diagnosing & Re-learning (docs/algorithm.md §5) every ``relearn_every`` epochs;
           ``relearn+<masked mode>`` (e.g. ``relearn+amss:channel``) combines it with a mask
========== =========================================================================================

``TrainConfig.optimizer`` picks the optimizer every method runs on: ``"sgd"`` (the default,
:class:`~masked_optim.MaskedMultiModalSGD`) or ``"adamw"`` (:class:`~masked_optim.MaskedMultiModalAdamW`:
the same modes, masks and rates, on the lazy AdamW step of docs/algorithm.md §2.8). Under AdamW,
``momentum`` is not used and ``weight_decay`` is AdamW's decoupled decay, passed as given (the
default stays 1e-4, not torch's AdamW default 1e-2; pass ``weight_decay=1e-2`` for that); the
default learning rate is the dataset family's ``lr_adamw``.

The keep rates of the masked methods come from :class:`~masked_optim.ModalSignificance` on the
fusion head's slice logits every step. Every run of a given ``seed`` starts from the same weights
and sees the same batches, so methods can be compared pairwise. The epoch is selected on the
validation split's fused accuracy and everything is reported on the test split at that epoch.

``train(config, checkpoint=path)`` saves the whole state of the run after every
``checkpoint_every``-th epoch; ``train(config, resume=path)`` (or :func:`resume_training`) continues
it, bit-identical to the uninterrupted run (see :func:`train`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import MultimodalSplits, load_dataset
from ..fusion import modality_param_groups
from .metrics import accuracy, linear_probe_accuracy, macro_f1
from .models import MultimodalNet, build_model, predict
from .modulation import OGMGE
from ..optim import MaskedMultiModalSGD
from .relearn import DiagnoseRelearn
from ..probes import ModalityProbes
from ..significance import ModalSignificance

__all__ = [
    "TrainConfig", "METHODS", "DATASET_DEFAULTS", "parse_method", "method_spec", "method_rule", "RULES", "train", "resume_training",
    "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "RESUME_MAY_CHANGE",
]


@dataclass(frozen=True)
class _Method:
    mask: str
    sampler: str = "poisson"
    modulation: Optional[str] = None  # "ogm-ge" | "ogm"
    granularities: tuple[str, ...] = ("element", "channel")
    relearn: bool = False


METHODS: dict[str, _Method] = {
    "joint": _Method("none", granularities=("element",)),
    "ogm-ge": _Method("none", modulation="ogm-ge", granularities=("element",)),
    "ogm": _Method("none", modulation="ogm", granularities=("element",)),
    "uniform": _Method("uniform"),
    "amss": _Method("amss"),
    "amss+": _Method("amss+"),
    "amss+ref": _Method("amss+", sampler="multinomial"),
    "scale": _Method("scale", granularities=("element",)),
    "relearn": _Method("none", granularities=("element",), relearn=True),
}
# Diagnosing & Re-learning combines with every masked mode: "relearn+amss", "relearn+amss:channel", ...
RELEARN_PREFIX = "relearn+"
RULES = ("softmax", "ratio")  # ModalSignificance's rate rules, selectable per method with "@rule"
OPTIMIZERS = ("sgd", "adamw")  # TrainConfig.optimizer: MaskedMultiModalSGD or MaskedMultiModalAdamW
FUSIONS = ("concat", "attention")  # TrainConfig.fusion: build_model's fusion
SIGNALS = ("slices", "probes")  # TrainConfig.signal: the estimator's per-modality logits
FUSION_PARAMS = ("shared", "modality")  # TrainConfig.fusion_params: the attention fusion's per-modality projections

# Per dataset family: epochs, learning rate and batch size. Synthetic: docs/algorithm.md §8. mfeat and watch:
# the learning rate is the one joint training does best with on the validation split (docs/results.md,
# "Results on real and synthetic data"), reused for every method. ``lr_adamw``: the same choice for joint
# training under AdamW (optimizer="adamw"), swept on validation (benchmarks/results/adamw_study/lr_sweep_adamw.json;
# docs/results.md, "The AdamW study"): synthetic the best mean over xor and parity3, one lr for the family.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {"epochs": 50, "lr": 0.01, "lr_adamw": 3e-3, "batch_size": 64},
    "mfeat": {"epochs": 80, "lr": 0.01, "lr_adamw": 1e-3, "batch_size": 64},
    "watch": {"epochs": 40, "lr": 0.01, "lr_adamw": 1e-3, "batch_size": 32},
}


def method_spec(name: str) -> _Method:
    """The definition behind a method name (without granularity), ``relearn+<masked mode>`` included."""
    if name.startswith(RELEARN_PREFIX):
        base = METHODS.get(name[len(RELEARN_PREFIX):])
        if base is None or base.mask == "none" or base.relearn:
            masked = sorted(m for m, d in METHODS.items() if d.mask != "none")
            raise ValueError(f"Invalid method: {name!r}; allowed after 'relearn+': one of {masked}")
        return _Method(base.mask, base.sampler, base.modulation, base.granularities, relearn=True)
    if name not in METHODS:
        raise ValueError(
            f"Invalid method: {name!r}; allowed: one of {sorted(METHODS)} or 'relearn+<masked mode>', optionally with ':channel'"
        )
    return METHODS[name]


def method_rule(spec: str) -> Optional[str]:
    """The rate rule a method name asks for: ``"amss@ratio"`` -> ``"ratio"``; ``"amss"`` -> None."""
    parse_method(spec)
    return spec.partition("@")[2] or None


def parse_method(spec: str) -> tuple[str, str]:
    """``"amss:channel"`` -> ``("amss", "channel")``; ``"amss"`` -> ``("amss", "element")``;
    ``"relearn+amss:channel@ratio"`` -> ``("relearn+amss", "channel")`` (the rule: :func:`method_rule`)."""
    if not isinstance(spec, str):
        raise TypeError(f"Invalid method: {spec!r}; allowed: a str such as 'amss' or 'amss:channel'")
    base, at, rule = spec.partition("@")
    if at and rule not in RULES:
        raise ValueError(f"Invalid method: {spec!r}; allowed after '@': one of {list(RULES)}")
    if at and method_spec(base.partition(":")[0]).mask == "none":
        raise ValueError(f"Invalid method: {spec!r}; allowed: '@rule' only on masked methods (they use the estimator)")
    name, _, granularity = base.partition(":")
    granularity = granularity or "element"
    try:
        method = method_spec(name)
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"Invalid method: {name!r}", f"Invalid method: {spec!r}", 1)) from None
    if granularity not in method.granularities:
        raise ValueError(f"Invalid method: {spec!r}; allowed granularities for {name!r}: {list(method.granularities)}")
    return name, granularity


@dataclass
class TrainConfig:
    """Everything that defines one run. ``None`` means the dataset family's default (``DATASET_DEFAULTS``).

    Estimator options (``temperature``, ``offset``, ``bias``, ``min_rate``, ``max_rate``, ``beta``,
    ``rule``, ``power``, ``release_at``, ``release_beta``) are :class:`~masked_optim.ModalSignificance`'s
    (``max_rate=None`` and ``release_at=None``: the rule's default; a method name's ``@rule`` overrides ``rule``); ``estimator_features`` passes the encoder
    features so the rate uses the feature entropy (docs/algorithm.md §3). ``ogm_*`` are OGM-GE's ``alpha``,
    ``start``, ``end`` (epochs). ``relearn_*`` are :class:`~masked_optim.experiments.DiagnoseRelearn`'s
    ``lam``, ``every``, ``times``, ``reset_buffers`` and ``reset_optimizer_state``. ``data_seed`` draws the synthetic data; real datasets have fixed
    splits (docs/algorithm.md §7). ``optimizer`` is ``"sgd"`` or ``"adamw"`` (see the module docstring); ``momentum``
    is SGD's, ``adam_beta1``, ``adam_beta2`` and ``adam_eps`` are AdamW's ``betas`` and ``eps`` (each ignored by the
    other optimizer); ``weight_decay`` goes to either as given (SGD: L2 added to the gradient; AdamW: decoupled).
    ``fusion`` is :func:`~masked_optim.experiments.models.build_model`'s (``"concat"``, default, or
    ``"attention"``, which has no slice logits). ``signal`` is where the per-modality logits of the
    estimator, OGM-GE and the per-modality accuracies come from: ``"slices"`` (default; the concat
    head's slices) or ``"probes"`` (:class:`~masked_optim.ModalityProbes` with its default options,
    trained online on the detached features every step, for every method; docs/algorithm.md §3.8).
    ``fusion="attention"`` needs ``signal="probes"``. ``probe_lr`` is the probes' own SGD learning
    rate (``ModalityProbes``' default 0.01; used only with ``signal="probes"``). ``fusion_params``:
    where the attention model's per-modality token projections go, ``"shared"`` (default: with the
    rest of the fusion, dense) or ``"modality"`` (each in its modality's group, rebalanced at its
    rate, as ``Balancer(assign=...)`` does; ``fusion="attention"`` only).
    """

    dataset: str = "mfeat:fac+zer"
    method: str = "scale"
    seed: int = 0
    fold: int = 0
    data_seed: int = 0
    epochs: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    smoothing: float = 0.5
    backend: str = "auto"
    temperature: float = 0.2
    offset: float = 0.5
    bias: float = 0.0
    min_rate: float = 0.1
    max_rate: Optional[float] = None
    beta: float = 0.0
    estimator_features: bool = True
    rule: str = "ratio"
    power: float = 1.0
    release_at: Optional[float] = None
    release_beta: float = 0.9
    ogm_alpha: float = 0.8
    ogm_start: int = 0
    ogm_end: Optional[int] = None
    relearn_lam: float = 3.0
    relearn_every: int = 20
    relearn_times: int = 3
    relearn_reset_buffers: bool = False
    relearn_reset_optimizer: bool = False
    probe: bool = True
    fusion: str = "concat"
    signal: str = "slices"
    probe_lr: float = 0.01
    fusion_params: str = "shared"

    def resolved(self) -> "TrainConfig":
        """A copy with the dataset defaults filled in and every field validated."""
        parse_method(self.method)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r}; allowed: one of {list(OPTIMIZERS)}")
        family = self.dataset.partition(":")[0]
        defaults = DATASET_DEFAULTS.get(family, DATASET_DEFAULTS["synthetic"])
        out = copy.copy(self)
        for key in ("epochs", "lr", "batch_size"):
            if getattr(out, key) is None:
                setattr(out, key, defaults["lr_adamw" if key == "lr" and out.optimizer == "adamw" else key])
        for key in ("epochs", "batch_size"):
            value = getattr(out, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {key}: {value!r}; allowed: an int >= 1")
        for key in ("seed", "fold", "data_seed", "ogm_start"):
            value = getattr(out, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {key}: {value!r}; allowed: an int >= 0")
        if not (isinstance(out.lr, (int, float)) and math.isfinite(out.lr) and out.lr > 0):
            raise ValueError(f"Invalid lr: {out.lr!r}; allowed: a finite number > 0")
        if out.rule not in RULES:
            raise ValueError(f"Invalid rule: {out.rule!r}; allowed: one of {list(RULES)}")
        if out.fusion not in FUSIONS:
            raise ValueError(f"Invalid fusion: {out.fusion!r}; allowed: one of {list(FUSIONS)}")
        if out.signal not in SIGNALS:
            raise ValueError(f"Invalid signal: {out.signal!r}; allowed: one of {list(SIGNALS)}")
        if isinstance(out.probe_lr, bool) or not (isinstance(out.probe_lr, (int, float)) and math.isfinite(out.probe_lr) and out.probe_lr > 0):
            raise ValueError(f"Invalid probe_lr: {out.probe_lr!r}; allowed: a finite number > 0")
        if out.fusion_params not in FUSION_PARAMS:
            raise ValueError(f"Invalid fusion_params: {out.fusion_params!r}; allowed: one of {list(FUSION_PARAMS)}")
        if out.fusion_params == "modality" and out.fusion != "attention":
            raise ValueError(f"Invalid fusion_params: 'modality' with fusion {out.fusion!r}, whose head has no "
                             "per-modality tensor; allowed: fusion='attention' (or fusion_params='shared')")
        if out.fusion != "concat" and out.signal == "slices":
            raise ValueError(f"Invalid signal: 'slices' with fusion {out.fusion!r}, which has no slice logits; "
                             "allowed: signal='probes' (or fusion='concat')")
        out.rule = method_rule(out.method) or out.rule  # the rule the run uses, recorded with its results
        return out


def _modality_logits(out, probes: Optional[ModalityProbes]) -> dict[str, Tensor]:
    """The per-modality logits to report: the slices, or with ``signal="probes"`` the probes' (no training)."""
    return out.modality_logits if probes is None else probes.logits(out.features)


def _accuracies(out, labels: Tensor, probes: Optional[ModalityProbes] = None) -> dict[str, float]:
    acc = {"fused": accuracy(out.logits, labels)}
    for m, o in _modality_logits(out, probes).items():
        acc[m] = accuracy(o, labels)
    return acc


def _build(config: TrainConfig, data: MultimodalSplits):
    name, granularity = parse_method(config.method)
    method = method_spec(name)
    torch.manual_seed(config.seed)
    if config.fusion == "concat":
        model = build_model(data.shapes, data.num_classes)
        groups = modality_param_groups(model.encoders, shared=model.head)
    else:
        model = build_model(data.shapes, data.num_classes, config.fusion)
        parts = dict(model.encoders.items())
        if config.fusion_params == "modality":  # each token projection with its modality's encoder
            parts = {m: nn.ModuleList([model.encoders[m], model.proj[m]]) for m in model.encoders}
        owned = {id(p) for part in parts.values() for p in part.parameters()}
        groups = modality_param_groups(parts, shared=[p for p in model.parameters() if id(p) not in owned])
    common = dict(
        lr=config.lr, weight_decay=config.weight_decay, mask=method.mask, granularity=granularity,
        sampler=method.sampler, smoothing=config.smoothing, seed=config.seed,
        backend=config.backend if method.sampler == "poisson" else "reference",
    )
    if config.optimizer == "adamw":
        from ..adamw import MaskedMultiModalAdamW

        optimizer = MaskedMultiModalAdamW(groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, **common)
    else:
        optimizer = MaskedMultiModalSGD(groups, momentum=config.momentum, **common)
    estimator = None
    if method.mask != "none":
        estimator = ModalSignificance(
            temperature=config.temperature, offset=config.offset, bias=config.bias,
            min_rate=config.min_rate, max_rate=config.max_rate, beta=config.beta,
            rule=method_rule(config.method) or config.rule, power=config.power,
            release_at=config.release_at, release_beta=config.release_beta,
        )
    modulation = None
    if method.modulation:
        modulation = OGMGE(
            dict(model.encoders.items()), alpha=config.ogm_alpha, start=config.ogm_start, end=config.ogm_end,
            noise=method.modulation == "ogm-ge", seed=config.seed,
        )
    relearner = None
    if method.relearn:
        relearner = DiagnoseRelearn(
            dict(model.encoders.items()), lam=config.relearn_lam, every=config.relearn_every, times=config.relearn_times,
            n_clusters=data.num_classes, reset_buffers=config.relearn_reset_buffers, optimizer=optimizer,
            reset_optimizer_state=config.relearn_reset_optimizer, seed=config.seed,
        )
    return model, optimizer, estimator, modulation, relearner


def _batches(split: tuple[Mapping[str, Tensor], Tensor], batch_size: int = 1024):
    x, y = split
    for i in range(0, y.shape[0], batch_size):
        yield {m: v[i : i + batch_size] for m, v in x.items()}, y[i : i + batch_size]


# ---------------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "masked_optim.train_checkpoint"
CHECKPOINT_VERSION = 1
# TrainConfig fields a resumed run may change. A resumed run equals the uninterrupted run of the
# *given* config: nothing in an epoch depends on ``epochs`` (it only says where to stop; it must be
# >= the checkpoint's epoch) and ``probe`` only adds the final linear probes. ``backend`` changes
# no mask (every backend draws the same Philox stream) but the fused kernels may round differently
# from the reference, so a resume on another backend matches within float32 tolerance, not bit for bit.
RESUME_MAY_CHANGE = frozenset({"epochs", "probe", "backend"})
_CHECKPOINT_KEYS = frozenset({
    "format", "version", "config", "epoch", "data", "model", "optimizer", "estimator", "modulation", "relearner",
    "best", "history", "totals", "rng", "wall_time_s",
})
_MISSING = object()

PathLike = Union[str, "os.PathLike[str]"]


def _data_fingerprint(data: MultimodalSplits) -> dict[str, Any]:
    """Name, classes, shapes and a SHA-256 of every split's tensors: a resume must see the same data."""
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        x, y = getattr(data, split)
        for t in [*(x[m] for m in sorted(x)), y]:
            t = t.detach().cpu().contiguous()
            digest.update(f"{split}:{t.dtype}:{tuple(t.shape)};".encode())
            try:
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            except (RuntimeError, TypeError, ImportError):  # no numpy: slower, same bytes
                digest.update(bytes(t.reshape(-1).view(torch.uint8).tolist()))
    return {"name": data.name, "num_classes": int(data.num_classes),
            "shapes": {m: list(s) for m, s in data.shapes.items()}, "sha256": digest.hexdigest()}


def _check_checkpoint_path(path: Any, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
        raise TypeError(f"Invalid {what}: {path!r}; allowed: a file path (str or os.PathLike)")
    return os.fspath(path)


def _atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``: ``path`` holds
    either the previous checkpoint or the new one, never a partial file; the temporary file is
    removed if anything fails."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`train` (on the CPU, ``weights_only``).

    Raises ``FileNotFoundError`` (or another ``OSError``) when the file cannot be opened, and
    ``ValueError`` when it is not a masked_optim training checkpoint, is truncated or corrupt, or
    has a format version other than :data:`CHECKPOINT_VERSION`.
    """
    path = _check_checkpoint_path(path, "checkpoint path")
    with open(path, "rb") as fh:  # OSError (missing file, a directory, no permission) as is
        try:
            state = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated / foreign files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"Invalid checkpoint {path!r}: not a readable masked_optim training checkpoint "
                f"({type(exc).__name__}: {first})"
            ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"Invalid checkpoint {path!r}: not a masked_optim training checkpoint "
            f"(no format marker {CHECKPOINT_FORMAT!r}; written by masked_optim.experiments.train(checkpoint=...))"
        )
    version = state.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"Invalid checkpoint {path!r}: format version {version!r}; allowed: {CHECKPOINT_VERSION} "
            "(written by another version of masked_optim)"
        )
    missing = sorted(_CHECKPOINT_KEYS - set(state))
    if missing or not isinstance(state["config"], dict):
        raise ValueError(f"Invalid checkpoint {path!r}: incomplete, missing {missing or ['config']}")
    return state


def _check_resumable(state: Mapping[str, Any], config: TrainConfig, path: str) -> None:
    """The checkpoint must come from this run: same config up to :data:`RESUME_MAY_CHANGE`."""
    saved, current = dict(state["config"]), asdict(config)
    try:  # a checkpoint written before configs recorded the rule a method's '@rule' suffix sets
        saved["rule"] = method_rule(saved["method"]) or saved["rule"]
    except (KeyError, TypeError, ValueError):
        pass  # reported below as a differing field
    if "release_at" not in saved and "rule" in saved:  # written before release existed: it never released
        saved["release_at"], saved["release_beta"] = math.inf, 0.9
    if "optimizer" not in saved and "momentum" in saved:  # written before the optimizer was selectable: SGD
        saved.update(optimizer="sgd", adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)
    if "fusion" not in saved and "method" in saved:  # written before fusion and signal were selectable
        saved.update(fusion="concat", signal="slices")
    if "probe_lr" not in saved and "signal" in saved:  # written before the probes' lr was an option: the default
        saved["probe_lr"] = 0.01
    if "fusion_params" not in saved and "signal" in saved:  # written before fusion_params existed: shared
        saved["fusion_params"] = "shared"
    diffs = []
    for key in [*current, *(k for k in saved if k not in current)]:
        if key in RESUME_MAY_CHANGE:
            continue
        a, b = saved.get(key, _MISSING), current.get(key, _MISSING)
        if a is _MISSING or b is _MISSING or isinstance(a, bool) != isinstance(b, bool) or a != b:
            show = lambda v: "(absent)" if v is _MISSING else repr(v)  # noqa: E731
            diffs.append(f"{key}: checkpoint {show(a)}, config {show(b)}")
    if diffs:
        raise ValueError(
            f"Invalid resume: checkpoint {path!r} is of another run; differing config fields: "
            + "; ".join(diffs) + f". allowed: the checkpoint's config (only {sorted(RESUME_MAY_CHANGE)} may change)"
        )
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"Invalid checkpoint {path!r}: epoch {epoch!r}; allowed: an int >= 1")
    if config.epochs < epoch:
        raise ValueError(
            f"Invalid epochs: {config.epochs}; checkpoint {path!r} was written after epoch {epoch}; allowed: epochs >= {epoch}"
        )


def _check_same_data(state: Mapping[str, Any], data: MultimodalSplits, path: str) -> None:
    saved, current = state["data"], _data_fingerprint(data)
    if saved != current:
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, given {current[k]!r}" for k in current if saved.get(k) != current[k]]
        raise ValueError(f"Invalid resume: the data differ from those of checkpoint {path!r} ({'; '.join(diffs)})")


def _rng_state() -> dict[str, Any]:
    """Torch's global generators (CPU, and CUDA once initialised): batch norm, dropout or a hook may use them."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "cuda": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_training(
    path: PathLike,
    data: Optional[MultimodalSplits] = None,
    *,
    progress: Optional[Callable[[dict], None]] = None,
    on_epoch_end: Optional[Callable[[int, MultimodalNet, MultimodalSplits, MaskedMultiModalSGD], Optional[dict]]] = None,
    checkpoint: Optional[PathLike] = None,
    checkpoint_every: int = 1,
    **changes: Any,
) -> dict[str, Any]:
    """Continue the run saved in checkpoint ``path`` with the config stored in it.

    ``changes`` may set the fields of :data:`RESUME_MAY_CHANGE` (e.g. ``epochs=100`` to train
    further); ``data``, ``progress``, ``on_epoch_end``, ``checkpoint`` and ``checkpoint_every`` are
    :func:`train`'s. Returns :func:`train`'s result.
    """
    path = _check_checkpoint_path(path, "resume")
    state = load_checkpoint(path)
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(state["config"]) - names)
    if unknown:
        raise ValueError(f"Invalid checkpoint {path!r}: unknown config fields {unknown}")
    bad = sorted(set(changes) - RESUME_MAY_CHANGE)
    if bad:
        raise ValueError(f"Invalid changes: {bad}; allowed: {sorted(RESUME_MAY_CHANGE)}")
    config = TrainConfig(**{**state["config"], **changes}).resolved()
    checkpoint = _check_checkpoint_options(checkpoint, checkpoint_every)
    return _train(config, data, progress, on_epoch_end, checkpoint, checkpoint_every, state, path)


def _check_checkpoint_options(checkpoint: Any, checkpoint_every: Any) -> Optional[str]:
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"Invalid checkpoint_every: {checkpoint_every!r}; allowed: an int >= 1")
    if checkpoint is None:
        return None
    checkpoint = _check_checkpoint_path(checkpoint, "checkpoint")
    directory = os.path.dirname(os.path.abspath(checkpoint))
    if not os.path.isdir(directory):
        raise ValueError(f"Invalid checkpoint: {checkpoint!r}; allowed: a file in an existing directory ({directory!r} is not one)")
    if os.path.isdir(checkpoint):
        raise ValueError(f"Invalid checkpoint: {checkpoint!r} is a directory; allowed: a file path")
    return checkpoint


def train(
    config: TrainConfig,
    data: Optional[MultimodalSplits] = None,
    *,
    progress: Optional[Callable[[dict], None]] = None,
    on_epoch_end: Optional[Callable[[int, MultimodalNet, MultimodalSplits, MaskedMultiModalSGD], Optional[dict]]] = None,
    checkpoint: Optional[PathLike] = None,
    checkpoint_every: int = 1,
    resume: Optional[PathLike] = None,
) -> dict[str, Any]:
    """Train one method on one dataset split and evaluate it (docs/algorithm.md §7). Returns a JSON-ready dict.

    Args:
        config: the run (see :class:`TrainConfig`).
        data: the splits; loaded from ``config.dataset`` / ``fold`` / ``data_seed`` when None.
        progress: called after every epoch with ``{"epoch", "epochs", "val": {...}, "train_loss"}``
            (and ``"checkpoint": path`` when one was written after that epoch).
        on_epoch_end: ``f(epoch, model, data, optimizer)`` after every epoch's validation, checkpoint
            selection and re-learning; a dict it returns is stored in that epoch's history under
            ``"hook"``.
        checkpoint: a file path; after every ``checkpoint_every``-th epoch and after the last one,
            the whole state of the run is written there (one ``torch.save`` file, written to a
            temporary file in the same directory and moved over ``checkpoint`` with
            ``os.replace``, so the file is never partial), before ``progress`` is called. Its
            directory must exist.
        checkpoint_every: an int >= 1 (default 1).
        resume: a file written through ``checkpoint``: the run continues after that checkpoint's
            epoch, and its result (weights, history, best epoch, metrics; all but
            ``wall_time_s``, which adds up the sessions) is bit-identical to the uninterrupted
            run's. The checkpoint's config must equal ``config`` except for
            :data:`RESUME_MAY_CHANGE` (``epochs`` may grow, ``probe`` may change; ``backend`` may
            change, giving the same masks but float32 rounding differences), and ``data`` must
            be the same; otherwise ``ValueError`` names what differs. ``resume`` may be the same
            path as ``checkpoint``. :func:`resume_training` takes the config from the checkpoint.

    A checkpoint holds: the format and version, the resolved config, the epoch completed, a
    fingerprint of the data, the model's and the optimizer's state dicts (momentum buffers, step
    counters keying the masks, rates), the estimator's EMA, OGM-GE's noise generators,
    Diagnosing & Re-learning's initial-weight snapshot, firing count and history, the best epoch
    with its accuracy and weights, the history, the running totals behind ``mean_rates`` and
    ``steps``, the data-order generator and torch's global RNG (CPU, and CUDA when initialised),
    and the wall time so far. Read it with :func:`load_checkpoint`.

    The result holds ``config`` (resolved), ``history`` (per epoch: train loss, mean keep rate,
    mean kept fraction and estimator fallback share per modality, validation accuracies),
    ``best_epoch`` (highest validation fused accuracy; the first on ties), ``val`` and ``test``
    at that epoch (fused accuracy and macro-F1, each modality's slice accuracy, and with
    ``config.probe`` each modality's linear-probe accuracy on its frozen encoder features),
    ``mean_rates`` over all steps, ``steps`` (optimizer steps taken) and ``wall_time_s`` (training
    and per-epoch validation).

    A run whose loss or gradients become non-finite stops there (``diverged_at_epoch``; the
    optimizer refuses the step, so the weights stay finite) and is evaluated at its best epoch
    before that (epoch 0, the initial weights, if it diverged in the first epoch).
    """
    config = config.resolved()
    checkpoint = _check_checkpoint_options(checkpoint, checkpoint_every)
    state = None
    if resume is not None:
        resume = _check_checkpoint_path(resume, "resume")
        state = load_checkpoint(resume)
    return _train(config, data, progress, on_epoch_end, checkpoint, checkpoint_every, state, resume)


def _train(config, data, progress, on_epoch_end, checkpoint, checkpoint_every, state, resume_path) -> dict[str, Any]:
    if state is not None:
        _check_resumable(state, config, resume_path)  # before loading any data
    if data is None:
        data = load_dataset(config.dataset, fold=config.fold, seed=config.data_seed)
    model, optimizer, estimator, modulation, relearner = _build(config, data)
    probes = None  # built without random numbers: the default path's RNG use is unchanged
    if config.signal == "probes":
        probes = ModalityProbes(_feature_dims(model), data.num_classes, lr=config.probe_lr)
    modalities = model.modalities
    x_train, y_train = data.train
    n_train = y_train.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    # Epoch 0 (the initial weights) is selected only if training diverges in the first epoch.
    best_epoch, best_acc, best_state = 0, -1.0, copy.deepcopy(model.state_dict())
    # The probes' weights at the selected epoch, so that the reported slice accuracies are the model's there.
    best_probes = None if probes is None else copy.deepcopy(probes.state_dict())
    diverged_at: Optional[int] = None
    rate_total = {m: 0.0 for m in modalities}
    steps_total = rate_steps = 0
    first_epoch, wall_before = 1, 0.0
    fingerprint = _data_fingerprint(data) if checkpoint is not None or state is not None else None
    if state is not None:
        if state["data"] != fingerprint:
            _check_same_data(state, data, resume_path)
        model.load_state_dict(state["model"])
        # The optimizer's param groups come back from the checkpoint; the backend is this run's.
        backends = [g["backend"] for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, backend in zip(optimizer.param_groups, backends):
            group["backend"] = backend
        for part, name in ((estimator, "estimator"), (modulation, "modulation"), (relearner, "relearner"), (probes, "probes")):
            if (part is None) != (state.get(name) is None):
                raise ValueError(f"Invalid checkpoint {resume_path!r}: {name} state does not match the method {config.method!r}")
            if part is not None:
                part.load_state_dict(state[name])
        history = list(state["history"])
        best = state["best"]
        best_epoch, best_acc, best_state = best["epoch"], best["accuracy"], best["state"]
        best_probes = best.get("probes", best_probes)  # checkpoints before it: the probes' current weights
        totals = state["totals"]
        rate_total = {m: float(totals["rate"][m]) for m in modalities}
        rate_steps, steps_total = totals["rate_steps"], totals["steps"]
        first_epoch, wall_before = state["epoch"] + 1, float(state["wall_time_s"])
        gen.set_state(state["rng"]["data_order"])
        _set_rng_state(state["rng"])  # last: building the model above drew from the global RNG
    start = time.perf_counter()
    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        loss_sum, steps = 0.0, 0
        rate_sum = {m: 0.0 for m in modalities}
        kept_sum = {m: 0.0 for m in modalities}
        fallbacks = 0
        for i in range(0, n_train, config.batch_size):
            idx = perm[i : i + config.batch_size]
            if idx.numel() < 2:  # a 1-sample batch breaks batch normalisation; it is dropped
                continue
            yb = y_train[idx]
            out = model({m: x_train[m][idx] for m in modalities})
            loss = F.cross_entropy(out.logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rates = None
            # the slices, or the probes' logits on this batch (taken before their step on it)
            modality_logits = out.modality_logits if probes is None else probes(out.features, yb)
            if estimator is not None:
                feats = {m: z.detach() for m, z in out.features.items()} if config.estimator_features else None
                rates = estimator({m: o.detach() for m, o in modality_logits.items()}, yb, feats)
                fallbacks += int(estimator.last.fallback)
            for m in modalities:  # every attempted step counts, also one that diverges
                rate_total[m] += rates[m] if rates is not None else 1.0
            rate_steps += 1
            if modulation is not None:
                modulation.apply({m: o.detach() for m, o in modality_logits.items()}, yb, epoch - 1)
            loss_value = loss.item()  # the loop's one read of the loss (a host sync on GPU)
            if not math.isfinite(loss_value):
                diverged_at = epoch
                break
            try:
                optimizer.step(rates=rates)
            except FloatingPointError:  # non-finite gradient: nothing was updated; the run stops here
                diverged_at = epoch
                break
            if estimator is not None:
                stats = optimizer.last_step_stats()
                for m in modalities:
                    rate_sum[m] += rates[m]
                    kept_sum[m] += stats[m].kept_fraction
            else:
                for m in modalities:
                    rate_sum[m] += 1.0
                    kept_sum[m] += 1.0
            loss_sum += loss_value
            steps += 1
        steps_total += steps
        if diverged_at is not None:
            break
        val = _accuracies(predict(model, data.val[0]), data.val[1], probes)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / max(steps, 1),
            "rate": {m: rate_sum[m] / max(steps, 1) for m in modalities},
            "kept_fraction": {m: kept_sum[m] / max(steps, 1) for m in modalities},
            "fallback_fraction": fallbacks / max(steps, 1),
            "val": val,
        }
        if estimator is not None:
            row["released"] = estimator.released
        if val["fused"] > best_acc:
            best_epoch, best_acc = epoch, val["fused"]
            best_state = copy.deepcopy(model.state_dict())
            best_probes = None if probes is None else copy.deepcopy(probes.state_dict())
        # Interventions on the weights come after this epoch's validation and checkpoint selection.
        if relearner is not None:
            # Diagnosis reads the training and validation splits only, never the test split.
            diagnosis = relearner.maybe_step(epoch, _batches(data.train), _batches(data.val))
            if diagnosis is not None:
                row["relearn"] = diagnosis.as_dict()
        if on_epoch_end is not None:
            extra = on_epoch_end(epoch, model, data, optimizer)
            if extra is not None:
                row["hook"] = extra
        history.append(row)
        event = {"epoch": epoch, "epochs": config.epochs, "val": val, "train_loss": row["train_loss"]}
        if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == config.epochs):
            _atomic_save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(config), "epoch": epoch,
                "data": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "estimator": None if estimator is None else estimator.state_dict(),
                "modulation": None if modulation is None else modulation.state_dict(),
                "relearner": None if relearner is None else relearner.state_dict(),
                "probes": None if probes is None else probes.state_dict(),
                "best": {"epoch": best_epoch, "accuracy": best_acc, "state": best_state, "probes": best_probes},
                "history": history,
                "totals": {"rate": dict(rate_total), "rate_steps": rate_steps, "steps": steps_total},
                "rng": {"data_order": gen.get_state(), **_rng_state()},
                "wall_time_s": wall_before + time.perf_counter() - start,
            }, checkpoint)
            event["checkpoint"] = checkpoint
        if progress is not None:
            progress(event)
    wall = wall_before + time.perf_counter() - start
    model.load_state_dict(best_state)
    if probes is not None:
        probes.load_state_dict(best_probes)
    result: dict[str, Any] = {
        "config": asdict(config),
        "dataset": data.name or config.dataset,
        "modalities": modalities,
        "num_classes": data.num_classes,
        "best_epoch": best_epoch,
        "val": _evaluate(model, data, "val", probe=False, probes=probes),
        "test": _evaluate(model, data, "test", probe=config.probe, probes=probes),
        "mean_rates": {m: rate_total[m] / max(rate_steps, 1) for m in modalities},
        # the first epoch at whose end the estimator was released (rates max_rate from then on)
        "release_epoch": next((row["epoch"] for row in history if row.get("released")), None),
        "steps": steps_total,
        "diverged_at_epoch": diverged_at,
        "wall_time_s": wall,
        "history": history,
    }
    return result


def _feature_dims(model) -> dict[str, int]:
    return {m: int(enc.feature_dim) for m, enc in model.encoders.items()}


def _evaluate(model: MultimodalNet, data: MultimodalSplits, split: str, probe: bool,
              probes: Optional[ModalityProbes] = None) -> dict[str, Any]:
    """``slice_accuracy``: of the slices, or with ``signal="probes"`` of the online probes (their weights at the selected epoch)."""
    x, y = getattr(data, split)
    out = predict(model, x)
    res: dict[str, Any] = {
        "accuracy": accuracy(out.logits, y),
        "macro_f1": macro_f1(out.logits, y, data.num_classes),
        "slice_accuracy": {m: accuracy(o, y) for m, o in _modality_logits(out, probes).items()},
    }
    if probe:
        train_feats = predict(model, data.train[0]).features
        res["probe_accuracy"] = {
            m: linear_probe_accuracy(train_feats[m], data.train[1], out.features[m], y, data.num_classes)
            for m in out.features
        }
    return res
