r"""Evaluation metrics for the docs/algorithm.md §7 protocol: accuracy, macro-F1, linear probes, seed statistics.

* :func:`accuracy` and :func:`macro_f1` of predictions (or logits) against labels;
* :func:`linear_probe_accuracy`: a multinomial logistic-regression probe fitted on frozen
  features (standardised with the training features' statistics only);
* :func:`mean_std` (mean ± sample std over seeds) and :func:`paired_difference` (mean paired
  difference between two methods run on the same seeds, with its standard error).

Everything returns python floats and leaves its inputs untouched.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["accuracy", "macro_f1", "linear_probe_accuracy", "mean_std", "paired_difference"]


def _is_int_tensor(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_labels(name: str, labels, length=None) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or not _is_int_tensor(labels):
        what = f"shape {tuple(labels.shape)} dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Invalid {name}: {what}; allowed: a 1-D integer tensor of class indices")
    if labels.numel() == 0:
        raise ValueError(f"Invalid {name}: empty; allowed: at least one sample")
    if length is not None and labels.shape[0] != length:
        raise ValueError(f"Invalid {name}: {labels.shape[0]} samples; allowed: {length}, as many as the predictions/features")
    return labels


def _predictions(name: str, logits_or_pred, num_classes=None) -> Tensor:
    """(B,) integer predictions from (B, K) logits (argmax, first maximum on ties) or (B,) indices."""
    if isinstance(logits_or_pred, Tensor) and logits_or_pred.dim() == 2 and logits_or_pred.dtype.is_floating_point:
        if num_classes is not None and logits_or_pred.shape[1] != num_classes:
            raise ValueError(
                f"Invalid {name}: {logits_or_pred.shape[1]} columns; allowed: num_classes={num_classes} columns"
            )
        if logits_or_pred.shape[1] == 0:
            raise ValueError(f"Invalid {name}: shape {tuple(logits_or_pred.shape)}; allowed: at least one class column")
        return logits_or_pred.detach().argmax(dim=1)
    if isinstance(logits_or_pred, Tensor) and logits_or_pred.dim() == 1 and _is_int_tensor(logits_or_pred):
        return logits_or_pred.detach()
    what = (
        f"shape {tuple(logits_or_pred.shape)} dtype {logits_or_pred.dtype}"
        if isinstance(logits_or_pred, Tensor)
        else type(logits_or_pred).__name__
    )
    raise ValueError(f"Invalid {name}: {what}; allowed: floating (B, K) logits or a 1-D integer tensor of predicted classes")


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"Invalid num_classes: {num_classes!r} (type {type(num_classes).__name__}); allowed: an int >= 2")
    if num_classes < 2:
        raise ValueError(f"Invalid num_classes: {num_classes!r}; allowed: an int >= 2")
    return num_classes


def _check_range(name: str, t: Tensor, num_classes: int) -> None:
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"Invalid {name}: class {lo if lo < 0 else hi}; allowed: integers in [0, {num_classes - 1}]")


def accuracy(logits_or_pred: Tensor, labels: Tensor) -> float:
    r"""Fraction of correct predictions, :math:`\frac{1}{B}\sum_i [\hat y_i = y_i]`.

    ``logits_or_pred``: floating ``(B, K)`` logits (prediction = argmax, the first maximum on
    ties) or a ``(B,)`` integer tensor of predicted classes. ``labels``: ``(B,)`` integer classes.
    """
    pred = _predictions("logits_or_pred", logits_or_pred)
    labels = _check_labels("labels", labels, pred.shape[0])
    return float((pred == labels.to(pred.device)).double().mean())


def macro_f1(pred_or_logits: Tensor, labels: Tensor, num_classes: int) -> float:
    r"""Macro-averaged F1 over the classes present in the labels or the predictions.

    For class :math:`c`: :math:`F1_c = \frac{2\,tp_c}{2\,tp_c + fp_c + fn_c}` (0 when
    :math:`tp_c = 0`), and the result is the mean of :math:`F1_c` over
    :math:`C = \{y_i\} \cup \{\hat y_i\}`. Classes in neither are left out, as in scikit-learn's
    ``f1_score(y, y_hat, average="macro")`` with its default ``labels=None`` (for which it gives
    the same number).

    ``pred_or_logits``: ``(B,)`` integer predictions or floating ``(B, num_classes)`` logits;
    ``labels``: ``(B,)`` integers in ``[0, num_classes)``.
    """
    num_classes = _check_num_classes(num_classes)
    pred = _predictions("pred_or_logits", pred_or_logits, num_classes)
    labels = _check_labels("labels", labels, pred.shape[0]).to(pred.device)
    _check_range("pred_or_logits", pred, num_classes)
    _check_range("labels", labels, num_classes)
    pred, labels = pred.long(), labels.long()
    tp = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    n_true = torch.bincount(labels, minlength=num_classes).double()
    n_pred = torch.bincount(pred, minlength=num_classes).double()
    denom = n_true + n_pred  # = 2 tp + fp + fn
    present = denom > 0
    f1 = 2 * tp[present] / denom[present]
    return float(f1.mean())


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    eval_features: Tensor,
    eval_labels: Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    r"""Accuracy of a multinomial logistic-regression probe on frozen features.

    Features are detached and cast to float64 on the CPU, then standardised with the **training**
    features' statistics only, :math:`\tilde x = (x - \mu_{train}) / \sigma_{train}` (population
    std, :math:`\sigma = 1` for a constant feature), for both sets. The probe
    :math:`\mathrm{softmax}(\tilde x W + b)`, started from :math:`W = 0, b = 0`, minimises

    .. math::
        L(W, b) = \frac{1}{N}\sum_{i=1}^{N} \mathrm{CE}(\tilde x_i W + b,\ y_i)
                  + \frac{\lambda}{2} \lVert W \rVert_F^2

    (:math:`\lambda` = ``weight_decay``; the bias is not penalised) full-batch with
    ``torch.optim.LBFGS`` (strong-Wolfe line search, at most ``max_iter`` iterations). The fit is
    deterministic. Returns :func:`accuracy` of the probe on the evaluation set.

    Args:
        train_features, eval_features: ``(N, D)`` and ``(N_eval, D)`` finite floating tensors.
        train_labels, eval_labels: ``(N,)`` and ``(N_eval,)`` integers in ``[0, num_classes)``.
        num_classes: ``K >= 2``, the probe's outputs.
        weight_decay: :math:`\lambda \ge 0`.
        max_iter: LBFGS iterations, ``>= 1``.
    """
    num_classes = _check_num_classes(num_classes)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real):
        raise TypeError(f"Invalid weight_decay: {weight_decay!r}; allowed: a finite number >= 0")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; allowed: a finite number >= 0")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise TypeError(f"Invalid max_iter: {max_iter!r}; allowed: an int >= 1")
    if max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter!r}; allowed: an int >= 1")
    feats = {}
    for name, x in (("train_features", train_features), ("eval_features", eval_features)):
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
            what = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Invalid {name}: {what}; allowed: a floating (N, D) tensor")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"Invalid {name}: shape {tuple(x.shape)}; allowed: at least one sample and one feature")
        x = x.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"Invalid {name}: contains NaN or inf; allowed: finite values")
        feats[name] = x
    x_tr, x_ev = feats["train_features"], feats["eval_features"]
    if x_ev.shape[1] != x_tr.shape[1]:
        raise ValueError(
            f"Invalid eval_features: {x_ev.shape[1]} features; allowed: {x_tr.shape[1]}, as many as train_features"
        )
    y_tr = _check_labels("train_labels", train_labels, x_tr.shape[0]).detach().to("cpu", torch.long)
    y_ev = _check_labels("eval_labels", eval_labels, x_ev.shape[0]).detach().to("cpu", torch.long)
    _check_range("train_labels", y_tr, num_classes)
    _check_range("eval_labels", y_ev, num_classes)

    mean = x_tr.mean(dim=0)
    std = x_tr.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z_tr = (x_tr - mean) / std
    z_ev = (x_ev - mean) / std

    weight = torch.zeros(x_tr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )
    half_wd = 0.5 * float(weight_decay)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z_tr @ weight + bias, y_tr) + half_wd * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return accuracy(z_ev @ weight + bias, y_ev)


def _floats(name: str, values) -> list[float]:
    if isinstance(values, Tensor):
        if values.dim() > 1:
            raise ValueError(f"Invalid {name}: shape {tuple(values.shape)}; allowed: a 1-D sequence of numbers")
        values = values.detach().reshape(-1).tolist()
    elif isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"Invalid {name}: {type(values).__name__}; allowed: a 1-D sequence of numbers")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"Invalid {name}: element {v!r} (type {type(v).__name__}); allowed: real numbers")
        out.append(float(v))
    if not out:
        raise ValueError(f"Invalid {name}: empty; allowed: at least one value")
    return out


def _mean_and_sample_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if not all(math.isfinite(x) for x in xs):
        return sum(xs) / n, math.nan  # fsum raises on inf - inf; plain sum gives inf or nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    r"""``(mean, sample std)`` of values (e.g. one metric over seeds).

    :math:`\bar x = \frac{1}{n}\sum x_i`, :math:`s = \sqrt{\frac{1}{n-1}\sum (x_i - \bar x)^2}`
    (``ddof=1``). A single value has std ``0.0`` (chosen so that a one-seed table still prints;
    it is not an estimate). NaN or inf values propagate. Accepts a list, tuple, 1-D array or
    1-D tensor; raises on an empty input.
    """
    xs = _floats("values", values)
    mean, std = _mean_and_sample_std(xs)
    return mean, (0.0 if len(xs) == 1 else std)


def paired_difference(a: Iterable[float], b: Iterable[float]) -> tuple[float, float]:
    r"""Mean paired difference and its standard error, ``(mean(d), se(d))`` with :math:`d_i = a_i - b_i`.

    :math:`\bar d = \frac{1}{n}\sum d_i`, :math:`\mathrm{se} = s_d / \sqrt{n}` with :math:`s_d`
    the sample std (``ddof=1``). For ``n = 1`` the standard error is ``nan`` (undefined). ``a``
    and ``b`` are paired by position (e.g. two methods on the same seeds) and must have the
    same length.
    """
    xa, xb = _floats("a", a), _floats("b", b)
    if len(xa) != len(xb):
        raise ValueError(f"Invalid b: {len(xb)} values; allowed: {len(xa)}, as many as a (paired by position)")
    d = [x - y for x, y in zip(xa, xb)]
    mean, std = _mean_and_sample_std(d)
    return mean, std / math.sqrt(len(d))
