"""``MaskedMultiModalSGD``: ``torch.optim.SGD`` that updates a sampled subnetwork of each modality."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from ._base import (
    NONFINITE_POLICIES,
    DTensor,
    MaskedOptimizer,
    ModalityStats,
    StepStats,
    _check_impl_flags,
    _check_lr,
    _check_number,
    _is_dtensor,
    _is_number,
    _local,
)
from .backends.dispatch import GroupTensors, masked_sgd_step

__all__ = ["MaskedMultiModalSGD", "StepStats", "ModalityStats", "NONFINITE_POLICIES"]


class MaskedMultiModalSGD(MaskedOptimizer):
    r"""SGD that, for every modality, updates only an importance-sampled subnetwork (AMSS / AMSS+),
    or (``mask="scale"``) scales each modality's gradient by its rate.

    A drop-in replacement for :class:`torch.optim.SGD`. Parameter groups carry a ``modality``
    (a string, or ``None`` for shared parameters such as a fusion head, which are updated densely)
    and may opt out of masking with ``masked=False``. Every modality ``m`` has a keep rate
    :math:`\rho_m \in (0, 1]` (:meth:`set_rates`, or ``step(rates=...)`` for one step; 1.0 until
    set, which is a dense SGD step). For each tensor of a masked group, with gradient :math:`g`
    (negated when ``maximize``), the sampling modes draw

    .. math::
        s_j = g_j^2, \quad
        \tilde\pi_j = (1-\gamma)\frac{s_j}{\sum_i s_i} + \frac{\gamma}{N}, \quad
        q_j = \min(1, c\,\tilde\pi_j), \quad \sum_j q_j = \rho_m N, \quad
        M_j \sim \mathrm{Bernoulli}(q_j)

    with one unit per element (``granularity="element"``) or per slice along dim 0
    (``"channel"``), :math:`\gamma` = ``smoothing`` and :math:`M_j` drawn from Philox4x32-10
    (bit-identical on every backend and rank; see :mod:`masked_optim.rng`). The masked gradient is

    * ``mask="none"``: :math:`\tilde g = g` (exactly ``torch.optim.SGD``);
    * ``mask="uniform"``: :math:`q_j = \rho_m`, :math:`\tilde g = M g` (:math:`M g / \rho_m` with
      ``unbiased=True``);
    * ``mask="amss"``: :math:`\tilde g = M g` (biased: the expected update is :math:`q g`);
    * ``mask="amss+"``: :math:`\tilde g = M g / q` (unbiased: :math:`E[\tilde g] = g`);
    * ``mask="scale"``: :math:`\tilde g = \rho_m g`, no sampling and no random numbers: a
      per-modality step size on the gradient only (the expected update of ``uniform`` without its
      noise). Every unit is updated, so :meth:`last_step_stats` reports ``kept_fraction`` 1.0 and
      ``kept_units == total_units``; ``granularity`` does not change the result and ``sampler`` is
      ignored (any backend runs it); ``unbiased=True`` is an error.

    ``sampler="multinomial"`` instead keeps exactly :math:`\lceil \rho_m N \rceil` units drawn
    without replacement with probability proportional to :math:`s_j`, and ``amss+`` then scales a
    kept unit by :math:`1 / (\pi_j + 1/N)`, as the official AMSS code (biased; see the README).

    Then, exactly as :class:`torch.optim.SGD` (masking acts on the gradient only, so weight decay
    and momentum still move masked-out elements):

    .. math::
        d = \tilde g + \lambda p, \quad
        b \leftarrow \mu b + (1 - \tau) d \;(b = d \text{ on the first step}), \quad
        d = d + \mu b \text{ (nesterov) or } b, \quad p \leftarrow p - \eta d

    Args:
        params: parameters or parameter groups (dicts). Groups may set ``modality``, ``masked``,
            ``rate`` and override every keyword below except ``nonfinite``.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as :class:`torch.optim.SGD`.
        mask: ``"scale"`` (default: no mask, the gradient times the rate; with
            ``ModalSignificance(rule="ratio")`` and its default release, the configuration the README's
            "Which method should I use?" measured best), ``"none"``, ``"uniform"``, ``"amss"`` or ``"amss+"`` (the paper's
            AMSS / AMSS+, with ``ModalSignificance(rule="softmax")``).
        granularity: ``"element"`` (default) or ``"channel"``.
        smoothing: :math:`\gamma \in [0, 1]`, mixes the importance with the uniform distribution
            so that no unit is rescaled by more than :math:`1 / (\rho_m \gamma)` (default 0.5).
        sampler: ``"poisson"`` (default) or ``"multinomial"`` (reference-faithful, python only).
            Ignored by ``mask="scale"``, which samples nothing.
        unbiased: ``None`` (default: the mode's own meaning), or ``True`` with ``mask="uniform"``
            to rescale kept units by :math:`1/\rho_m`. ``amss`` and ``scale`` are biased and
            ``amss+`` unbiased by definition; contradicting them is an error.
        seed: non-negative int keying the mask stream. The mask of tensor ``i`` at its ``t``-th
            step is a pure function of ``(seed, t, i)``, and both are in :meth:`state_dict`.
        backend: ``"auto"`` (default: the fused kernel for the tensors' device when available, else
            the reference with a one-time warning), ``"reference"`` (pure PyTorch), ``"cpp"``,
            ``"cuda"`` or ``"triton"`` (an explicit backend that cannot run raises
            :class:`~masked_optim.backends.BackendUnavailable`). Tensors with nothing to mask (shared
            or ``masked=False`` groups, ``mask="none"``, rate 1, ``scale`` included) always run
            ``torch.optim.SGD``'s own ops, so that masking off is SGD bit for bit on every backend.
        nonfinite: what a step does when a gradient holds NaN or Inf: ``"raise"`` (default,
            nothing is updated), ``"skip"`` (nothing is updated; :meth:`last_step_stats` reports
            it and ``skipped_steps`` counts it) or ``"ignore"`` (update anyway, like
            ``torch.optim.SGD``, saving one host synchronisation per step).
        foreach, fused: as :class:`torch.optim.SGD`'s, for the tensors with nothing to mask (which run
            torch's SGD): ``True`` picks torch's multi-tensor or fused step for them (None: the
            single-tensor step, exactly ``torch.optim.SGD``'s for-loop). Masked tensors always run
            ``backend``'s kernel. Both True is an error.
        differentiable: False only (the masked steps run under ``torch.no_grad``).

    Example:
        >>> opt = MaskedMultiModalSGD(modality_param_groups({"audio": a, "video": v}, shared=[head]),
        ...                           lr=0.01, momentum=0.9)
        >>> opt.set_rates({"audio": 0.3, "video": 0.8})
        >>> loss.backward(); opt.step()
    """

    kind = "sgd"
    _torch_name = "torch.optim.SGD"
    _state_name = "MaskedMultiModalSGD.state_dict() (or torch.optim.SGD's)"

    def __init__(
        self,
        params: Iterable[Union[Tensor, dict[str, Any]]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        mask: str = "scale",
        granularity: str = "element",
        smoothing: float = 0.5,
        sampler: str = "poisson",
        unbiased: Optional[bool] = None,
        seed: int = 0,
        backend: str = "auto",
        nonfinite: str = "raise",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            mask=mask,
            granularity=granularity,
            smoothing=smoothing,
            sampler=sampler,
            unbiased=unbiased,
            seed=seed,
            backend=backend,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, nonfinite)

    # ------------------------------------------------------------------ the SGD rule
    @classmethod
    def _validate_hyper(cls, group: Mapping[str, Any], where: str) -> None:
        p = where
        _check_lr(f"{p}lr", group["lr"])
        # "momentum value", as torch.optim.SGD words it (its own error tests match that phrase)
        _check_number(f"{p}momentum value", group["momentum"], low=0.0, allowed="a number >= 0")
        if not _is_number(group["dampening"]):  # any number, as torch.optim.SGD (NaN included)
            raise TypeError(f"Invalid {p}dampening: {group['dampening']!r} (type {type(group['dampening']).__name__}); allowed: a number")
        _check_number(f"{p}weight_decay", group["weight_decay"], low=0.0, allowed="a number >= 0")
        if not isinstance(group["nesterov"], (bool, int)):  # torch.optim.SGD takes any truth value; an int too
            raise TypeError(f"Invalid {p}nesterov: {group['nesterov']!r}; allowed: True or False (or an int)")
        _check_impl_flags(group, p)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"Invalid {p}nesterov=True with momentum={group['momentum']!r} and "
                f"dampening={group['dampening']!r}; allowed: nesterov requires momentum > 0 and dampening == 0"
            )

    def _check_state_entry(self, entry: Mapping[str, Any], p: Tensor, where: str) -> None:
        buf = entry.get("momentum_buffer")
        shape = tuple(p.shape)  # global shapes for DTensors
        if buf is not None and (not isinstance(buf, Tensor) or tuple(buf.shape) != shape):
            got = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
            raise ValueError(
                f"Invalid state_dict: momentum_buffer of {where} is {got}; allowed: a tensor of the parameter's shape {shape}"
            )
        step = entry.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid state_dict: step of {where} is {step!r}; allowed: a non-negative int")

    def _gather_state(self, batch: GroupTensors) -> None:
        batch.momentum_buffers = [_local(self.state[p].get("momentum_buffer")) for p in batch.params]

    def _update(self, batch: GroupTensors) -> list[Union[Tensor, int]]:
        """Run the step, then store the momentum buffers it wrote (a new one sharded like its DTensor
        parameter) and count the step of every tensor that had a gradient."""
        kept = masked_sgd_step(batch)
        for p, buf in zip(batch.params, batch.momentum_buffers):
            state = self.state[p]
            if batch.options["momentum"] != 0 and _local(state.get("momentum_buffer")) is not buf:
                if _is_dtensor(p):
                    buf = DTensor.from_local(buf, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
                state["momentum_buffer"] = buf
            state["step"] = state.get("step", 0) + 1
        return kept
