"""What :class:`~masked_optim.MaskedMultiModalSGD` and :class:`~masked_optim.MaskedMultiModalAdamW` share.

:class:`MaskedOptimizer` holds everything that is not the update rule: the modality groups and
their options (docs/algorithm.md §2), the rates API, validation, the ``state_dict`` structure
checks, the non-finite policy (§2.6), backend routing and :meth:`~MaskedOptimizer.last_step_stats`.
A subclass states its hyperparameters (``_validate_hyper``), its per-parameter state
(``_gather_state`` / ``_check_state_entry``) and its update (``_update``), and nothing else.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .backends import BACKENDS, SHARDED_BACKENDS, BackendUnavailable, resolve_backend
from .backends.dispatch import REFERENCE, GroupTensors, Probes, effective_sampler, prepare
from .functional import GRANULARITIES, MASKS, SAMPLERS, ShardSpec, _compute_dtype, _num_units
from .modes import Mode
from .rng import derive_key

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None

__all__ = ["MaskedOptimizer", "StepStats", "ModalityStats", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("raise", "skip", "ignore")
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class ModalityStats:
    """What one step did to one modality.

    ``rate``: the keep rate used (the unit-weighted mean when the modality's groups were given
    different rates). ``kept_units`` / ``total_units``: units kept and units considered over the
    modality's masked tensors (``total_units == 0`` when none of them was masked, e.g. shared
    parameters or ``mask="none"``); ``kept_fraction`` is their ratio (1.0 when nothing was masked).
    A ``mask="scale"`` tensor drops no unit: its units count in both (``kept_fraction`` 1.0) and
    ``rate`` is the factor its gradient was multiplied by.
    ``backend``: the implementation that ran.
    """

    rate: float
    kept_fraction: float
    kept_units: int
    total_units: int
    backend: str


@dataclass(frozen=True)
class StepStats:
    """Per-modality statistics of the last step.

    Index it by modality name (``stats["audio"].kept_fraction``); shared parameters are under
    ``None``. When the step was skipped for a non-finite gradient (``nonfinite="skip"``),
    ``skipped`` is True, ``nonfinite_params`` lists the offending parameter indices (in
    param-group order) and ``modalities`` is empty.
    """

    modalities: dict[Optional[str], ModalityStats]
    skipped: bool = False
    nonfinite_params: tuple[int, ...] = ()

    def __getitem__(self, modality: Optional[str]) -> ModalityStats:
        return self.modalities[modality]

    def __contains__(self, modality: object) -> bool:
        return modality in self.modalities


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                  low_open: bool = False, allowed: str) -> float:
    if not _is_number(value):
        raise TypeError(f"Invalid {name}: {value!r} (type {type(value).__name__}); allowed: {allowed}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}") from None
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    return value


def _check_lr(name: str, value: Any) -> None:
    """``lr``: a number >= 0, or a 1-element tensor holding one (as torch.optim, for schedulers that
    update it in place and for torch.compile, which would otherwise recompile on every change)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Invalid {name}: a tensor of shape {tuple(value.shape)}; allowed: a number >= 0 or a "
                "1-element tensor (Tensor lr must be 1-element)"
            )
        if value.requires_grad:
            raise ValueError(f"Invalid {name}: a tensor that requires grad; allowed: a number >= 0 or a 1-element "
                             "tensor without grad (differentiable optimizers are not supported)")
        value = value.item()
    _check_number(name, value, low=0.0, allowed="a number >= 0 or a 1-element tensor")


def _check_impl_flags(group: Mapping[str, Any], where: str) -> None:
    """torch's ``foreach`` / ``fused`` (None or a bool, not both True) and ``differentiable`` (False only:
    the masked steps run under ``torch.no_grad`` and their masks have no gradient)."""
    for flag in ("foreach", "fused"):
        if group[flag] is not None and not isinstance(group[flag], bool):
            raise TypeError(f"Invalid {where}{flag}: {group[flag]!r}; allowed: None, True or False")
    if group["foreach"] and group["fused"]:
        raise ValueError(f"Invalid {where}foreach=True with fused=True; allowed: at most one of them True (as torch.optim)")
    if group["differentiable"] is not False:
        raise ValueError(
            f"Invalid {where}differentiable: {group['differentiable']!r}; allowed: False (the masked steps run under "
            "torch.no_grad and their masks have no gradient; use the torch.optim class for a differentiable step)"
        )


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: one of {', '.join(map(repr, choices))}")


def _check_rate(name: str, value: Any) -> float:
    return _check_number(name, value, low=0.0, high=1.0, low_open=True, allowed="a number in (0, 1]")


def _sampler(group: Mapping[str, Any]) -> str:
    return effective_sampler(group["mask"], group["sampler"])


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local tensor of a DTensor (its storage, under no_grad), else ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_spec(p: Tensor, granularity: str, index: int, reducers: dict) -> Optional[ShardSpec]:
    """Where the local shard of DTensor ``p`` sits in the whole tensor (None if it is all there).

    FSDP's ``fully_shard`` shards dim 0 (``Shard(0)``); replicated mesh dimensions (HSDP) need
    nothing. Other placements would split units across ranks in ways the global unit offset
    cannot describe, so they are refused.
    """
    groups = []
    for mesh_dim, placement in enumerate(p.placements):
        if type(placement) is Shard and placement.dim == 0:
            groups.append(p.device_mesh.get_group(mesh_dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"Invalid placement of parameter {index} (shape {tuple(p.shape)}): {tuple(p.placements)}; "
                "allowed: Shard(0) (as FSDP's fully_shard makes) or Replicate on every mesh dimension"
            )
    if not groups:
        return None
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    per_row = 1 if granularity == "channel" else math.prod(p.shape[1:])
    key = tuple(groups)
    if key not in reducers:  # one function per set of process groups: probes are batched by it

        def all_reduce(t: Tensor, op: str) -> Tensor:
            for group in key:
                dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
            return t

        reducers[key] = all_reduce
    return ShardSpec(unit_offset=offset[0] * per_row, num_units=_num_units(p.shape, granularity), all_reduce=reducers[key])


def _by_device(tensors: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return list(groups.values())



class MaskedOptimizer(Optimizer):
    """The modality machinery of the masked optimizers (not used directly: subclass it).

    Subclasses set ``kind`` (``"sgd"`` or ``"adamw"``: which kernels run), ``_state_name`` (how
    errors name the optimizer) and implement :meth:`_validate_hyper`, :meth:`_gather_state`,
    :meth:`_check_state_entry` and :meth:`_update`.
    """

    kind = ""
    _state_name = ""
    _torch_name = ""  # the torch optimizer it is without modalities
    _warned_no_modality = False

    def __init__(self, params: Iterable[Union[Tensor, dict[str, Any]]], defaults: dict[str, Any], nonfinite: str) -> None:
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(defaults, modality=None, masked=True, rate=1.0)
        self._validate_group(defaults, where="")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._last_stats: Optional[tuple] = None
        super().__init__(params, defaults)
        if not self.modalities and not MaskedOptimizer._warned_no_modality:
            MaskedOptimizer._warned_no_modality = True  # once per process: a plain optimizer may be meant
            warnings.warn(
                f"{type(self).__name__}: no param group has a `modality`, so nothing is rebalanced: this is "
                f"{self._torch_name}. Build the groups with modality_param_groups({{'audio': enc_a, ...}}, "
                "shared=head), or pass dicts with a 'modality' key (warned once per process)",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ what a subclass states
    @classmethod
    def _validate_hyper(cls, group: Mapping[str, Any], where: str) -> None:
        """Raise on an invalid hyperparameter of the update rule (``lr``, momentum, betas, ...)."""
        raise NotImplementedError

    def _gather_state(self, batch: GroupTensors) -> None:
        """Fill ``batch``'s state lists from ``self.state`` (creating state on a first step)."""
        raise NotImplementedError

    def _check_state_entry(self, entry: Mapping[str, Any], p: Tensor, where: str) -> None:
        """Raise ``ValueError`` if a checkpoint's state ``entry`` of parameter ``p`` does not fit."""
        raise NotImplementedError

    def _update(self, batch: GroupTensors) -> list[Union[Tensor, int]]:
        """Update ``batch`` (after the non-finite check); return the kept-unit counts."""
        raise NotImplementedError

    # ------------------------------------------------------------------ validation
    @classmethod
    def _validate_group(cls, group: Mapping[str, Any], where: str) -> None:
        """Raise on any invalid option of ``group`` (``where`` prefixes the names in messages)."""
        cls._validate_hyper(group, where)
        p = where
        for flag in ("maximize", "masked"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"Invalid {p}{flag}: {group[flag]!r}; allowed: True or False")
        _check_choice(f"{p}mask", group["mask"], MASKS)
        _check_choice(f"{p}granularity", group["granularity"], GRANULARITIES)
        _check_choice(f"{p}sampler", group["sampler"], SAMPLERS)
        _check_choice(f"{p}backend", group["backend"], BACKENDS)
        _check_number(f"{p}smoothing", group["smoothing"], low=0.0, high=1.0, allowed="a number in [0, 1]")
        unbiased = group["unbiased"]
        if unbiased is not None and not isinstance(unbiased, bool):
            raise TypeError(f"Invalid {p}unbiased: {unbiased!r}; allowed: None, True or False")
        if group["mask"] == "amss" and unbiased is True:
            raise ValueError(
                f"Invalid {p}unbiased=True with mask='amss'; allowed: None or False "
                "(mask='amss+' is the unbiased AMSS)"
            )
        if group["mask"] == "scale" and unbiased is True:
            raise ValueError(
                f"Invalid {p}unbiased=True with mask='scale'; allowed: None or False (mask='scale' "
                "multiplies the gradient by the rate: a biased per-modality step size, nothing to rescale)"
            )
        if group["mask"] == "amss+" and unbiased is False:
            raise ValueError(
                f"Invalid {p}unbiased=False with mask='amss+'; allowed: None or True "
                "(mask='amss' is the biased AMSS)"
            )
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"Invalid {p}seed: {seed!r}; allowed: an int in [0, 2**64)")
        modality = group["modality"]
        if modality is not None and (not isinstance(modality, str) or not modality):
            raise TypeError(f"Invalid {p}modality: {modality!r}; allowed: a non-empty str, or None for shared parameters")
        _check_rate(f"{p}rate", group["rate"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, after validating its options and that none of its params is already present."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param_group: {type(param_group).__name__}; allowed: a dict")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # a set is refused by torch with its own message
            params = list(params)
        param_group["params"] = params
        group_index = len(self.param_groups)
        # Named parameters, (name, tensor), are passed on to torch, which splits them; checked here by tensor.
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor) else p for p in params]
        names = [p[0] if isinstance(p, tuple) and len(p) == 2 else None for p in params]
        seen: dict[int, int] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                seen[id(p)] = gi
        in_group: set[int] = set()
        for p, name in zip(tensors, names):
            if not isinstance(p, Tensor):
                continue  # torch's own check names the type
            what = f"parameter {name!r}" if name is not None else f"a parameter of shape {tuple(p.shape)}"
            if id(p) in in_group:  # torch.optim warns (and the step updates it twice), so do we
                warnings.warn(
                    f"param group {group_index} holds {what} twice: optimizer contains a parameter group with "
                    "duplicate parameters, which each step updates twice; pass each parameter once",
                    UserWarning,
                    stacklevel=3,
                )
            elif id(p) in seen:
                raise ValueError(
                    f"Invalid params of param group {group_index}: some parameters appear in more than one "
                    f"parameter group ({what} is already in param group {seen[id(p)]}); allowed: each parameter in "
                    "exactly one group"
                )
            in_group.add(id(p))
            if p.is_complex():
                raise ValueError(
                    f"Invalid params of param group {group_index}: {what} of dtype {p.dtype}; allowed: real "
                    "floating-point parameters (complex ones are not supported: pass torch.view_as_real(p) as its "
                    "own parameter, or use torch.optim)"
                )
        for p in tensors:
            if isinstance(p, Tensor):
                seen[id(p)] = group_index
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        self._validate_group(param_group, where=f"param group {group_index}: ")
        if any(_is_dtensor(p) for p in tensors):
            if param_group["backend"] not in SHARDED_BACKENDS:
                raise BackendUnavailable(
                    f"backend {param_group['backend']!r} cannot update sharded (DTensor, FSDP) parameters of "
                    f"param group {group_index}: the fused kernels take no global unit offset yet; use "
                    "backend='auto' or 'reference' (the pure-PyTorch step, exact for shards)"
                )
            if _sampler(param_group) == "multinomial":
                raise ValueError(
                    f"Invalid sampler='multinomial' for the sharded (DTensor, FSDP) parameters of param group "
                    f"{group_index}; allowed: 'poisson' (the multinomial sampler needs a global top-k)"
                )
        for device in {p.device for p in tensors if isinstance(p, Tensor)}:
            # An explicit backend that cannot run on these tensors fails here, with the reason.
            resolve_backend(param_group["backend"], device, _sampler(param_group), op=self.kind)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output, after checking that it fits this optimizer.

        As with ``torch.optim``, the checkpoint's hyperparameters (``lr``, ``mask``, rates, seeds,
        ...) replace this optimizer's; options a checkpoint lacks (one written by
        the torch optimizer it replaces, or before an option existed) keep this optimizer's values,
        so a torch run can be continued with masking; ``backend`` stays this optimizer's (every
        backend draws the same masks, so a checkpoint moves between them). What must match is the
        structure: the number of groups and of parameters per group, each group's ``modality``, and
        each state tensor's shape; the loaded options must be valid and step counts non-negative.
        Anything else raises ``ValueError`` naming the group or parameter and both values, and
        changes nothing.
        """
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                f"Invalid state_dict: {type(state_dict).__name__}"
                + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, Mapping) else "")
                + f"; allowed: the dict of {self._state_name}, with 'state' and 'param_groups'"
            )
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid state_dict: {len(saved_groups)} param groups; allowed: {len(self.param_groups)}, "
                "as this optimizer has (a checkpoint of another model or configuration?)"
            )
        groups = []
        for gi, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(
                    f"Invalid state_dict: param group {gi} has {len(saved['params'])} parameters; allowed: "
                    f"{len(current['params'])}, as this optimizer's group {gi} has"
                )
            if "modality" in saved and saved["modality"] != current["modality"]:
                raise ValueError(
                    f"Invalid state_dict: param group {gi} has modality {saved['modality']!r}; allowed: "
                    f"{current['modality']!r}, this optimizer's group {gi} (groups are matched by position)"
                )
            merged = {**{k: v for k, v in current.items() if k != "params"}, **saved}
            merged["backend"] = current["backend"]  # where this optimizer runs, not a setting of the run
            self._validate_group(merged, where=f"state_dict param group {gi}: ")
            groups.append(merged)
            for pid, p in zip(saved["params"], current["params"]):
                self._check_state_entry(saved_state.get(pid, {}), p, f"parameter {pid} (param group {gi})")
        super().load_state_dict({**state_dict, "param_groups": groups})

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, skipped_steps=self.skipped_steps)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        ours = set(state.get("defaults", {}))  # before torch adds its own (e.g. 'differentiable')
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints written before an option existed
            for key, value in self.defaults.items():
                if key in ours:  # a torch flag in a group would make state_dict() differ after a copy
                    group.setdefault(key, value)
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_last_stats", None)

    # ------------------------------------------------------------------ rates
    @property
    def modalities(self) -> list[str]:
        """The modality names of the parameter groups, in order of first appearance."""
        names: dict[str, None] = {}
        for group in self.param_groups:
            if group["modality"] is not None:
                names[group["modality"]] = None
        return list(names)

    def _validated_rates(self, rates: Mapping[str, Any], name: str) -> dict[str, float]:
        if not isinstance(rates, Mapping):
            raise TypeError(f"Invalid {name}: {type(rates).__name__}; allowed: a dict {{modality: rate}}")
        known = self.modalities
        checked = {}
        for modality, rate in rates.items():
            if modality not in known:
                raise ValueError(
                    f"Invalid {name}: unknown modality {modality!r}; allowed: one of {known} "
                    "(the `modality` of the parameter groups)"
                )
            if isinstance(rate, Tensor) and rate.numel() == 1:
                rate = rate.item()
            checked[modality] = _check_rate(f"{name}[{modality!r}]", rate)
        return checked

    def set_rates(self, rates: Mapping[str, float]) -> None:
        """Set the keep rate of each named modality, in (0, 1], for this and later steps.

        Modalities not named keep their rate. Stored in the param groups (key ``rate``), so it is in
        :meth:`state_dict`. Nothing is changed if any entry is invalid.
        """
        checked = self._validated_rates(rates, "rates")
        for group in self.param_groups:
            if group["modality"] in checked:
                group["rate"] = checked[group["modality"]]

    def get_rates(self) -> dict[str, float]:
        """The current keep rate of every modality (the first group's, per modality)."""
        rates: dict[str, float] = {}
        for group in self.param_groups:
            if group["modality"] is not None:
                rates.setdefault(group["modality"], float(group["rate"]))
        return rates

    # ------------------------------------------------------------------ step
    # Never traced by torch.compile (a graph break, on purpose): the step's control flow depends on
    # Python state (each tensor's Philox key from its step count, the rates, the non-finite verdict
    # read on the host), so tracing it would guard on all of these and recompile whenever a rate or
    # a key changes; its fused kernels already make one pass per tensor. A compiled training step that
    # calls it compiles the forward and backward and runs this eagerly (tests/test_compile.py).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, rates: Optional[Mapping[str, float]] = None):
        """Perform one optimisation step.

        Args:
            closure: re-evaluates the model and returns the loss (as in ``torch.optim``).
            rates: keep rates for this step only, ``{modality: rate}``; others use their set rate.
        """
        overrides = self._validated_rates(rates, "rates") if rates is not None else {}
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        batches, reducers, index = [], {}, 0
        for gi, group in enumerate(self.param_groups):
            batches.append(self._init_group(gi, group, index, overrides, reducers))
            index += len(group["params"])
        # Pick each tensor's backend and run its preparation (the cpp stage 1), which yields the
        # non-finite probes: nothing is updated unless every gradient passes.
        probes = prepare(batches, self._resolve, check=self.nonfinite != "ignore")
        verdict = self._nonfinite_verdict(batches, probes)
        if verdict is not None:
            return self._nonfinite_step(loss, **verdict)

        records = []
        for batch in batches:
            kept = self._update(batch)
            units = [_num_units(p.shape, batch.options["granularity"]) for p in batch.local_params]
            records.append((batch.options["modality"], batch.rate, not batch.masked, batch.backend_names, kept, units))
        self._last_stats = (records, False, ())
        return loss

    def _init_group(self, gi: int, group: dict[str, Any], first_index: int, overrides: Mapping[str, float],
                    reducers: dict) -> GroupTensors:
        """The tensors of param group ``gi`` that have a gradient. ``first_index``: the index of the
        group's first param among all params (with a gradient or not); ``(seed, step, index)`` keys
        each tensor's Philox stream."""
        params, local_params, grads, keys, shards = [], [], [], [], []
        for index, p in enumerate(group["params"], start=first_index):
            if p.grad is None:
                continue
            if p.grad.layout != torch.strided:
                raise ValueError(
                    f"Invalid gradient of parameter {index} (param group {gi}, shape {tuple(p.shape)}): "
                    f"layout {p.grad.layout}; allowed: dense (torch.strided) gradients "
                    "(use nn.Embedding(sparse=False) or torch.optim.SparseAdam)"
                )
            state = self.state[p]
            params.append(p)
            local_params.append(_local(p))
            grads.append(_local(p.grad))
            keys.append(derive_key(group["seed"], int(state.get("step", 0)), index))
            shards.append(_shard_spec(p, group["granularity"], index, reducers) if _is_dtensor(p) else None)
        modality = group["modality"]
        rate = 1.0 if modality is None else overrides.get(modality, group["rate"])
        mode = Mode.of(group["mask"], group["unbiased"])
        masked = modality is not None and group["masked"] and mode is not Mode.DENSE
        batch = GroupTensors(
            group, params, local_params, grads, keys, shards, rate=rate, mode=mode, masked=masked,
            sparse=masked and rate < 1.0, kind=self.kind,
        )
        self._gather_state(batch)
        return batch

    @staticmethod
    def _nonfinite_verdict(batches: list[GroupTensors], probes: Probes) -> Optional[dict[str, Any]]:
        """None when the step may run, else the arguments of :meth:`_nonfinite_step`.

        One host synchronisation per device when every probe is finite; the sharded probes are
        summed over their shards, with the same all-reduces in the same order on every rank.
        """
        if probes.local and not all(bool(torch.isfinite(torch.stack(ps)).all()) for ps in _by_device(probes.local)):
            if any(not bool(torch.isfinite(g).all()) for batch in batches for g in batch.grads):
                return {}  # not just a sum that overflowed
            # Finite gradients whose squares overflow: the importance g**2 would be inf and q NaN,
            # which would silently freeze the tensor. (A sum of squares that overflows is harmless.)
            huge = [j for j, g in probes.scored if bool(torch.isinf(g.abs().max().to(_compute_dtype(g.dtype)).square()))]
            if huge:
                return {"overflow": huge}
        for all_reduce, ps in probes.sharded.items():  # the same all-reduces, in the same order, on every rank
            if not bool(torch.isfinite(all_reduce(torch.stack(ps), "sum")).all()):
                return {"sharded": True}
        return None

    def _resolve(self, requested: str, device: torch.device, sampler: str) -> str:
        cache = self.__dict__.setdefault("_backend_cache", {})
        key = (requested, device, sampler)
        if key not in cache:
            cache[key] = resolve_backend(requested, device, sampler, op=self.kind)
        return cache[key]

    def _nonfinite_step(self, loss, sharded: bool = False, overflow: Optional[list[int]] = None):
        bad = []
        index = -1
        with_grad = []
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is not None:
                    if overflow is not None and len(with_grad) in overflow:
                        bad.append(index)
                    with_grad.append(index)
                    if overflow is None and not bool(torch.isfinite(_local(p.grad)).all()):
                        bad.append(index)
        if self.nonfinite == "raise":
            where = f"parameters {bad}" if bad else "the shard of a sharded parameter on another rank"
            if overflow is not None:
                raise FloatingPointError(
                    f"Gradient too large in {where} (indices in param-group order): the square of an element "
                    "overflows, so the importance g**2 of the mask cannot be computed; no parameter was "
                    "updated. Scale the loss down or clip gradients; nonfinite='skip' skips such steps"
                )
            raise FloatingPointError(
                f"Non-finite gradient (NaN or Inf) in {where} (indices in param-group order); "
                "no parameter was updated. Pass nonfinite='skip' to skip such steps, or 'ignore' to "
                "update anyway"
            )
        self.skipped_steps += 1
        self._last_stats = ([], True, tuple(bad))
        return loss

    def last_step_stats(self) -> Optional[StepStats]:
        """Per-modality rate used and fraction of units kept at the last step (None before any).

        Reading the kept counts synchronises with the device, so this is computed on demand.
        """
        if self._last_stats is None:
            return None
        records, skipped, bad = self._last_stats
        acc: dict[Optional[str], dict[str, Any]] = {}
        for modality, rate, dense, backend, kept, units in records:
            entry = acc.setdefault(modality, dict(rate_units=0.0, units=0, kept=[], rate=rate, rates=set(), backend=set()))
            if backend:  # a group that ran nothing (empty, or no grads) names no backend
                entry["backend"].add(backend)
            if not dense and kept:
                entry["kept"].extend(kept)
                entry["units"] += sum(units)
                entry["rate_units"] += rate * sum(units)
                entry["rates"].add(rate)
        out = {}
        for modality, entry in acc.items():
            total = entry["units"]
            kept = sum(int(k) for k in entry["kept"])  # int() of a device count synchronises here only
            if len(entry["rates"]) == 1:  # one rate used: reported exactly, not as (rate * units) / units
                rate = next(iter(entry["rates"]))
            else:
                rate = entry["rate_units"] / total if total else (1.0 if modality is None else entry["rate"])
            out[modality] = ModalityStats(
                rate=float(rate),
                kept_fraction=kept / total if total else 1.0,
                kept_units=kept,
                total_units=total,
                backend=",".join(sorted(entry["backend"])) or REFERENCE,
            )
        return StepStats(modalities=out, skipped=skipped, nonfinite_params=bad)
