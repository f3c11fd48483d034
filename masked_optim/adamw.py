"""``MaskedMultiModalAdamW``: ``torch.optim.AdamW`` whose step each modality takes at its own rate."""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from ._base import MaskedOptimizer, _check_impl_flags, _check_lr, _check_number, _local
from .backends.dispatch import AdamState, GroupTensors, masked_adamw_step

__all__ = ["MaskedMultiModalAdamW"]

_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch.optim.AdamW's ``step`` tensor (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class MaskedMultiModalAdamW(MaskedOptimizer):
    r"""AdamW in which each modality takes its step at its own rate: scaled (``mask="scale"``) or on
    an importance-sampled subset of its units (AMSS / AMSS+), with lazy moments.

    A drop-in replacement for :class:`torch.optim.AdamW` with the modality API of
    :class:`~masked_optim.MaskedMultiModalSGD`: parameter groups carry a ``modality`` (``None`` for
    shared parameters, updated densely) and may set ``masked=False``; each modality has a rate
    :math:`\rho_m \in (0, 1]` (:meth:`set_rates`, ``step(rates=...)``; 1.0 until set).

    Adam divides the update by a running RMS of the gradient, so scaling or thinning the
    *gradient* would barely change the step: the rate acts on the **update** instead
    (docs/algorithm.md §2.8). With the tensor's step count :math:`t` (incremented every step it has a
    gradient), :math:`b_1 = 1 - \beta_1^t`, :math:`b_2 = 1 - \beta_2^t`:

    * ``mask="none"``, or :math:`\rho_m = 1`: exactly :class:`torch.optim.AdamW` (its own function).
    * ``mask="scale"`` (default): exactly AdamW with learning rate :math:`\eta \rho_m`: the Adam
      update and the decoupled weight decay are both multiplied by :math:`\rho_m`.
    * ``mask="uniform"`` / ``"amss"`` / ``"amss+"``: the units (elements, or slices along dim 0 with
      ``granularity="channel"``) are drawn exactly as by ``MaskedMultiModalSGD`` for the same key
      (:math:`M_j \sim \mathrm{Bernoulli}(q_j)`, :math:`q_j` from :math:`g_j^2`, ``smoothing``, the
      rate; Philox4x32-10). A kept unit takes the AdamW step

      .. math::
          m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
          p \leftarrow p - w\Big(\eta\lambda p + \frac{\eta}{b_1}\,\frac{m}{\sqrt{v}/\sqrt{b_2} + \epsilon}\Big)

      (:math:`\max` of :math:`v` with ``amsgrad``) with :math:`w = 1/q_j` for ``amss+`` (and
      ``uniform`` with ``unbiased=True``), else 1; a unit that is not kept is left untouched,
      parameter, moments and weight decay alike (lazy, as :class:`torch.optim.SparseAdam`).
      ``amss+`` keeps the expected update given the state, :math:`E[\Delta p] = \Delta p^{AdamW}`,
      but not the trajectory (an unkept unit's moments do not advance); ``amss`` and ``uniform``
      cut a unit's expected step to :math:`q_j` times AdamW's.

    The state is :class:`torch.optim.AdamW`'s, key for key (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``): checkpoints move both ways.

    Args:
        params: parameters or parameter groups (dicts). Groups may set ``modality``, ``masked``,
            ``rate`` and override every keyword below except ``nonfinite``.
        lr, betas, eps, weight_decay, amsgrad, maximize: as :class:`torch.optim.AdamW`.
        mask, granularity, smoothing, sampler, unbiased, seed, backend, nonfinite: as
            :class:`~masked_optim.MaskedMultiModalSGD`. The fused kernels run the masked modes;
            ``scale`` and unmasked tensors run torch's AdamW.
        differentiable: False only (the masked steps run under ``torch.no_grad``).
        foreach, fused: passed to :func:`torch.optim.adamw.adamw` for the tensors that run torch's
            AdamW (unmasked, and ``scale``), with torch's meaning and default (None: torch picks;
            on CPU tensors, the for-loop). The multi-tensor step gives the for-loop's results bit
            for bit on CPU (tested); which is faster depends on the tensors and threads.

    Example:
        >>> opt = MaskedMultiModalAdamW(modality_param_groups({"audio": a, "video": v}, shared=[head]), lr=1e-3)
        >>> opt.set_rates({"audio": 0.3, "video": 0.8})
        >>> loss.backward(); opt.step()
    """

    kind = "adamw"
    _torch_name = "torch.optim.AdamW"
    _state_name = "MaskedMultiModalAdamW.state_dict() (or torch.optim.AdamW's)"

    def __init__(
        self,
        params: Iterable[Union[Tensor, dict[str, Any]]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
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

    # ------------------------------------------------------------------ the AdamW rule
    @classmethod
    def _validate_hyper(cls, group: Mapping[str, Any], where: str) -> None:
        p = where
        _check_lr(f"{p}lr", group["lr"])
        _check_number(f"{p}eps", group["eps"], low=0.0, allowed="a number >= 0")
        # "weight_decay value", "beta parameter at index i": torch.optim.AdamW's wording (tests/test_contract.py)
        _check_number(f"{p}weight_decay value", group["weight_decay"], low=0.0, allowed="a number >= 0")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"Invalid {p}betas: {betas!r}; allowed: a pair (beta1, beta2) of numbers in [0, 1)")
        tensors = [isinstance(b, Tensor) for b in betas]
        if any(tensors) and not all(tensors):
            raise ValueError(f"Invalid {p}betas: {betas!r}; allowed: betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            value = beta.item() if isinstance(beta, Tensor) and beta.numel() == 1 else beta
            _check_number(f"{p}beta parameter at index {i}", value, low=0.0, high=1.0, allowed="a number in [0, 1)")
            if value == 1.0:
                raise ValueError(f"Invalid {p}beta parameter at index {i}: {value!r}; allowed: a number in [0, 1)")
        if not isinstance(group["amsgrad"], bool):
            raise TypeError(f"Invalid {p}amsgrad: {group['amsgrad']!r}; allowed: True or False")
        _check_impl_flags(group, p)
        if group["foreach"] and not group["fused"]:  # torch's multi-tensor AdamW takes no tensor hyperparameters
            if isinstance(group["lr"], Tensor):
                raise ValueError(f"Invalid {p}lr: a tensor with foreach=True; allowed: a number (lr as a Tensor is "
                                 "not supported for capturable=False and foreach=True)")
            if all(tensors):
                raise ValueError(f"Invalid {p}betas: tensors with foreach=True; allowed: numbers (betas[0] as a "
                                 "Tensor is not supported for capturable=False and foreach=True)")

    def _check_state_entry(self, entry: Mapping[str, Any], p: Tensor, where: str) -> None:
        shape = tuple(p.shape)  # global shapes for DTensors
        for name in _STATE_TENSORS:
            t = entry.get(name)
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"Invalid state_dict: {name} of {where} is {got}; allowed: a tensor of the parameter's shape {shape}")
        step = entry.get("step", 0)
        value = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"Invalid state_dict: step of {where} is {step!r}; allowed: a number >= 0 (or a 0-d tensor)")

    def _gather_state(self, batch: GroupTensors) -> None:
        """torch.optim.AdamW's lazy state initialisation, then the local tensors of the state."""
        o = batch.options
        adam = AdamState()
        for p in batch.params:
            state = self.state[p]
            if "step" not in state:
                fused = bool(o["fused"])
                state["step"] = torch.zeros((), dtype=torch.float32 if fused else _scalar_dtype(), device=p.device if fused else None)
            elif not isinstance(state["step"], Tensor):  # a checkpoint with a number
                state["step"] = torch.tensor(float(state["step"]), dtype=_scalar_dtype())
            for name in _STATE_TENSORS[: 3 if o["amsgrad"] else 2]:
                if name not in state:
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            adam.exp_avgs.append(_local(state["exp_avg"]))
            adam.exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            adam.max_exp_avg_sqs.append(_local(state["max_exp_avg_sq"]) if o["amsgrad"] else None)
            adam.steps.append(state["step"])
        batch.adam = adam

    def _update(self, batch: GroupTensors) -> list[Union[Tensor, int]]:
        return masked_adamw_step(batch)
