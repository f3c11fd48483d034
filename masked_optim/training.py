"""One training loop for every method, with the metrics of SPEC §7.

Methods (``TrainConfig.method``; a masked method takes ``":channel"`` for channel granularity,
e.g. ``"amss:channel"``):

========== =========================================================================================
joint      plain SGD (``MaskedMultiModalSGD`` with ``mask="none"``: bit-identical to torch.optim.SGD)
ogm-ge     plain SGD with OGM-GE gradient modulation (SPEC §6); ``ogm`` is the same without noise
uniform    each modality's units kept uniformly at rate ``rho_m`` (biased)
amss       importance-sampled masks, kept gradients unscaled (the paper's AMSS, biased)
amss+      importance-sampled masks, kept gradients divided by ``q`` (exactly unbiased)
amss+ref   the official code's sampler and weights: ``ceil(rho_m N)`` units drawn without
           replacement, scaled by ``1 / (pi_j + 1/N)`` (python reference path)
relearn    plain SGD with Diagnosing & Re-learning (SPEC §5) every ``relearn_every`` epochs;
           ``relearn+<masked mode>`` (e.g. ``relearn+amss:channel``) combines it with a mask
========== =========================================================================================

The keep rates of the masked methods come from :class:`~masked_optim.ModalSignificance` on the
fusion head's slice logits every step. Every run of a given ``seed`` starts from the same weights
and sees the same batches, so methods can be compared pairwise. The epoch is selected on the
validation split's fused accuracy and everything is reported on the test split at that epoch.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import MultimodalSplits, load_dataset
from .fusion import modality_param_groups
from .metrics import accuracy, linear_probe_accuracy, macro_f1
from .models import MultimodalNet, build_model, predict
from .modulation import OGMGE
from .optim import MaskedMultiModalSGD
from .relearn import DiagnoseRelearn
from .significance import ModalSignificance

__all__ = ["TrainConfig", "METHODS", "DATASET_DEFAULTS", "parse_method", "method_spec", "train"]


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
    "relearn": _Method("none", granularities=("element",), relearn=True),
}
# Diagnosing & Re-learning combines with every masked mode: "relearn+amss", "relearn+amss:channel", ...
RELEARN_PREFIX = "relearn+"

# Per dataset family: epochs, learning rate and batch size. Synthetic: SPEC §8. mfeat and watch:
# the learning rate is the one joint training does best with on the validation split (README,
# "Results"), reused for every method.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {"epochs": 50, "lr": 0.01, "batch_size": 64},
    "mfeat": {"epochs": 80, "lr": 0.01, "batch_size": 64},
    "watch": {"epochs": 40, "lr": 0.01, "batch_size": 32},
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


def parse_method(spec: str) -> tuple[str, str]:
    """``"amss:channel"`` -> ``("amss", "channel")``; ``"amss"`` -> ``("amss", "element")``;
    ``"relearn+amss:channel"`` -> ``("relearn+amss", "channel")``."""
    if not isinstance(spec, str):
        raise TypeError(f"Invalid method: {spec!r}; allowed: a str such as 'amss' or 'amss:channel'")
    name, _, granularity = spec.partition(":")
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

    Estimator options (``temperature``, ``offset``, ``bias``, ``min_rate``, ``max_rate``, ``beta``)
    are :class:`~masked_optim.ModalSignificance`'s; ``estimator_features`` passes the encoder
    features so the rate uses the feature entropy (SPEC §3). ``ogm_*`` are OGM-GE's ``alpha``,
    ``start``, ``end`` (epochs). ``relearn_*`` are :class:`~masked_optim.DiagnoseRelearn`'s
    ``lam``, ``every``, ``times``, ``reset_buffers`` and ``reset_optimizer_state``. ``data_seed`` draws the synthetic data; real datasets have fixed
    splits (SPEC §7).
    """

    dataset: str = "mfeat:fac+zer"
    method: str = "amss"
    seed: int = 0
    fold: int = 0
    data_seed: int = 0
    epochs: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    smoothing: float = 0.5
    backend: str = "auto"
    temperature: float = 0.2
    offset: float = 0.5
    bias: float = 0.0
    min_rate: float = 0.1
    max_rate: float = 0.9
    beta: float = 0.0
    estimator_features: bool = True
    ogm_alpha: float = 0.8
    ogm_start: int = 0
    ogm_end: Optional[int] = None
    relearn_lam: float = 3.0
    relearn_every: int = 20
    relearn_times: int = 3
    relearn_reset_buffers: bool = False
    relearn_reset_optimizer: bool = False
    probe: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with the dataset defaults filled in and every field validated."""
        parse_method(self.method)
        family = self.dataset.partition(":")[0]
        defaults = DATASET_DEFAULTS.get(family, DATASET_DEFAULTS["synthetic"])
        out = copy.copy(self)
        for key in ("epochs", "lr", "batch_size"):
            if getattr(out, key) is None:
                setattr(out, key, defaults[key])
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
        return out


def _accuracies(out, labels: Tensor) -> dict[str, float]:
    acc = {"fused": accuracy(out.logits, labels)}
    for m, o in out.modality_logits.items():
        acc[m] = accuracy(o, labels)
    return acc


def _build(config: TrainConfig, data: MultimodalSplits):
    name, granularity = parse_method(config.method)
    method = method_spec(name)
    torch.manual_seed(config.seed)
    model = build_model(data.shapes, data.num_classes)
    optimizer = MaskedMultiModalSGD(
        modality_param_groups(model.encoders, shared=model.head),
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        mask=method.mask, granularity=granularity, sampler=method.sampler, smoothing=config.smoothing,
        seed=config.seed, backend=config.backend if method.sampler == "poisson" else "reference",
    )
    estimator = None
    if method.mask != "none":
        estimator = ModalSignificance(
            temperature=config.temperature, offset=config.offset, bias=config.bias,
            min_rate=config.min_rate, max_rate=config.max_rate, beta=config.beta,
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


def train(
    config: TrainConfig,
    data: Optional[MultimodalSplits] = None,
    *,
    progress: Optional[Callable[[dict], None]] = None,
    on_epoch_end: Optional[Callable[[int, MultimodalNet, MultimodalSplits, MaskedMultiModalSGD], Optional[dict]]] = None,
) -> dict[str, Any]:
    """Train one method on one dataset split and evaluate it (SPEC §7). Returns a JSON-ready dict.

    Args:
        config: the run (see :class:`TrainConfig`).
        data: the splits; loaded from ``config.dataset`` / ``fold`` / ``data_seed`` when None.
        progress: called after every epoch with ``{"epoch", "epochs", "val": {...}}``.
        on_epoch_end: ``f(epoch, model, data, optimizer)`` after every epoch's validation, checkpoint
            selection and re-learning; a dict it returns is stored in that epoch's history under
            ``"hook"``.

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
    if data is None:
        data = load_dataset(config.dataset, fold=config.fold, seed=config.data_seed)
    model, optimizer, estimator, modulation, relearner = _build(config, data)
    modalities = model.modalities
    x_train, y_train = data.train
    n_train = y_train.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    # Epoch 0 (the initial weights) is selected only if training diverges in the first epoch.
    best_epoch, best_acc, best_state = 0, -1.0, copy.deepcopy(model.state_dict())
    diverged_at: Optional[int] = None
    rate_total = {m: 0.0 for m in modalities}
    steps_total = rate_steps = 0
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
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
            if estimator is not None:
                feats = {m: z.detach() for m, z in out.features.items()} if config.estimator_features else None
                rates = estimator({m: o.detach() for m, o in out.modality_logits.items()}, yb, feats)
                fallbacks += int(estimator.last.fallback)
            for m in modalities:  # every attempted step counts, also one that diverges
                rate_total[m] += rates[m] if rates is not None else 1.0
            rate_steps += 1
            if modulation is not None:
                modulation.apply({m: o.detach() for m, o in out.modality_logits.items()}, yb, epoch - 1)
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
        val = _accuracies(predict(model, data.val[0]), data.val[1])
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / max(steps, 1),
            "rate": {m: rate_sum[m] / max(steps, 1) for m in modalities},
            "kept_fraction": {m: kept_sum[m] / max(steps, 1) for m in modalities},
            "fallback_fraction": fallbacks / max(steps, 1),
            "val": val,
        }
        if val["fused"] > best_acc:
            best_epoch, best_acc = epoch, val["fused"]
            best_state = copy.deepcopy(model.state_dict())
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
        if progress is not None:
            progress({"epoch": epoch, "epochs": config.epochs, "val": val, "train_loss": row["train_loss"]})
    wall = time.perf_counter() - start
    model.load_state_dict(best_state)
    result: dict[str, Any] = {
        "config": asdict(config),
        "dataset": data.name or config.dataset,
        "modalities": modalities,
        "num_classes": data.num_classes,
        "best_epoch": best_epoch,
        "val": _evaluate(model, data, "val", probe=False),
        "test": _evaluate(model, data, "test", probe=config.probe),
        "mean_rates": {m: rate_total[m] / max(rate_steps, 1) for m in modalities},
        "steps": steps_total,
        "diverged_at_epoch": diverged_at,
        "wall_time_s": wall,
        "history": history,
    }
    return result


def _evaluate(model: MultimodalNet, data: MultimodalSplits, split: str, probe: bool) -> dict[str, Any]:
    x, y = getattr(data, split)
    out = predict(model, x)
    res: dict[str, Any] = {
        "accuracy": accuracy(out.logits, y),
        "macro_f1": macro_f1(out.logits, y, data.num_classes),
        "slice_accuracy": {m: accuracy(o, y) for m, o in out.modality_logits.items()},
    }
    if probe:
        train_feats = predict(model, data.train[0]).features
        res["probe_accuracy"] = {
            m: linear_probe_accuracy(train_feats[m], data.train[1], out.features[m], y, data.num_classes)
            for m in out.features
        }
    return res
