"""``ModalityProbes``: per-modality logits for any fusion, from linear probes trained online (docs/algorithm.md §3.8).

:class:`~masked_optim.ModalSignificance` needs each modality's own logits. A linear head over the
concatenated features has them as slices (§3.7); cross-attention, gating or a sum of non-linear
heads has none. A linear probe per modality, trained on the side on the encoders' *detached*
features, gives them for any fusion: it measures what a linear read-out of ``z_m`` alone knows
about the label, which is the quantity the estimator's :math:`I_m` is meant to track, and it never
changes the model (no gradient reaches the encoders).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModalityProbes"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: a positive int")
    return value


def _nonneg_float(name: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"Invalid {name}: {value!r}; allowed: a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


class ModalityProbes:
    r"""One linear probe per modality, trained online on detached features; its logits feed the estimator.

    Each call ``probes(features, labels)``:

    1. computes every probe's logits :math:`o_m = W_m z_m + b_m` on this batch with the weights as
       they are *before* this batch (so the logits are held-out for the batch, like the slices of a
       head that has not yet stepped on it), and returns them detached;
    2. then takes one SGD step of every probe on the batch's cross-entropy.

    The features are detached first: no gradient ever reaches the model, and the probes change
    nothing in its training. The probes start at zero (uniform predictions, :math:`I_m = 0`), so
    building them draws no random numbers. Their optimizer is a plain ``torch.optim.SGD`` of their
    own; ``state_dict()`` holds the probe weights and that optimizer's state.

    Args:
        dims: ``{modality: feature width}``; each call must pass exactly these modalities.
        num_classes: the number of classes ``K`` (logits are ``(B, K)``).
        lr, momentum, weight_decay: the probes' SGD.
        device, dtype: of the probe weights (features are cast to ``dtype``). With ``device=None``
            the probes start on the CPU and move to the features' device on the first call.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        num_classes: int,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(dims, Mapping) or not dims:
            raise ValueError(f"Invalid dims: {dims!r}; allowed: a non-empty dict {{modality: feature width}}")
        self.dims = {m: _positive_int(f"dims[{m!r}]", d) for m, d in dims.items()}
        self.num_classes = _positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"Invalid num_classes: {num_classes!r}; allowed: an int >= 2")
        self.lr = _nonneg_float("lr", lr, positive=True)
        self.momentum = _nonneg_float("momentum", momentum)
        self.weight_decay = _nonneg_float("weight_decay", weight_decay)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"Invalid dtype: {dtype!r}; allowed: a floating torch.dtype")
        self._follow_device = device is None
        self.device = torch.device("cpu" if device is None else device)
        self.dtype = dtype
        self.probes = nn.ModuleDict()
        for m, d in self.dims.items():
            probe = nn.Linear(d, self.num_classes, device="meta")  # no init, no random numbers drawn
            probe.weight = nn.Parameter(torch.zeros(self.num_classes, d, device=self.device, dtype=dtype))
            probe.bias = nn.Parameter(torch.zeros(self.num_classes, device=self.device, dtype=dtype))
            self.probes[m] = probe
        self.optimizer = self._make_optimizer()
        self.steps = 0

    def _make_optimizer(self) -> torch.optim.SGD:
        return torch.optim.SGD(self.probes.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    @property
    def modalities(self) -> list[str]:
        return list(self.dims)

    def _check(self, features: Any, labels: Any) -> tuple[dict[str, Tensor], Tensor]:
        if not isinstance(features, Mapping):
            raise TypeError(f"Invalid features: {type(features).__name__}; allowed: a dict {{modality: (B, d) tensor}}")
        if set(features) != set(self.dims):
            raise ValueError(f"Invalid features: modalities {sorted(features)}; allowed: exactly {sorted(self.dims)}")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            what = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"Invalid labels: {what}; allowed: a 1-D integer tensor of class indices")
        n = labels.shape[0]
        if n == 0:
            raise ValueError("Invalid labels: an empty batch; allowed: at least one sample")
        out = {}
        for m, d in self.dims.items():
            z = features[m]
            if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != d or z.shape[0] != n:
                what = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                raise ValueError(f"Invalid features[{m!r}]: shape {what}; allowed: ({n}, {d}) (batch of the labels, dims[{m!r}])")
            out[m] = z.detach()
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"Invalid labels: class {bad}; allowed: 0 <= label < num_classes = {self.num_classes}")
        device = next(iter(out.values())).device
        if device != self.device:
            if self._follow_device and self.steps == 0:
                self.probes.to(device)
                self.device = device
                self.optimizer = self._make_optimizer()
            else:
                raise ValueError(f"Invalid features: on {device}; allowed: on the probes' device {self.device}")
        return out, labels.to(self.device)

    def __call__(self, features: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """This batch's per-modality logits ``{m: (B, K)}`` (before the update, detached); then one step on it."""
        feats, labels = self._check(features, labels)
        with torch.enable_grad():  # callers may be under no_grad (Balancer.update_rates)
            logits = {m: self.probes[m](z.to(self.dtype)) for m, z in feats.items()}
            loss = sum(F.cross_entropy(o, labels) for o in logits.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.steps += 1
        return {m: o.detach() for m, o in logits.items()}

    @torch.no_grad()
    def logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The probes' logits for ``features`` without training them (evaluation)."""
        if not isinstance(features, Mapping) or set(features) != set(self.dims):
            got = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise ValueError(f"Invalid features: modalities {got}; allowed: exactly {sorted(self.dims)}")
        return {m: self.probes[m](features[m].detach().to(self.device, self.dtype)) for m in self.dims}

    def state_dict(self) -> dict[str, Any]:
        """``{"dims", "num_classes", "probes": weights, "optimizer": the SGD's state, "steps"}``."""
        return {"dims": dict(self.dims), "num_classes": self.num_classes, "probes": self.probes.state_dict(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"dims", "num_classes", "probes", "optimizer", "steps"}
        if not isinstance(state, Mapping) or set(state) != keys:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"Invalid state: keys {got}; allowed: the dict of ModalityProbes.state_dict(), keys {sorted(keys)}")
        if dict(state["dims"]) != self.dims or state["num_classes"] != self.num_classes:
            raise ValueError(f"Invalid state: dims {dict(state['dims'])}, num_classes {state['num_classes']}; allowed: "
                             f"this object's dims {self.dims}, num_classes {self.num_classes}")
        self.probes.load_state_dict(state["probes"])
        # A deep copy: torch's SGD keeps the given momentum buffers as they are (shared with the source otherwise).
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.steps = int(state["steps"])
