"""The readable single-tensor reference of the masked SGD step (docs/algorithm.md §2).

This module is the oracle: every other implementation (foreach, fused C++/CUDA/Triton kernels)
must reproduce it. It is written for clarity, one tensor at a time, in plain PyTorch ops, and it
synchronises with the host nowhere.

For each tensor, the update is

1. importance ``s_j = g_j**2`` per element, or per slice along dim 0 (``granularity="channel"``);
2. inclusion probability ``q_j = min(1, alpha * s_j + beta)`` where the two per-tensor scalars
   ``alpha = c (1 - gamma) / sum(s)`` and ``beta = c gamma / N`` come from water-filling
   (``alpha = 0, beta = c / N`` when ``sum(s) = 0``; ``alpha = 0, beta = rate`` for
   ``mask="uniform"``); with ``rate = 1`` every unit is kept and nothing is rescaled;
3. mask ``M_j = u_j < q_j`` with ``u_j`` the Philox uniform of unit ``j`` (docs/algorithm.md §4);
4. masked gradient ``M g`` (``amss``, ``uniform``) or ``M g / q`` (``amss+``, unbiased uniform);
5. ``torch.optim.SGD``'s update, op for op, on the masked gradient.

``mask="scale"`` (docs/algorithm.md §2.5) skips steps 1-4: no scores, no sampling, no random numbers. The
gradient is multiplied by the rate, ``g~ = rate * g`` (one rounded product in the compute dtype,
as ``torch.mul(g, rate)``), i.e. a per-modality step size on the gradient only (weight decay and
momentum are applied after, as for every mode). Granularity, ``sampler`` and ``unbiased`` do not
apply to it and are ignored here (the optimizer refuses ``unbiased=True``); every unit counts as
kept. ``rate = 1`` is plain SGD, as for the other modes.

The rule is stated once here for Python: :func:`inclusion_probability` (``q``),
:func:`masked_gradient_given_scalars` (mask and unit weight; :func:`masked_gradient` uses it) and the
SGD tail of ``_single_tensor_masked_sgd``. The C++/CUDA statement is csrc/masked_sgd_math.h.

Half-precision tensors (float16, bfloat16) are processed in float32 ("opmath") and rounded back
once per step, as the fused kernels do; float32 and float64 tensors are processed in their own
dtype, so that with masking off the update is bit-identical to ``torch.optim.SGD``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .rng import philox_uniform

__all__ = [
    "MASKS",
    "GRANULARITIES",
    "SAMPLERS",
    "masked_sgd",
    "masked_adamw",
    "unit_mask",
    "sampled_units",
    "masked_gradient",
    "masked_gradient_given_scalars",
    "inclusion_probability",
    "unit_scores",
    "inclusion_scalars",
    "multinomial_keep_count",
    "ShardSpec",
]

MASKS = ("none", "uniform", "amss", "amss+", "scale")
GRANULARITIES = ("element", "channel")
SAMPLERS = ("poisson", "multinomial")
WATERFILL_MAX_ITER = 4


@dataclass(frozen=True)
class ShardSpec:
    """Where a local tensor sits in a tensor sharded along dim 0 (FSDP), for an exact sharded step.

    ``unit_offset``: global index of the first local unit; ``num_units``: units of the whole
    tensor; ``all_reduce(t, op)``: reduces the small tensor ``t`` over the shards (``op`` is
    ``"sum"`` or ``"max"``), in place, and returns it. With it, the per-tensor scalars are those
    of the whole tensor and each unit draws its global uniform, so every shard applies its part of
    the unsharded mask (up to the rounding of a sum taken in another order).
    """

    unit_offset: int
    num_units: int
    all_reduce: Callable[[Tensor, str], Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _num_units(shape: torch.Size, granularity: str) -> int:
    if granularity == "channel" and len(shape) > 0:
        return shape[0]
    return math.prod(shape)


def unit_scores(grad: Tensor, granularity: str) -> Tensor:
    """Importance per unit: ``g**2`` per element, or its sum over each slice along dim 0.

    Returned as a 1-D tensor of ``N`` units in the compute dtype (float32, or float64 for
    float64 gradients). A 0-d tensor is one unit.
    """
    g = grad.to(_compute_dtype(grad.dtype))
    if granularity == "channel" and g.dim() > 0:
        if g.numel() == 0:  # (0, ...) has no units; (k, 0, ...) has k units of score 0
            return g.new_zeros(g.shape[0])
        return g.reshape(g.shape[0], -1).square().sum(dim=1)
    return g.reshape(-1).square()


def inclusion_scalars(
    scores: Tensor,
    rate: float,
    smoothing: float,
    max_iter: int = WATERFILL_MAX_ITER,
    shard: Optional[ShardSpec] = None,
) -> tuple[Tensor, Tensor]:
    """Per-tensor scalars ``(alpha, beta)`` with ``q_j = min(1, alpha * s_j + beta)`` (docs/algorithm.md §2.3).

    ``q_j = min(1, c * pt_j)`` with ``pt_j = (1 - gamma) * s_j / S + gamma / N`` and the
    water-filling constant ``c`` that makes ``sum_j q_j = rate * N``: ``c = rate * N`` when
    ``rate * N * max(pt) <= 1`` (nothing saturates), else the fixed point of
    ``c <- (rate * N - #saturated) / sum(unsaturated pt)`` after at most ``max_iter`` rounds.

    The iteration runs a fixed number of rounds without host synchronisation: ``c`` never
    decreases, the saturated set only grows, and once it stops growing ``c`` is recomputed from
    the same set, so extra rounds change nothing (identical to stopping early).

    With ``shard``, ``scores`` are the local units of a sharded tensor and every sum and maximum
    is reduced over the shards (``2 + max_iter`` reductions of at most two numbers).
    """
    n = scores.numel() if shard is None else shard.num_units
    if n == 0:
        return scores.new_zeros(()), scores.new_zeros(())
    gamma = float(smoothing)
    budget = float(rate) * n
    total = scores.sum() if shard is None else shard.all_reduce(scores.sum(), "sum")
    has_signal = total > 0
    pi = torch.where(has_signal, scores / total, 1.0 / n)
    pt = pi * (1.0 - gamma) + gamma / n
    c = scores.new_full((), budget)  # a fill, not a host-to-device copy
    if shard is None:
        pt_max = pt.max()
    else:
        pt_max = shard.all_reduce(pt.max() if pt.numel() else pt.new_zeros(()), "max")
    nothing_saturates = pt_max * budget <= 1.0
    c_iter = c
    for _ in range(max_iter):
        saturated = pt * c_iter >= 1.0
        rest = torch.where(saturated, 0.0, pt).sum()
        count = saturated.sum().to(scores.dtype)
        if shard is not None:
            rest, count = shard.all_reduce(torch.stack([rest, count]), "sum").unbind()
        free = budget - count
        c_iter = torch.where(rest > 0, free / rest, math.inf)
    c = torch.where(nothing_saturates, c, c_iter)
    # pt_j * c == alpha * s_j + beta, with the "no signal" case folded into beta.
    alpha = torch.where(has_signal, c * (1.0 - gamma) / total, 0.0)
    beta = torch.where(has_signal, c * gamma / n, c / n)
    return alpha, beta


def inclusion_probability(scores: Tensor, alpha: Union[Tensor, float], beta: Union[Tensor, float]) -> Tensor:
    """``q_j = min(1, alpha * s_j + beta)`` (docs/algorithm.md §2.3): the product, then the sum, each
    rounded in the compute dtype; a NaN propagates (``clamp_max``), so a NaN ``q`` keeps nothing.

    The one Python statement of the rule; the C++/CUDA one is ``inclusion_probability`` in
    csrc/masked_sgd_math.h, the Triton one is in ``_masked_sgd_kernel``.
    """
    return (scores * alpha + beta).clamp_max(1.0)


def multinomial_keep_count(rate: float, n: int) -> int:
    """``ceil(rate * n)`` for the multinomial sampler, at least 1 unit when ``n > 0``.

    A relative slack of 1e-12 absorbs binary rounding, so that ``rate=0.3, n=10`` keeps 3 units
    (``0.3 * 10 == 3.0000000000000004`` in floating point).
    """
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(rate * n * (1.0 - 1e-12))))


def _unit_view(x: Tensor, like: Tensor, granularity: str) -> Tensor:
    """Broadcast a per-unit vector against a tensor of shape ``like.shape``."""
    if granularity == "channel" and like.dim() > 0:
        return x.view(like.shape[0], *([1] * (like.dim() - 1)))
    return x.view(like.shape)


def masked_gradient(
    grad: Tensor,
    *,
    rate: float,
    key: int,
    mask: str = "amss+",
    granularity: str = "element",
    smoothing: float = 0.5,
    sampler: str = "poisson",
    unbiased: Optional[bool] = None,
    max_iter: int = WATERFILL_MAX_ITER,
    shard: Optional[ShardSpec] = None,
) -> tuple[Tensor, Union[Tensor, int]]:
    """The masked gradient ``g~`` of docs/algorithm.md §2.5 and the number of units kept.

    ``grad`` must already be negated for ``maximize``. The result is in the compute dtype
    (float32 for half-precision gradients). ``key`` is the Philox key of this tensor at this step
    (:func:`masked_optim.rng.derive_key`). The count is a 0-d int64 tensor on the gradient's
    device when units were sampled; with ``mask="none"`` or ``rate >= 1`` the gradient is returned
    unchanged and the count is the python int ``N`` (no device work on the dense path). With
    ``mask="scale"`` the result is ``rate * g`` and the count is the python int ``N`` (no unit is
    dropped; ``granularity``, ``sampler`` and ``unbiased`` are ignored).

    ``shard`` (:class:`ShardSpec`): ``grad`` is the local shard (along dim 0) of a larger tensor;
    the result is the local part of the whole tensor's masked gradient and the count is local.
    """
    cdtype = _compute_dtype(grad.dtype)
    g = grad.to(cdtype)
    n = _num_units(grad.shape, granularity)
    if mask == "none" or rate >= 1.0 or (n == 0 if shard is None else shard.num_units == 0):
        return g, n
    if mask == "scale":  # a per-modality step size: no sampling, local to each shard
        return g * float(rate), n
    keep, weight = unit_mask(
        g, rate=rate, key=key, mask=mask, granularity=granularity, smoothing=smoothing, sampler=sampler,
        unbiased=unbiased, max_iter=max_iter, shard=shard,
    )
    return _apply_mask(g, keep, weight, granularity)


def unit_mask(
    grad: Tensor,
    *,
    rate: float,
    key: int,
    mask: str,
    granularity: str = "element",
    smoothing: float = 0.5,
    sampler: str = "poisson",
    unbiased: Optional[bool] = None,
    max_iter: int = WATERFILL_MAX_ITER,
    shard: Optional[ShardSpec] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """The mask of one sampled step: ``(keep, weight)`` per unit (``weight`` None when biased).

    For a sampling ``mask`` (``uniform``, ``amss``, ``amss+``) at ``rate < 1`` on a tensor with units;
    ``grad`` is in the compute dtype, already negated for ``maximize``. The Poisson sampler computes
    the water-filling scalars (:func:`inclusion_scalars`) and draws with :func:`sampled_units`; the
    multinomial one keeps ``ceil(rate N)`` units as the official AMSS code. :func:`masked_gradient`
    (SGD) and :func:`masked_adamw` (AdamW) both draw their masks here.
    """
    cdtype = _compute_dtype(grad.dtype)
    n = _num_units(grad.shape, granularity)
    if unbiased is None:
        unbiased = mask == "amss+"
    if shard is not None and sampler == "multinomial":
        raise ValueError(
            "Invalid sampler='multinomial' for a sharded (FSDP) tensor; allowed: 'poisson' (the "
            "multinomial sampler needs a global top-k over the whole tensor)"
        )
    if sampler != "multinomial":
        scalars = scores = None
        if mask != "uniform":
            scores = unit_scores(grad, granularity)
            scalars = inclusion_scalars(scores, rate, smoothing, max_iter, shard)
        return sampled_units(
            grad, rate=rate, key=key, mask=mask, granularity=granularity, scalars=scalars, scores=scores,
            unbiased=unbiased, unit_offset=0 if shard is None else shard.unit_offset,
        )
    u = philox_uniform(key, n, device=grad.device)
    if mask == "uniform":
        pi = torch.full((n,), 1.0 / n, dtype=cdtype, device=grad.device)
    else:
        scores = unit_scores(grad, granularity)
        total = scores.sum()
        pi = torch.where(total > 0, scores / total, 1.0 / n)
    k = multinomial_keep_count(rate, n)
    # Sequential sampling without replacement with probability proportional to pi is the
    # k smallest of E_j / pi_j with E_j ~ Exp(1) (Efraimidis & Spirakis); E_j = -log(1 - u_j).
    exp_keys = -torch.log1p(-u.to(cdtype)) / pi
    keep = torch.zeros(n, dtype=torch.bool, device=grad.device)
    keep[torch.topk(exp_keys, k, largest=False, sorted=False).indices] = True
    if not unbiased:
        weight = None
    elif mask == "uniform":
        weight = torch.full_like(pi, 1.0 / rate)
    else:  # the official code's AMSS+ weights, not 1/q (docs/algorithm.md §2)
        weight = 1.0 / (pi + 1.0 / n)
    return keep, weight


def masked_gradient_given_scalars(
    grad: Tensor,
    *,
    rate: float,
    key: int,
    mask: str = "amss+",
    granularity: str = "element",
    scalars: Union[Tensor, tuple, None] = None,
    scores: Optional[Tensor] = None,
    unbiased: Optional[bool] = None,
    unit_offset: int = 0,
) -> tuple[Tensor, Union[Tensor, int]]:
    """:func:`masked_gradient` (Poisson sampler) given the per-tensor scalars instead of computing them.

    ``scalars = [alpha, beta]`` (a 2-element tensor or a pair) and, optionally, the unit ``scores``
    (default :func:`unit_scores` of ``grad``) give ``q_j = min(1, alpha s_j + beta)`` for ``amss`` /
    ``amss+``; ``uniform`` has ``q_j = rate`` and ignores them; ``none``, ``rate >= 1`` and ``scale``
    sample nothing (``g`` and ``rate * g``, with the python int ``N`` as the count). The mask is
    ``u_j < q_j`` with the Philox uniform of global unit ``unit_offset + j`` under ``key``; kept units
    are weighted by ``1 / q_j`` when ``unbiased`` (default: ``mask == "amss+"``). Returns ``g~`` in the
    compute dtype and the kept count (a 0-d int64 tensor when sampled).

    :func:`masked_gradient` computes its masks with this function: with ``inclusion_scalars``' output
    the two agree bit for bit. The kernel tests feed it the scalars a kernel used.
    """
    cdtype = _compute_dtype(grad.dtype)
    g = grad.to(cdtype)
    n = _num_units(grad.shape, granularity)
    if mask == "none" or rate >= 1.0:
        return g, n
    if mask == "scale":  # a per-modality step size: no sampling, local to each shard
        return g * float(rate), n
    keep, weight = sampled_units(
        g, rate=rate, key=key, mask=mask, granularity=granularity, scalars=scalars, scores=scores,
        unbiased=unbiased, unit_offset=unit_offset,
    )
    return _apply_mask(g, keep, weight, granularity)


def sampled_units(
    grad: Tensor,
    *,
    rate: float,
    key: int,
    mask: str,
    granularity: str = "element",
    scalars: Union[Tensor, tuple, None] = None,
    scores: Optional[Tensor] = None,
    unbiased: Optional[bool] = None,
    unit_offset: int = 0,
) -> tuple[Tensor, Optional[Tensor]]:
    """The mask of one sampled step (Poisson sampler): ``(keep, weight)``, per unit.

    ``keep[j] = u_j < q_j`` (docs/algorithm.md §2.4) with ``q_j = rate`` (``mask="uniform"``) or
    ``min(1, alpha s_j + beta)`` from ``scalars = [alpha, beta]`` (``amss``, ``amss+``), and
    ``weight = 1 / q`` when ``unbiased`` (default: ``mask == "amss+"``), else None. ``grad`` is in the
    compute dtype, already negated for ``maximize``. Both optimizers' references draw their masks
    here (the SGD step weights the gradient, the AdamW step the update: docs/algorithm.md §2.8).
    """
    cdtype = _compute_dtype(grad.dtype)
    n = _num_units(grad.shape, granularity)
    if unbiased is None:
        unbiased = mask == "amss+"
    if mask == "uniform":
        q = torch.full((n,), float(rate), dtype=cdtype, device=grad.device)
    else:
        if scalars is None:
            raise ValueError(f"masked_gradient_given_scalars: mask={mask!r} needs scalars=[alpha, beta]")
        q = inclusion_probability(unit_scores(grad, granularity) if scores is None else scores, scalars[0], scalars[1])
    u = philox_uniform(key, n, device=grad.device, offset=unit_offset)
    keep = u.to(cdtype) < q
    return keep, (1.0 / q if unbiased else None)


def _apply_mask(g: Tensor, keep: Tensor, weight: Optional[Tensor], granularity: str) -> tuple[Tensor, Tensor]:
    """``g~ = M g`` (``weight`` None) or ``M g * weight`` per unit, and the number of units kept."""
    if weight is None:
        g_masked = torch.where(_unit_view(keep, g, granularity), g, 0.0)
    else:
        g_masked = torch.where(_unit_view(keep, g, granularity), g * _unit_view(weight, g, granularity), 0.0)
    return g_masked, keep.sum()


def _single_tensor_masked_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Optional[Tensor]],
    keys: list[int],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    mask: str,
    rate: float,
    granularity: str,
    smoothing: float,
    sampler: str,
    unbiased: Optional[bool],
    max_iter: int,
    shards: Optional[list[Optional[ShardSpec]]] = None,
) -> list[Union[Tensor, int]]:
    kept_counts = []
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        grad, kept = masked_gradient(
            grad,
            rate=rate,
            key=keys[i],
            mask=mask,
            granularity=granularity,
            smoothing=smoothing,
            sampler=sampler,
            unbiased=unbiased,
            max_iter=max_iter,
            shard=None if shards is None else shards[i],
        )
        kept_counts.append(kept)
        # torch.optim.SGD's single-tensor update, op for op, in the compute dtype.
        p = param if param.dtype == grad.dtype else param.to(grad.dtype)
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = torch.clone(grad).detach()
                momentum_buffer_list[i] = buf if buf.dtype == param.dtype else buf.to(param.dtype)
            else:
                b = buf if buf.dtype == grad.dtype else buf.to(grad.dtype)
                b.mul_(momentum).add_(grad, alpha=1 - dampening)
                if b is not buf:
                    buf.copy_(b)
                buf = b
            if nesterov:
                grad = grad.add(buf, alpha=momentum)
            else:
                grad = buf
        if p is param:
            param.add_(grad, alpha=-lr)
        else:
            param.copy_(p.add_(grad, alpha=-lr))
    return kept_counts


def masked_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Optional[Tensor]],
    keys: list[int],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    mask: str = "amss+",
    rate: float = 1.0,
    granularity: str = "element",
    smoothing: float = 0.5,
    sampler: str = "poisson",
    unbiased: Optional[bool] = None,
    max_iter: int = WATERFILL_MAX_ITER,
    shards: Optional[list[Optional[ShardSpec]]] = None,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> list[Union[Tensor, int]]:
    """Functional masked SGD over a list of tensors that share one modality and one rate.

    Updates ``params`` in place and ``momentum_buffer_list`` in place (a ``None`` entry is
    replaced by the new buffer on the first step with momentum, as ``torch.optim.sgd``).
    ``keys[i]`` is the Philox key of ``params[i]`` for this step. Returns, per tensor, the number
    of units kept (see :func:`masked_gradient`: device tensors, read lazily, or python ints).
    ``shards[i]``, when given and not None, says that ``params[i]`` is a local shard
    (:class:`ShardSpec`). With nothing to mask (``mask="none"`` or ``rate >= 1``), ``foreach=True``
    or ``fused=True`` runs ``torch.optim.SGD``'s multi-tensor or fused step instead of the
    single-tensor one (as ``torch.optim.sgd.sgd``); otherwise they are ignored.
    """
    if (foreach or fused) and (mask == "none" or rate >= 1.0):
        from torch.optim.sgd import sgd  # noqa: PLC0415

        sgd(params, [g for g in grads], momentum_buffer_list, foreach=foreach, fused=fused, weight_decay=weight_decay,
            momentum=momentum, lr=lr, dampening=dampening, nesterov=bool(nesterov), maximize=maximize)
        return [_num_units(p.shape, granularity) for p in params]
    if shards is not None and len(shards) != len(params):
        raise ValueError(f"masked_sgd: shards must have one entry per param, got {len(shards)} for {len(params)}")
    if not (len(params) == len(grads) == len(momentum_buffer_list) == len(keys)):
        raise ValueError(
            "masked_sgd: params, grads, momentum_buffer_list and keys must have equal lengths, got "
            f"{len(params)}, {len(grads)}, {len(momentum_buffer_list)}, {len(keys)}"
        )
    return _single_tensor_masked_sgd(
        params,
        grads,
        momentum_buffer_list,
        keys,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        mask=mask,
        rate=rate,
        granularity=granularity,
        smoothing=smoothing,
        sampler=sampler,
        unbiased=unbiased,
        max_iter=max_iter,
        shards=shards,
    )


def _adamw_dense(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                 weight_decay, amsgrad, maximize, foreach=None, fused=None) -> None:
    """``torch.optim.AdamW``'s own step (``torch.optim.adamw.adamw``, with its ``foreach`` / ``fused``
    choice; None: torch's default, the for-loop on CPU tensors), so that masking off is AdamW bit for
    bit. ``max_exp_avg_sqs`` entries may be None without amsgrad."""
    from torch.optim.adamw import adamw  # noqa: PLC0415

    adamw(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps,
        foreach=foreach, fused=fused,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize,
    )


def masked_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Optional[Tensor]],
    state_steps: list[Tensor],
    keys: list[int],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: str = "amss+",
    rate: float = 1.0,
    granularity: str = "element",
    smoothing: float = 0.5,
    sampler: str = "poisson",
    unbiased: Optional[bool] = None,
    max_iter: int = WATERFILL_MAX_ITER,
    shards: Optional[list[Optional[ShardSpec]]] = None,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> list[Union[Tensor, int]]:
    """Functional masked AdamW (docs/algorithm.md §2.8) over tensors that share one modality and rate.

    State as :class:`torch.optim.AdamW`'s: ``exp_avgs``, ``exp_avg_sqs`` (and ``max_exp_avg_sqs``
    with ``amsgrad``) are updated in place, and each 0-d ``state_steps`` tensor is incremented (a
    tensor's step counts every step it has a gradient, kept units or not). ``keys[i]`` is the Philox
    key of ``params[i]`` for this step; the masks are those of the SGD step (:func:`unit_mask`).

    * ``mask="none"``, ``rate >= 1``: ``torch.optim.AdamW``'s own step (bit for bit), with its
      ``foreach`` / ``fused`` choice (None: torch's default).
    * ``mask="scale"``: the same with ``lr * rate``: the whole step, Adam update and decoupled
      weight decay, times the rate.
    * ``uniform``, ``amss``, ``amss+``: a lazy step. A unit that is not kept is untouched (its
      parameter, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), as in ``torch.optim.SparseAdam``;
      a kept unit takes the AdamW step, ``p <- p - w (lr wd p + lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps))``
      with the bias corrections of the tensor's step, ``w = 1/q`` when unbiased (``amss+``, unbiased
      ``uniform``) and 1 otherwise.

    Returns the kept-unit count per tensor (as :func:`masked_sgd`). Half-precision tensors are
    updated in float32 and rounded back once on the masked path; the dense and scale paths are
    torch's, in the tensor's dtype.
    """
    n_params = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(max_exp_avg_sqs) == len(state_steps) == len(keys) == n_params):
        raise ValueError(
            "masked_adamw: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps and keys must have "
            f"equal lengths, got {n_params}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, "
            f"{len(max_exp_avg_sqs)}, {len(state_steps)}, {len(keys)}"
        )
    if shards is not None and len(shards) != n_params:
        raise ValueError(f"masked_adamw: shards must have one entry per param, got {len(shards)} for {n_params}")
    hyper = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    if mask in ("none", "scale") or rate >= 1.0:
        _adamw_dense(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                     lr=lr * rate if mask == "scale" and rate < 1.0 else lr, foreach=foreach, fused=fused, **hyper)
        return [_num_units(p.shape, granularity) for p in params]
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)  # tensors: the masked step's scalars are numbers
    kept_counts: list[Union[Tensor, int]] = []
    for i, param in enumerate(params):
        shard = None if shards is None else shards[i]
        n = _num_units(param.shape, granularity)
        if n == 0 if shard is None else shard.num_units == 0:
            _adamw_dense([param], [grads[i]], [exp_avgs[i]], [exp_avg_sqs[i]], [max_exp_avg_sqs[i]], [state_steps[i]],
                         lr=lr, **hyper)
            kept_counts.append(n)
            continue
        cdtype = _compute_dtype(param.dtype)
        g = grads[i].to(cdtype)
        g = -g if maximize else g
        keep, weight = unit_mask(
            g, rate=rate, key=keys[i], mask=mask, granularity=granularity, smoothing=smoothing, sampler=sampler,
            unbiased=unbiased, max_iter=max_iter, shard=shard,
        )
        kept_counts.append(keep.sum())
        state_steps[i] += 1
        step = float(state_steps[i])
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        p, m, v = param.to(cdtype), exp_avgs[i].to(cdtype), exp_avg_sqs[i].to(cdtype)
        m_new = m.lerp(g, 1 - beta1)
        v_new = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
        k = _unit_view(keep, p, granularity)
        if amsgrad:
            vmax_new = torch.maximum(max_exp_avg_sqs[i].to(cdtype), v_new)
            denom = (vmax_new.sqrt() / bias_correction2_sqrt).add_(eps)
            max_exp_avg_sqs[i].copy_(torch.where(k, vmax_new, max_exp_avg_sqs[i].to(cdtype)))
        else:
            denom = (v_new.sqrt() / bias_correction2_sqrt).add_(eps)
        delta = (m_new / denom).mul_(lr / bias_correction1)
        if weight_decay != 0:
            delta.add_(p, alpha=lr * weight_decay)
        if weight is not None:
            delta.mul_(_unit_view(weight, p, granularity))
        param.copy_(torch.where(k, p - delta, p))
        exp_avgs[i].copy_(torch.where(k, m_new, m))
        exp_avg_sqs[i].copy_(torch.where(k, v_new, v))
    return kept_counts
