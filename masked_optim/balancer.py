"""``Balancer``: the optimizer, the estimator and the slices of a model, as one object.

The three-piece recipe of the README (parameter groups by modality, slice logits of the head, the
estimator feeding ``set_rates``) made from the model's named submodules, with its checks: every
trainable parameter of the model is in exactly one group (the encoders' by modality, every other
one shared, unless ``shared=`` / ``assign=`` say otherwise for a tied or modality-specific
parameter), errors name parameters by their qualified name, and the slices are checked against
the fused logits (docs/algorithm.md §3.7), so features passed in another order than the head's
cannot silently give wrong rates.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .adamw import MaskedMultiModalAdamW
from .fusion import ConcatFusion, slice_logits
from .optim import MaskedMultiModalSGD
from .probes import ModalityProbes
from .significance import ModalSignificance

__all__ = ["Balancer"]

_OPTIMIZERS = {"sgd": MaskedMultiModalSGD, "adamw": MaskedMultiModalAdamW}
SIGNALS = ("slices", "probes")
Spec = Union[str, nn.Module, nn.Parameter]  # a qualified name, a submodule or a parameter of the model


class Balancer:
    """One object for balanced multimodal training of ``model``.

    Args:
        model: the whole model (its parameters are all optimised: the encoders' by modality, the
            rest shared and dense).
        encoders: ``{modality: submodule or its qualified name}`` (``"enc.audio"``), one per modality.
        shared: parameters that sit inside the encoders but that every modality uses (a tied
            embedding, a projection two encoders share): qualified names of parameters or
            submodules, or the objects. They go to the shared group, which is never masked or
            scaled (rate 1). Without it a parameter in two encoders is an error naming it.
        assign: ``{parameter or submodule (name or object): modality}``: put it in that modality's
            group, rebalanced at its rate, wherever it sits (e.g. a per-modality input projection of
            the fusion, which would otherwise be shared). See docs/guide.md, "Tied and shared
            parameters".
        head: the fusion head whose slices give each modality's logits: an ``nn.Linear`` over the
            concatenated features, a :class:`~masked_optim.ConcatFusion`, or its qualified name; or
            ``None`` when the model has no such head (pass per-modality logits to :meth:`update_rates`).
        optimizer: ``"sgd"`` (:class:`~masked_optim.MaskedMultiModalSGD`, default), ``"adamw"``
            (:class:`~masked_optim.MaskedMultiModalAdamW`), or a callable ``groups -> optimizer``.
        estimator: the :class:`~masked_optim.ModalSignificance` (default: its defaults).
        signal: where the estimator's per-modality logits come from: ``"slices"`` (default; the
            head's slices, or ``modality_logits`` with ``head=None``) or ``"probes"`` (a
            :class:`~masked_optim.ModalityProbes` trained online on the detached features, for any
            fusion, docs/algorithm.md §3.8; ``head`` may be None and is not used for the rates).
        probe_dims: ``{modality: feature width}`` of the probes (default: the features' widths at
            the first :meth:`update_rates`). ``num_classes``: the probes' classes (default: the
            width of the ``logits`` given to the first :meth:`update_rates`). ``probe_options``:
            passed to :class:`~masked_optim.ModalityProbes` (``lr``, ``momentum``, ...).
        **optimizer_kwargs: passed to the optimizer class (``lr``, ``momentum``, ``mask``, ...).

    Per step::

        out = model(x)                                  # your forward
        loss.backward()
        balancer.update_rates(features, labels, logits=out.logits)   # or modality_logits=...
        balancer.step()

    ``state_dict()`` holds the optimizer's and the estimator's state.
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: Mapping[str, Union[str, nn.Module]],
        head: Union[str, nn.Module, None] = None,
        *,
        shared: Iterable[Spec] = (),
        assign: Optional[Mapping[Spec, str]] = None,
        optimizer: Union[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = "sgd",
        estimator: Optional[ModalSignificance] = None,
        signal: str = "slices",
        probe_dims: Optional[Mapping[str, int]] = None,
        num_classes: Optional[int] = None,
        probe_options: Optional[Mapping[str, Any]] = None,
        **optimizer_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__}; allowed: an nn.Module")
        if not isinstance(encoders, Mapping) or not encoders:
            raise ValueError(f"Invalid encoders: {encoders!r}; allowed: a non-empty dict {{modality: submodule or its name}}")
        self.model = model
        self.encoders = {m: self._submodule(f"encoders[{m!r}]", e) for m, e in encoders.items()}
        self.head = None if head is None else self._submodule("head", head)
        if self.head is not None and not isinstance(self.head, (nn.Linear, ConcatFusion)):
            raise TypeError(
                f"Invalid head: {type(self.head).__name__}; allowed: an nn.Linear over the concatenated features, a "
                "ConcatFusion, or None (then pass modality_logits to update_rates)"
            )
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.groups = self._groups(self._placed(shared, assign))
        if isinstance(optimizer, str):
            if optimizer not in _OPTIMIZERS:
                raise ValueError(f"Invalid optimizer: {optimizer!r}; allowed: one of {sorted(_OPTIMIZERS)}, or a callable")
            self.optimizer = _OPTIMIZERS[optimizer](self.groups, **optimizer_kwargs)
        elif callable(optimizer):
            self.optimizer = optimizer(self.groups)
        else:
            raise TypeError(f"Invalid optimizer: {optimizer!r}; allowed: 'sgd', 'adamw' or a callable groups -> optimizer")
        if estimator is not None and not isinstance(estimator, ModalSignificance):
            raise TypeError(f"Invalid estimator: {type(estimator).__name__}; allowed: a ModalSignificance or None")
        self.estimator = estimator if estimator is not None else ModalSignificance()
        if signal not in SIGNALS:
            raise ValueError(f"Invalid signal: {signal!r}; allowed: one of {list(SIGNALS)}")
        self.signal = signal
        if signal == "slices" and (probe_dims is not None or num_classes is not None or probe_options is not None):
            raise ValueError("Invalid probe_dims / num_classes / probe_options with signal='slices'; allowed: only with signal='probes'")
        if probe_dims is not None and (not isinstance(probe_dims, Mapping) or set(probe_dims) != set(self.encoders)):
            got = sorted(probe_dims) if isinstance(probe_dims, Mapping) else type(probe_dims).__name__
            raise ValueError(f"Invalid probe_dims: modalities {got}; allowed: exactly the encoders' {sorted(self.encoders)}")
        self._probe_dims = None if probe_dims is None else dict(probe_dims)
        self._num_classes = num_classes
        self._probe_options = dict(probe_options or {})
        self.probes: Optional[ModalityProbes] = None
        if self._probe_dims is not None and num_classes is not None:
            self.probes = ModalityProbes(self._probe_dims, num_classes, **self._probe_options)

    def _submodule(self, what: str, spec: Union[str, nn.Module]) -> nn.Module:
        if isinstance(spec, str):
            try:
                return self.model.get_submodule(spec)
            except AttributeError:
                names = [n for n, _ in self.model.named_children()]
                raise ValueError(f"Invalid {what}: {spec!r} is not a submodule of the model; allowed: a qualified name "
                                 f"such as {names[0] + '.<child>' if names else '<child>'} (its children: {names})") from None
        if isinstance(spec, nn.Module):
            if not any(spec is m for m in self.model.modules()):
                raise ValueError(f"Invalid {what}: a {type(spec).__name__} that is not part of the model; allowed: one of "
                                 "its submodules (or its qualified name)")
            return spec
        raise TypeError(f"Invalid {what}: {type(spec).__name__}; allowed: a submodule of the model or its qualified name")

    def _params_of(self, what: str, spec: Spec) -> list[nn.Parameter]:
        """The trainable parameters a ``shared`` / ``assign`` entry names (a parameter or a submodule)."""
        if isinstance(spec, nn.Parameter):
            if id(spec) not in self._names:
                raise ValueError(f"Invalid {what}: a parameter of shape {tuple(spec.shape)} that is not in the model; "
                                 "allowed: one of its parameters or submodules, or a qualified name")
            params = [spec]
        elif isinstance(spec, str):
            try:
                params = [self.model.get_parameter(spec)]
            except AttributeError:
                params = list(self._submodule(what, spec).parameters())
        elif isinstance(spec, nn.Module):
            params = list(self._submodule(what, spec).parameters())
        else:
            raise TypeError(f"Invalid {what}: {type(spec).__name__}; allowed: a qualified name, a submodule or a parameter of the model")
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(f"Invalid {what}: {spec if isinstance(spec, str) else type(spec).__name__!r} has no trainable parameter")
        return params

    def _placed(self, shared: Iterable[Spec], assign: Optional[Mapping[Spec, str]]) -> dict[int, Optional[str]]:
        """``{id(parameter): modality or None}`` from ``shared`` and ``assign``; one place per parameter."""
        if isinstance(shared, (str, nn.Module, nn.Parameter)):
            shared = [shared]  # one name, module or parameter, not an iterable of characters, children or rows
        if assign is None:
            assign = {}
        if not isinstance(assign, Mapping):
            raise TypeError(f"Invalid assign: {type(assign).__name__}; allowed: a dict {{parameter or submodule: modality}}")
        placed: dict[int, Optional[str]] = {}
        entries = [(f"shared[{i}]", spec, None) for i, spec in enumerate(shared)]
        for spec, modality in assign.items():
            key = spec if isinstance(spec, str) else type(spec).__name__
            if modality not in self.encoders:
                raise ValueError(f"Invalid assign[{key!r}]: {modality!r}; allowed: one of the encoders' modalities {sorted(self.encoders)}")
            entries.append((f"assign[{key!r}]", spec, modality))
        for what, spec, modality in entries:
            for p in self._params_of(what, spec):
                if id(p) in placed and placed[id(p)] != modality:
                    raise ValueError(f"Invalid {what}: parameter {self._names[id(p)]!r} is also placed in "
                                     f"{_group_name(placed[id(p)])}; allowed: one place per parameter")
                placed[id(p)] = modality
        return placed

    def _groups(self, placed: Mapping[int, Optional[str]]) -> list[dict[str, Any]]:
        """One group per modality (its encoder's trainable parameters and those assigned to it), one
        shared group (every other trainable parameter of the model, and those named in ``shared``);
        a parameter in two encoders, and in neither ``shared`` nor ``assign``, is an error naming it."""
        owner: dict[int, str] = {}
        for modality, module in self.encoders.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"Invalid encoders[{modality!r}]: a module without trainable parameters")
            for p in params:
                if id(p) in owner and id(p) not in placed:
                    name = self._names[id(p)]
                    raise ValueError(
                        f"Invalid encoders: parameter {name!r} is in the encoders of both {owner[id(p)]!r} and "
                        f"{modality!r}; allowed: each parameter in one modality. A weight both modalities use "
                        f"(tied): pass shared=[{name!r}] (trained dense, never masked), or assign={{{name!r}: "
                        "<modality>}} to rebalance it at one modality's rate"
                    )
                owner[id(p)] = modality
        owner.update({k: m for k, m in placed.items() if m is not None})
        where = {k: m for k, m in owner.items() if placed.get(k, m) is not None}  # `shared` wins over an encoder
        groups = []
        for modality in self.encoders:
            params = [p for p in self.model.parameters() if p.requires_grad and where.get(id(p)) == modality]
            if not params:
                raise ValueError(f"Invalid shared: every trainable parameter of encoders[{modality!r}] is shared; "
                                 "allowed: leave each modality at least one parameter of its own")
            groups.append({"params": params, "modality": modality})
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in where]
        if rest:
            groups.append({"params": rest, "modality": None})
        return groups

    def parameter_modality(self) -> dict[str, Optional[str]]:
        """``{qualified parameter name: modality or None (shared)}`` of every trainable parameter."""
        of = {id(p): g["modality"] for g in self.groups for p in g["params"]}
        return {n: of[id(p)] for n, p in self.model.named_parameters() if id(p) in of}

    def slices(self, features: Mapping[str, Tensor], logits: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Per-modality logits of the head for ``features`` (in the encoders' order), checked against
        the fused ``logits`` when given (a ``ValueError`` if they do not sum to them)."""
        if self.head is None:
            raise ValueError("Invalid call: this Balancer has no head (head=None); pass modality_logits to update_rates")
        if set(features) != set(self.encoders):
            raise ValueError(f"Invalid features: modalities {sorted(features)}; allowed: exactly {sorted(self.encoders)}")
        linear = self.head.fc if isinstance(self.head, ConcatFusion) else self.head
        order = list(self.head.dims) if isinstance(self.head, ConcatFusion) else list(features)
        return slice_logits(linear, {m: features[m].detach() for m in order}, fused=None if logits is None else logits.detach())

    @torch.no_grad()
    def update_rates(
        self,
        features: Optional[Mapping[str, Tensor]],
        labels: Tensor,
        *,
        logits: Optional[Tensor] = None,
        modality_logits: Optional[Mapping[str, Tensor]] = None,
    ) -> dict[str, float]:
        """Estimate the rates from this batch and set them on the optimizer; returns them.

        ``features``: each encoder's output (the head's input), used for the slices and the
        estimator's feature entropy. ``logits``: the fused logits, to check the slices against (one
        host read). ``modality_logits``: per-modality logits to use instead of the head's slices
        (required with ``head=None``).
        """
        if self.signal == "probes":
            if modality_logits is not None:
                raise ValueError("Invalid modality_logits with signal='probes'; allowed: None (the probes give them)")
            if features is None:
                raise ValueError("Invalid features: None; allowed: each encoder's output (the probes' input)")
            if set(features) != set(self.encoders):
                raise ValueError(f"Invalid features: modalities {sorted(features)}; allowed: exactly {sorted(self.encoders)}")
            modality_logits = self._probes_for(features, logits)(features, labels)
        elif modality_logits is None:
            if features is None:
                raise ValueError("Invalid features: None; allowed: each encoder's output (or pass modality_logits)")
            modality_logits = self.slices(features, logits)
        detached = None if features is None else {m: z.detach() for m, z in features.items()}
        rates = self.estimator({m: o.detach() for m, o in modality_logits.items()}, labels, detached)
        self.optimizer.set_rates(rates)
        return rates

    def _probes_for(self, features: Mapping[str, Tensor], logits: Optional[Tensor]) -> ModalityProbes:
        if self.probes is None:
            dims = self._probe_dims or {m: int(z.shape[-1]) for m, z in features.items()}
            k = self._num_classes
            if k is None:
                if logits is None:
                    raise ValueError("Invalid call: signal='probes' needs the number of classes; allowed: pass "
                                     "num_classes to Balancer, or the fused logits to the first update_rates")
                k = int(logits.shape[-1])
            device = next(iter(features.values())).device
            self.probes = ModalityProbes(dims, k, device=device, **self._probe_options)
        return self.probes

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """The optimizer's step."""
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": ..., "estimator": ...}``, and ``"probes"`` once the probes exist (signal="probes")."""
        state = {"optimizer": self.optimizer.state_dict(), "estimator": self.estimator.state_dict()}
        if self.probes is not None:
            state["probes"] = self.probes.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) not in ({"optimizer", "estimator"}, {"optimizer", "estimator", "probes"}):
            raise ValueError(f"Invalid state: keys {sorted(state) if isinstance(state, Mapping) else type(state).__name__}; "
                             "allowed: the dict of Balancer.state_dict(), with 'optimizer' and 'estimator' (and 'probes')")
        if "probes" in state and self.signal != "probes":
            raise ValueError("Invalid state: it holds probes but this Balancer has signal='slices'; allowed: signal='probes'")
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        if "probes" in state:
            if self.probes is None:
                p = state["probes"]
                self.probes = ModalityProbes(dict(p["dims"]), int(p["num_classes"]), **self._probe_options)
            self.probes.load_state_dict(state["probes"])


def _group_name(modality: Optional[str]) -> str:
    return "shared" if modality is None else f"assign (modality {modality!r})"
