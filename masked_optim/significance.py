"""``ModalSignificance``: keep rates from each modality's mutual information with the label (docs/algorithm.md §3)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ModalSignificance", "SignificanceStats", "RULES"]

FALLBACK_RATE = 0.5
RULES = ("softmax", "ratio")
RATIO_MI_FLOOR = 1e-3  # docs/algorithm.md §3: u_m = max(I_m, 1e-3) / H_m
# The ratio rule rebalances until every modality's slice explains this fraction of the label entropy
# (docs/results.md, "The release study": chosen on the rule study's runs, confirmed on held-out ones).
DEFAULT_RELEASE_AT = {"ratio": 0.2, "softmax": math.inf}


@dataclass(frozen=True)
class SignificanceStats:
    """The quantities behind the last rates, for logging (python floats).

    ``label_entropy`` is :math:`H_Y`; ``mutual_information[m]`` is :math:`I_m`;
    ``feature_entropy[m]`` is :math:`H_m` (empty without features); ``mi_rate[m]`` is the
    :math:`r_m` that entered the softmax, or the :math:`u_m` of the ratio rule (after EMA);
    ``fallback`` is True when the rates are the fallback (0.5 for ``softmax``, 1.0 for ``ratio``);
    ``released`` is True once rebalancing has ended (``release_at``), and the rates are then ``max_rate``.
    """

    label_entropy: float
    mutual_information: dict[str, float]
    feature_entropy: dict[str, float]
    mi_rate: dict[str, float]
    rates: dict[str, float]
    fallback: bool = False
    cross_entropy: dict[str, float] = field(default_factory=dict)
    released: bool = False
    nonfinite_logits: tuple[str, ...] = ()  # modalities whose logits held NaN or Inf in this batch (rates: fallback)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.copysign(math.inf, num)


def _check(name: str, value, ok: bool, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    if not ok or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    return float(value)


class ModalSignificance:
    r"""Maps per-modality uni-modal predictions to keep rates (AMSS, Yang et al., docs/algorithm.md §3).

    For a batch with labels :math:`y` and uni-modal logits :math:`o_m`,
    :math:`H_Y = -\sum_c p_c \log p_c` and :math:`I_m = H_Y - \mathrm{CE}(o_m, y)`, where
    :math:`p_c` are the batch's class frequencies, :math:`\mathrm{CE}` the batch-mean
    cross-entropy (natural log) and :math:`H_m` the batch mean of the entropy of
    :math:`\mathrm{softmax}(z_m)` over the feature dimension. The more significant modality gets the
    smaller keep rate. Two rules map these to rates:

    * ``rule="softmax"`` (the paper's): :math:`r_m = (I_m + c) / H_m` (or :math:`I_m + c` without
      features), :math:`\rho_m = \mathrm{clamp}(1 - \mathrm{softmax}(r / T)_m + b, \rho_{min}, \rho_{max})`.
      With two modalities the rates sum to 1, so the weak modality is slowed too. If any
      :math:`I_m + c \le 0`, or anything is not finite, every rate is 0.5.
    * ``rule="ratio"``: :math:`u_m = \max(I_m, 10^{-3}) / H_m` (or :math:`\max(I_m, 10^{-3})`),
      :math:`\rho_m = \mathrm{clamp}((\min_j u_j / u_m)^{p}, \rho_{min}, \rho_{max})`: the least
      significant modality keeps the full step (:math:`\rho = 1` with the default
      :math:`\rho_{max} = 1`) and only the dominant ones are slowed. ``temperature``, ``offset``
      and ``bias`` do not enter. If anything is not finite, every rate is 1 (no rebalancing).

    Release (this library's addition to docs/algorithm.md §3, on by default for ``ratio``): rebalancing is
    meant to get a starved modality off the ground, and slowing a dominant modality after the weak
    one has learned what it can only under-trains the dominant one. So the estimator also keeps an
    EMA (factor ``release_beta``, starting at the first batch) of each modality's normalised
    information :math:`I_m / H_Y`, the fraction of the batch's label entropy that the modality's
    slice explains. Once every modality's EMA has reached ``release_at``, the estimator is
    *released*: from then on every call returns ``max_rate`` for every modality (1 with the ratio
    rule's defaults: plain SGD), until :meth:`reset`. ``release_at=math.inf`` never releases:
    the rules exactly as docs/algorithm.md §3 states them.

    A fallback batch, or one with a single class (:math:`H_Y = 0`), updates neither EMA.

    Args:
        rule: ``"ratio"`` (default: the rule the studies of docs/results.md measured
            best) or ``"softmax"`` (the paper's).
        power: :math:`p > 0` of the ratio rule (default 1).
        temperature: :math:`T > 0` (default 0.2).
        offset: :math:`c` added to :math:`I_m` (default 0.5, as the official audio-visual code).
        bias: :math:`b` added to the rates before clamping (default 0).
        min_rate, max_rate: clamp bounds, ``0 < min_rate <= max_rate <= 1`` (defaults 0.1, and
            0.9 for ``softmax`` / 1.0 for ``ratio``).
        beta: EMA factor in [0, 1) for :math:`r_m` across calls (default 0: per batch, as the
            paper): :math:`\bar r \leftarrow \beta \bar r + (1 - \beta) r`, starting at the first r.
        release_at: the normalised information every modality must reach for rebalancing to end,
            a number >= 0 or ``math.inf`` (never). Default ``None``: the rule's default, 0.2 for
            ``ratio`` and ``math.inf`` for ``softmax`` (the paper's behaviour).
        release_beta: EMA factor in [0, 1) for :math:`I_m / H_Y` (default 0.9: about ten batches).
        sync_distributed: under an initialised ``torch.distributed`` with more than one rank
            (default True), the label histogram and the sums of cross-entropies and feature
            entropies are all-reduced (one call, docs/algorithm.md §3) before the rates are computed, so every
            rank gets the rates of the global batch. Every rank must then call the estimator at
            the same steps, with the modalities in the same order and the same number of classes.
        process_group: the group to reduce over (default: the whole world).

    Calling it returns ``{modality: rate}`` as python floats (one host synchronisation), ready for
    :meth:`MaskedMultiModalSGD.set_rates`; :attr:`last` holds the :class:`SignificanceStats`.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        offset: float = 0.5,
        bias: float = 0.0,
        min_rate: float = 0.1,
        max_rate: Optional[float] = None,
        beta: float = 0.0,
        sync_distributed: bool = True,
        process_group=None,
        *,
        rule: str = "ratio",
        power: float = 1.0,
        release_at: Optional[float] = None,
        release_beta: float = 0.9,
    ) -> None:
        if not isinstance(rule, str) or rule not in RULES:
            raise ValueError(f"Invalid rule: {rule!r}; allowed: one of {', '.join(map(repr, RULES))}")
        self.rule = rule
        self.power = _check("power", power, power > 0, "a number > 0")
        if max_rate is None:
            max_rate = 0.9 if rule == "softmax" else 1.0
        if not isinstance(sync_distributed, bool):
            raise TypeError(f"Invalid sync_distributed: {sync_distributed!r}; allowed: True or False")
        self.sync_distributed = sync_distributed
        self.process_group = process_group
        self.temperature = _check("temperature", temperature, temperature > 0, "a number > 0")
        self.offset = _check("offset", offset, True, "a finite number")
        self.bias = _check("bias", bias, True, "a finite number")
        self.min_rate = _check("min_rate", min_rate, 0 < min_rate <= 1, "a number in (0, 1]")
        self.max_rate = _check("max_rate", max_rate, 0 < max_rate <= 1, "a number in (0, 1]")
        if self.min_rate > self.max_rate:
            raise ValueError(
                f"Invalid min_rate={min_rate!r} > max_rate={max_rate!r}; allowed: min_rate <= max_rate"
            )
        self.beta = _check("beta", beta, 0 <= beta < 1, "a number in [0, 1)")
        if release_at is None:
            release_at = DEFAULT_RELEASE_AT[rule]
        allowed = "a number >= 0 or math.inf (never release), or None (the rule's default)"
        if isinstance(release_at, bool) or not isinstance(release_at, (int, float)):
            raise TypeError(f"Invalid release_at: {release_at!r}; allowed: {allowed}")
        if math.isnan(release_at) or release_at < 0:
            raise ValueError(f"Invalid release_at: {release_at!r}; allowed: {allowed}")
        self.release_at = float(release_at)
        self.release_beta = _check("release_beta", release_beta, 0 <= release_beta < 1, "a number in [0, 1)")
        self._ema: Optional[dict[str, float]] = None
        self._info_ema: Optional[dict[str, float]] = None
        self.released = False
        self.nonfinite_batches = 0  # batches whose logits held NaN or Inf (their rates were the fallback)
        self._warned_nonfinite = False
        self.last: Optional[SignificanceStats] = None

    def state_dict(self) -> dict:
        """The EMA states, whether the estimator is released, and the rule they belong to (for checkpoints)."""
        return {
            "ema": None if self._ema is None else dict(self._ema),
            "rule": self.rule,
            "info_ema": None if self._info_ema is None else dict(self._info_ema),
            "released": self.released,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; an EMA of the other rule's statistic is refused."""
        rule = state.get("rule", "softmax")  # states written before the ratio rule existed
        if rule != self.rule and state.get("ema") is not None:
            raise ValueError(
                f"Invalid state: an EMA of rule {rule!r}; allowed: rule {self.rule!r}, this estimator's "
                "(the two rules smooth different statistics)"
            )
        ema = state.get("ema")
        self._ema = None if ema is None else {str(k): float(v) for k, v in ema.items()}
        # States written before release existed have neither key: not released, no EMA yet.
        info = state.get("info_ema")
        self._info_ema = None if info is None else {str(k): float(v) for k, v in info.items()}
        released = state.get("released", False)
        if not isinstance(released, bool):
            raise ValueError(f"Invalid state: released={released!r}; allowed: True or False")
        self.released = released

    def reset(self) -> None:
        """Forget both EMAs and end a release: the next call rebalances again."""
        self._ema = None
        self._info_ema = None
        self.released = False

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return (
            self.sync_distributed and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _all_reduce(self, *stats: Tensor) -> tuple[Tensor, ...]:
        """Sums of the statistics over the ranks of ``process_group``, in one all-reduce."""
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in stats])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        return tuple(flat.split([t.numel() for t in stats]))

    @staticmethod
    def _validate(logits: Mapping[str, Tensor], labels: Tensor, features: Optional[Mapping[str, Tensor]]):
        if not isinstance(logits, Mapping) or not logits:
            raise ValueError(f"Invalid logits: {type(logits).__name__}; allowed: a non-empty dict {{modality: (B, K) tensor}}")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool \
                or labels.is_complex():
            what = f"shape {tuple(labels.shape)} dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"Invalid labels: {what}; allowed: a 1-D integer tensor of class indices")
        batch = labels.shape[0]
        if batch == 0:
            raise ValueError("Invalid labels: an empty batch; allowed: at least one sample")
        num_classes = None
        for m, o in logits.items():
            if not isinstance(o, Tensor) or o.dim() != 2 or o.shape[0] != batch:
                shape = tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__
                raise ValueError(f"Invalid logits[{m!r}]: shape {shape}; allowed: ({batch}, K) matching labels")
            if num_classes is None:
                num_classes = o.shape[1]
            elif o.shape[1] != num_classes:
                raise ValueError(f"Invalid logits[{m!r}]: {o.shape[1]} classes; allowed: {num_classes} like the others")
        if features is not None:
            if not isinstance(features, Mapping) or set(features) != set(logits):
                got = sorted(features) if isinstance(features, Mapping) else type(features).__name__
                raise ValueError(f"Invalid features: keys {got}; allowed: the same modalities as logits {sorted(logits)}")
            for m, z in features.items():
                if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != batch:
                    shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                    raise ValueError(f"Invalid features[{m!r}]: shape {shape}; allowed: ({batch}, D)")
        ModalSignificance._check_values(logits, labels, num_classes)
        return num_classes

    @staticmethod
    def _check_values(logits: Mapping[str, Tensor], labels: Tensor, num_classes: int) -> None:
        """Labels within ``[0, num_classes)`` and logits that are not probabilities, read in one transfer
        (on CUDA an out-of-range label would otherwise be a device-side assert, on CPU a bare IndexError)."""
        names = list(logits)
        probs = []
        for m in names:  # rows in [0, 1] that sum to 1: softmax outputs, not logits
            o = logits[m].detach().double()
            probs.append(((o >= 0).all() & (o <= 1).all() & ((o.sum(1) - 1).abs() < 1e-4).all()).double()
                         if num_classes > 1 else o.new_zeros((), dtype=torch.float64))
        low, high = torch.aminmax(labels)
        values = torch.cat([torch.stack([low, high]).double().to(probs[0].device), torch.stack(probs)]).cpu().tolist()
        low, high, flags = int(values[0]), int(values[1]), [v != 0 for v in values[2:]]
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"Invalid labels: class {bad}; allowed: integers in [0, {num_classes - 1}] (the logits have "
                f"{num_classes} columns)"
            )
        for m, looks_like_probs in zip(names, flags):
            if looks_like_probs:
                raise ValueError(
                    f"Invalid logits[{m!r}]: every row is in [0, 1] and sums to 1, i.e. probabilities; allowed: "
                    "logits (pre-softmax scores: the estimator applies log-softmax itself)"
                )

    @torch.no_grad()
    def __call__(
        self,
        logits: Mapping[str, Tensor],
        labels: Tensor,
        features: Optional[Mapping[str, Tensor]] = None,
    ) -> dict[str, float]:
        """Keep rates ``{modality: rho_m}`` for this batch (see the class docstring)."""
        num_classes = self._validate(logits, labels, features)
        names = list(logits)
        labels = labels.long()
        counts = torch.bincount(labels.reshape(-1), minlength=num_classes).double()
        ce = torch.stack([F.cross_entropy(logits[m].double(), labels) for m in names])
        if features is not None:
            ent = torch.stack(
                [-(F.softmax(features[m].double(), -1) * F.log_softmax(features[m].double(), -1)).sum(-1).mean() for m in names]
            )
        else:
            ent = torch.ones_like(ce)
        if self._distributed():
            # Batch means -> sums, summed over ranks, -> means of the global batch.
            local = float(labels.shape[0])
            counts, ce_sum, ent_sum = self._all_reduce(counts, ce * local, ent * local)
            ce, ent = ce_sum / counts.sum(), (ent_sum / counts.sum() if features is not None else ent)
        p = counts / counts.sum()
        h_y = -(torch.where(p > 0, p * p.log(), 0.0)).sum()
        mi = h_y - ce
        # One transfer of every statistic: the only host synchronisation of the call.
        h_y, ce_l, mi_l, ent_l = torch.cat([h_y.reshape(1), ce, mi, ent]).cpu().split([1, len(names), len(names), len(names)])
        h_y = float(h_y)
        ce_d = dict(zip(names, ce_l.tolist()))
        mi_d = dict(zip(names, mi_l.tolist()))
        ent_d = dict(zip(names, ent_l.tolist())) if features is not None else {}
        nonfinite = tuple(m for m in names if not math.isfinite(ce_d[m]))
        if nonfinite:
            self.nonfinite_batches += 1
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"ModalSignificance: NaN or Inf in logits of {list(nonfinite)}: this batch's rates are the fallback "
                    f"({FALLBACK_RATE if self.rule == 'softmax' else 1.0}); counted in `nonfinite_batches` and "
                    "`last.nonfinite_logits` (warned once per estimator)",
                    RuntimeWarning,
                    stacklevel=2,
                )

        if self.rule == "softmax":
            numer = {m: mi_d[m] + self.offset for m in names}
        else:
            numer = {m: max(mi_d[m], RATIO_MI_FLOOR) if math.isfinite(mi_d[m]) else mi_d[m] for m in names}
        # A zero feature entropy (one-hot softmax of diverged features) makes r infinite: fallback.
        r = {m: _ratio(numer[m], ent_d[m]) if features is not None else numer[m] for m in names}
        values = [h_y, *ce_d.values(), *ent_d.values(), *r.values()]
        fallback = any(v <= 0 for v in numer.values()) or not all(math.isfinite(v) for v in values)
        if fallback:
            rates = {m: FALLBACK_RATE if self.rule == "softmax" else 1.0 for m in names}
            r_used = r
        else:
            if self.beta > 0 and self._ema is not None and set(self._ema) == set(names):
                r_used = {m: self.beta * self._ema[m] + (1 - self.beta) * r[m] for m in names}
            else:
                r_used = dict(r)
            self._ema = dict(r_used)
            self._update_release(mi_d, h_y)
            if self.rule == "softmax":
                scaled = [r_used[m] / self.temperature for m in names]
                top = max(scaled)
                exps = [math.exp(s - top) for s in scaled]
                z = sum(exps)
                raw = {m: 1.0 - e / z + self.bias for m, e in zip(names, exps)}
            else:
                weakest = min(r_used.values())
                raw = {m: (weakest / r_used[m]) ** self.power for m in names}
            rates = {m: min(self.max_rate, max(self.min_rate, raw[m])) for m in names}
        if self.released:
            rates = {m: self.max_rate for m in names}
        self.last = SignificanceStats(
            label_entropy=h_y,
            mutual_information=mi_d,
            feature_entropy=ent_d,
            mi_rate=r_used,
            rates=dict(rates),
            fallback=fallback,
            cross_entropy=ce_d,
            released=self.released,
            nonfinite_logits=nonfinite,
        )
        return rates

    def _update_release(self, mi: Mapping[str, float], h_y: float) -> None:
        """Fold this batch's :math:`I_m / H_Y` into the release EMA; release once every modality's EMA reaches ``release_at``."""
        if self.released or h_y <= 0 or math.isinf(self.release_at):
            return
        x = {m: v / h_y for m, v in mi.items()}
        prev = self._info_ema
        if prev is None or set(prev) != set(x):
            ema = x
        else:
            ema = {m: self.release_beta * prev[m] + (1 - self.release_beta) * x[m] for m in x}
        self._info_ema = ema
        if min(ema.values()) >= self.release_at:
            self.released = True
