r"""Diagnosing & Re-learning (Wei et al., ECCV 2024; docs/algorithm.md §5).

Every ``every`` epochs (at most ``times`` times), each uni-modal encoder's learning state is
diagnosed from how well its features cluster by class on the training split versus a held-out
validation split, and the encoder is softly re-initialised towards its initial weights in
proportion to the gap:

.. math::
    \alpha_m = \tanh(\lambda \, |P^{train}_m - P^{val}_m|), \qquad
    \theta_m \leftarrow \alpha_m \, \theta_m^{init} + (1 - \alpha_m) \, \theta_m

where :math:`P` is the purity of k-means clusters (k = number of classes) on the features scaled to
[-1, 1] per dimension. An encoder that fits its training set much better than held-out data is
memorising, and is pulled back further. It works on the weights, every few epochs, so it combines
with AMSS's per-step masks (``relearn+amss`` in the training CLI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from .clustering import cluster_purity

__all__ = ["DiagnoseRelearn", "Diagnosis"]


@dataclass(frozen=True)
class Diagnosis:
    """One diagnosis: per modality the train and validation purities and the strength ``alpha``."""

    epoch: Optional[int]
    train_purity: dict[str, float]
    val_purity: dict[str, float]
    alpha: dict[str, float]
    applied: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_purity": dict(self.train_purity), "val_purity": dict(self.val_purity),
                "alpha": dict(self.alpha), "applied": self.applied}


def _check_number(name: str, value, ok, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    return float(value)


def _check_int(name: str, value, ok, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    return value


def _gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` (rows) from every rank under torch.distributed; ``t`` itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


class DiagnoseRelearn:
    r"""Diagnose each encoder's learning state by cluster purity and softly re-initialise it.

    Args:
        encoders: ``{modality: nn.Module}`` (or an ``nn.ModuleDict``). Their parameters (and, with
            ``reset_buffers``, floating-point buffers) are snapshotted now as :math:`\theta^{init}`.
        lam: :math:`\lambda > 0` in :math:`\alpha = \tanh(\lambda |gap|)` (default 3).
        every: diagnose after every ``every``-th epoch (epochs counted from 1; default 20).
        times: at most this many re-initialisations (default 3).
        n_clusters: k of k-means; default (None) the number of distinct training labels.
        reset_buffers: also interpolate the encoders' floating-point buffers (e.g. batch-norm
            running statistics) towards their snapshot; integer buffers are left alone.
        optimizer: the optimizer of the encoders, needed for ``reset_optimizer_state``.
        reset_optimizer_state: after a re-initialisation, drop the encoders' optimizer state:
            the momentum buffers with :class:`~masked_optim.MaskedMultiModalSGD` or
            ``torch.optim.SGD`` (the step counters, which key the masks, are kept); the whole
            per-parameter state with any other optimizer.
        seed: seeds k-means (k-means++ and its restarts), so a diagnosis is deterministic.
        n_init: k-means restarts (default 10).
        batch_size: rows per forward pass when extracting features from a loader.

    Under ``torch.distributed`` the features of every rank are gathered before clustering, so every
    rank computes the same ``alpha`` and the replicas stay identical.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        lam: float = 3.0,
        every: int = 20,
        times: int = 3,
        n_clusters: Optional[int] = None,
        reset_buffers: bool = False,
        optimizer: Optional[torch.optim.Optimizer] = None,
        reset_optimizer_state: bool = False,
        seed: int = 0,
        n_init: int = 10,
        batch_size: int = 1024,
    ) -> None:
        if isinstance(encoders, nn.ModuleDict):
            encoders = dict(encoders.items())
        if not isinstance(encoders, Mapping) or not encoders:
            raise ValueError(f"Invalid encoders: {encoders!r}; allowed: a non-empty dict {{modality: nn.Module}}")
        for m, enc in encoders.items():
            if not isinstance(enc, nn.Module):
                raise TypeError(f"Invalid encoders[{m!r}]: {type(enc).__name__}; allowed: an nn.Module")
        self.encoders = dict(encoders)
        self.lam = _check_number("lam", lam, lambda v: v > 0, "a finite number > 0")
        self.every = _check_int("every", every, lambda v: v >= 1, "an int >= 1")
        self.times = _check_int("times", times, lambda v: v >= 0, "an int >= 0")
        if n_clusters is not None:
            _check_int("n_clusters", n_clusters, lambda v: v >= 2, "None or an int >= 2")
        self.n_clusters = n_clusters
        if not isinstance(reset_buffers, bool) or not isinstance(reset_optimizer_state, bool):
            raise TypeError(f"Invalid reset_buffers / reset_optimizer_state: {reset_buffers!r} / {reset_optimizer_state!r}; allowed: bool")
        if reset_optimizer_state and optimizer is None:
            raise ValueError("Invalid reset_optimizer_state=True with optimizer=None; allowed: pass the encoders' optimizer")
        self.reset_buffers = reset_buffers
        self.optimizer = optimizer
        self.reset_optimizer_state = reset_optimizer_state
        self.seed = _check_int("seed", seed, lambda v: v >= 0, "an int >= 0")
        self.n_init = _check_int("n_init", n_init, lambda v: v >= 1, "an int >= 1")
        self.batch_size = _check_int("batch_size", batch_size, lambda v: v >= 1, "an int >= 1")
        self.initial: dict[str, dict[str, Tensor]] = {m: self._snapshot(enc) for m, enc in self.encoders.items()}
        self.fired = 0
        self.history: list[Diagnosis] = []

    # --- state -----------------------------------------------------------------------------

    def _snapshot(self, enc: nn.Module) -> dict[str, Tensor]:
        snap = {f"param:{n}": p.detach().clone() for n, p in enc.named_parameters()}
        if self.reset_buffers:
            snap.update({f"buffer:{n}": b.detach().clone() for n, b in enc.named_buffers() if b.is_floating_point()})
        return snap

    def state_dict(self) -> dict[str, Any]:
        """The snapshot, how many times it fired, and the history (for checkpoints)."""
        return {"initial": {m: dict(s) for m, s in self.initial.items()}, "fired": self.fired,
                "history": [d.as_dict() for d in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["initial"]) != set(self.encoders):
            raise ValueError(f"Invalid state: modalities {sorted(state['initial'])}; allowed: {sorted(self.encoders)}")
        self.initial = {m: {k: v.clone() for k, v in s.items()} for m, s in state["initial"].items()}
        self.fired = int(state["fired"])
        self.history = [Diagnosis(**h) for h in state["history"]]

    # --- diagnosis -------------------------------------------------------------------------

    @torch.no_grad()
    def extract(self, loader: Iterable) -> tuple[dict[str, Tensor], Tensor]:
        """Encoder features of every batch ``(inputs: {m: x_m}, labels)`` of ``loader``.

        Each encoder runs in eval mode without gradients on its own device (its training flag is
        restored afterwards); features are returned on that device, labels on the labels' device.
        """
        flags = {m: enc.training for m, enc in self.encoders.items()}
        feats: dict[str, list[Tensor]] = {m: [] for m in self.encoders}
        labels: list[Tensor] = []
        try:
            for enc in self.encoders.values():
                enc.eval()
            for batch in loader:
                x, y = batch
                missing = set(self.encoders) - set(x)
                if missing:
                    raise ValueError(f"Invalid batch: modalities {sorted(x)}; allowed: a dict with {sorted(self.encoders)}")
                for m, enc in self.encoders.items():
                    device = next(iter(enc.parameters())).device
                    feats[m].append(enc(x[m].to(device)).flatten(1))
                labels.append(y)
        finally:
            for m, enc in self.encoders.items():
                enc.train(flags[m])
        if not labels:
            raise ValueError("Invalid loader: no batches; allowed: an iterable of (inputs, labels) batches")
        return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)

    def diagnose_features(
        self, train: tuple[Mapping[str, Tensor], Tensor], val: tuple[Mapping[str, Tensor], Tensor], epoch: Optional[int] = None
    ) -> Diagnosis:
        """Purities and ``alpha`` from features already extracted: ``({m: (n, d)}, labels)`` per split."""
        (f_tr, y_tr), (f_va, y_va) = train, val
        y_tr, y_va = _gather(y_tr), _gather(y_va)
        k = self.n_clusters or int(torch.unique(y_tr).numel())
        p_tr, p_va, alpha = {}, {}, {}
        for m in self.encoders:
            if m not in f_tr or m not in f_va:
                raise ValueError(f"Invalid features: missing modality {m!r}; allowed: every modality of encoders")
            p_tr[m] = cluster_purity(_gather(f_tr[m]).flatten(1), y_tr, k, n_init=self.n_init, seed=self.seed)
            p_va[m] = cluster_purity(_gather(f_va[m]).flatten(1), y_va, k, n_init=self.n_init, seed=self.seed)
            alpha[m] = math.tanh(self.lam * abs(p_tr[m] - p_va[m]))
        return Diagnosis(epoch, p_tr, p_va, alpha)

    def diagnose(self, train: Any, val: Any, epoch: Optional[int] = None) -> Diagnosis:
        """Purities and ``alpha`` of each modality; does not change the encoders.

        ``train`` and ``val`` are each either a loader (an iterable of ``({m: x_m}, labels)``
        batches, whose encoder features are extracted) or features already extracted, given as
        the pair ``({m: z_m}, labels)``. The validation split must be held out: never the test split.
        """
        return self.diagnose_features(self._features(train), self._features(val), epoch)

    def _features(self, split: Any) -> tuple[dict[str, Tensor], Tensor]:
        if isinstance(split, tuple) and len(split) == 2 and isinstance(split[0], Mapping) and isinstance(split[1], Tensor):
            return dict(split[0]), split[1]
        return self.extract(split)

    # --- re-learning -----------------------------------------------------------------------

    @torch.no_grad()
    def relearn(self, alpha: Mapping[str, float]) -> None:
        r""":math:`\theta_m \leftarrow \alpha_m \theta_m^{init} + (1 - \alpha_m) \theta_m` for each modality in ``alpha``."""
        for m, a in alpha.items():
            if m not in self.encoders:
                raise ValueError(f"Invalid alpha: modality {m!r}; allowed: one of {sorted(self.encoders)}")
            a = _check_number(f"alpha[{m!r}]", a, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
            enc, snap = self.encoders[m], self.initial[m]
            for n, p in enc.named_parameters():
                p.copy_(a * snap[f"param:{n}"] + (1 - a) * p)
            if self.reset_buffers:
                for n, b in enc.named_buffers():
                    if b.is_floating_point():
                        b.copy_(a * snap[f"buffer:{n}"] + (1 - a) * b)
            if self.reset_optimizer_state and a > 0:
                self._reset_optimizer(enc)

    def _reset_optimizer(self, enc: nn.Module) -> None:
        from ..optim import MaskedMultiModalSGD

        keep_step = isinstance(self.optimizer, (MaskedMultiModalSGD, torch.optim.SGD))
        for p in enc.parameters():
            if p in self.optimizer.state:
                if keep_step:
                    self.optimizer.state[p].pop("momentum_buffer", None)
                else:
                    del self.optimizer.state[p]

    def maybe_step(self, epoch: int, train: Any, val: Any) -> Optional[Diagnosis]:
        """After epoch ``epoch`` (counted from 1): diagnose and re-learn if the schedule says so.

        ``train`` / ``val``: loaders or feature pairs, as :meth:`diagnose`.

        Fires when ``epoch % every == 0`` and it has fired fewer than ``times`` times; returns the
        applied :class:`Diagnosis` (also appended to :attr:`history`), or None.
        """
        _check_int("epoch", epoch, lambda v: v >= 1, "an int >= 1")
        if epoch % self.every or self.fired >= self.times:
            return None
        d = self.diagnose(train, val, epoch)
        self.relearn(d.alpha)
        self.fired += 1
        d = Diagnosis(d.epoch, d.train_purity, d.val_purity, d.alpha, applied=True)
        self.history.append(d)
        return d
