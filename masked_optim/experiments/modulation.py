r"""``OGMGE``: on-the-fly gradient modulation with generalisation enhancement (docs/algorithm.md §6, baseline).

OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022;
official code GeWu-Lab/OGM-GE_CVPR2022) slows down the encoder of the modality that currently
dominates the fused prediction. After ``loss.backward()``, for uni-modal logits :math:`o_m` (e.g.
the slices of :func:`masked_optim.fusion.slice_logits`) and labels :math:`y`:

.. math::
    s_m = \sum_{i=1}^{B} \mathrm{softmax}(o_{m,i})_{y_i}, \qquad
    \rho_m = \frac{s_m}{\frac{1}{M-1}\sum_{j \ne m} s_j}, \qquad
    k_m = \begin{cases} 1 - \tanh(\alpha \rho_m) & \rho_m > 1 \\ 1 & \text{otherwise} \end{cases}

and for every encoder weight :math:`W` of a modality with :math:`k_m < 1`:

.. math::
    \text{OGM:}\ g_W \leftarrow k_m g_W, \qquad
    \text{OGM-GE:}\ g_W \leftarrow k_m g_W + \varepsilon, \quad
    \varepsilon \sim \mathcal{N}\big(0, \mathrm{std}(g_W)^2\big)

with one (unbiased) standard deviation over the whole *unscaled* gradient tensor. With two
modalities :math:`a, v` this is exactly the paper's rule: :math:`\rho_a = s_a / s_v`,
:math:`\rho_v = s_v / s_a = 1 / \rho_a`, and the modality whose ratio exceeds 1 gets
:math:`k = 1 - \tanh(\alpha \rho)` (so :math:`k` jumps from 1 to below :math:`1 - \tanh(\alpha)`
as the ratio crosses 1). For :math:`M > 2` modalities, the ratio against the mean score of the
*other* modalities, with every modality whose ratio exceeds 1 suppressed, is this library's
extension (not from the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["OGMGE", "ModulationStats"]

_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class ModulationStats:
    """What the last :meth:`OGMGE.apply` did (python floats).

    ``coefficients[m]``: the :math:`k_m` applied to modality ``m`` (all 1.0 when ``active`` is
    False). ``scores[m]``: :math:`s_m`, the summed softmax probability of the true class.
    ``ratios[m]``: :math:`\\rho_m` (``nan`` when the scores were unusable). ``active``: whether
    ``epoch`` was inside ``[start, end)``; the scores and ratios are reported either way.
    """

    coefficients: dict[str, float]
    scores: dict[str, float]
    active: bool
    ratios: dict[str, float] = field(default_factory=dict)


def _check_int(name: str, value, ok, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r} (type {type(value).__name__}); allowed: {allowed}")
    if not ok(value):
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    return int(value)


def _params_of(obj, what: str) -> list[Tensor]:
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (str, bytes)):
        raise TypeError(f"Invalid {what}: {obj!r}; allowed: an nn.Module, a Parameter, or an iterable of them")
    try:
        items = list(obj)
    except TypeError:
        raise TypeError(
            f"Invalid {what}: {type(obj).__name__}; allowed: an nn.Module, a Parameter, or an iterable of them"
        ) from None
    out: list[Tensor] = []
    for item in items:
        out.extend(_params_of(item, what))
    return out


class OGMGE:
    r"""OGM / OGM-GE gradient modulation of the dominant modality's encoder (docs/algorithm.md §6).

    Args:
        encoders: ``{modality: encoder}`` (an ``nn.Module``, an ``nn.ModuleDict``, or an iterable of
            parameters per modality); at least two modalities, in the order used for noise draws.
            The modulated *encoder weights* are each encoder's parameters with ``dim() >= 2`` that
            require grad. The official code modulates only 4-D (conv) weights of ResNet encoders;
            taking every weight matrix / kernel makes the rule apply to MLP and transformer
            encoders too, while biases and normalisation scales/shifts (1-D) are left alone, as
            there. A modality with no such weight, or a parameter listed under two modalities, is
            an error.
        alpha: :math:`\alpha > 0` (default 0.8, the authors' value for CREMA-D).
        start, end: modulate when ``start <= epoch < end`` (``end=None``: from ``start`` on).
            Note that the official code's window is inclusive of ``modulation_ends``.
        noise: True for OGM-GE (scaled gradient plus Gaussian noise), False for plain OGM.
        seed: seeds the class's own ``torch.Generator`` (one per device, created on first use)
            that draws the noise; global RNG state is neither used nor advanced.

    Usage::

        loss.backward()
        ogm.apply(out.modality_logits, labels, epoch)   # scales / perturbs the encoder grads
        optimizer.step()

    :attr:`last` holds the :class:`ModulationStats` of the last :meth:`apply`;
    :meth:`state_dict` / :meth:`load_state_dict` carry the generators' states, so a resumed run
    draws exactly the noise of an uninterrupted one.
    """

    def __init__(
        self,
        encoders: Mapping[str, Union[nn.Module, Iterable]],
        *,
        alpha: float = 0.8,
        start: int = 0,
        end: Optional[int] = None,
        noise: bool = True,
        seed: int = 0,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"Invalid alpha: {alpha!r} (type {type(alpha).__name__}); allowed: a finite number > 0")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"Invalid alpha: {alpha!r}; allowed: a finite number > 0")
        self.alpha = float(alpha)
        self.start = _check_int("start", start, lambda v: v >= 0, "an int >= 0")
        if end is None:
            self.end: Optional[int] = None
        else:
            self.end = _check_int("end", end, lambda v: v > self.start, f"None or an int > start={self.start}")
        if not isinstance(noise, bool):
            raise TypeError(f"Invalid noise: {noise!r}; allowed: True (OGM-GE) or False (OGM)")
        self.noise = noise
        self.seed = _check_int("seed", seed, lambda v: 0 <= v <= _MAX_SEED, f"an int in [0, {_MAX_SEED}]")

        if isinstance(encoders, nn.ModuleDict):
            encoders = dict(encoders.items())
        if not isinstance(encoders, Mapping):
            raise TypeError(
                f"Invalid encoders: {type(encoders).__name__}; allowed: a dict {{modality: nn.Module or parameters}}"
            )
        if len(encoders) < 2:
            raise ValueError(f"Invalid encoders: modalities {list(encoders)}; allowed: at least 2 modalities")
        owner: dict[int, str] = {}
        self.weights: dict[str, list[Tensor]] = {}
        for modality, enc in encoders.items():
            if not isinstance(modality, str) or not modality:
                raise TypeError(f"Invalid encoders key: {modality!r}; allowed: a non-empty str")
            params = [p for p in _params_of(enc, f"encoders[{modality!r}]") if p.requires_grad]
            params = list({id(p): p for p in params}.values())
            for p in params:
                if id(p) in owner:
                    raise ValueError(
                        f"Invalid encoders: a parameter of shape {tuple(p.shape)} belongs to both "
                        f"{owner[id(p)]!r} and {modality!r}; allowed: each parameter in one modality"
                    )
                owner[id(p)] = modality
            weights = [p for p in params if p.dim() >= 2]
            if not weights:
                raise ValueError(
                    f"Invalid encoders[{modality!r}]: no parameter with >= 2 dims that requires grad; "
                    f"allowed: an encoder with at least one weight matrix or kernel"
                )
            self.weights[modality] = weights
        self.modalities: tuple[str, ...] = tuple(self.weights)
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}
        self.last: Optional[ModulationStats] = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """``{"seed": int, "generators": {device: ByteTensor state}}`` (for checkpoints)."""
        gens = {dev: g.get_state().clone() for dev, g in self._generators.items()}
        for dev, state in self._pending.items():
            gens.setdefault(dev, state.clone())
        return {"seed": self.seed, "generators": gens}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`: generators not in ``state`` restart from ``seed``."""
        if not isinstance(state, Mapping) or "seed" not in state or "generators" not in state:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"Invalid state: {got}; allowed: a dict with keys 'seed' and 'generators'")
        seed = _check_int("state['seed']", state["seed"], lambda v: 0 <= v <= _MAX_SEED, f"an int in [0, {_MAX_SEED}]")
        gens = state["generators"]
        if not isinstance(gens, Mapping):
            raise ValueError(f"Invalid state['generators']: {type(gens).__name__}; allowed: a dict {{device: ByteTensor}}")
        pending = {}
        for dev, s in gens.items():
            if not isinstance(s, Tensor) or s.dtype != torch.uint8:
                raise ValueError(f"Invalid state['generators'][{dev!r}]: {type(s).__name__}; allowed: a uint8 tensor")
            pending[str(torch.device(dev))] = s.detach().cpu().clone()
        self.seed = seed
        self._generators = {}
        self._pending = pending

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            self._generators[key] = gen
        return gen

    # ------------------------------------------------------------ coefficients

    def _validate(self, modality_logits: Mapping[str, Tensor], labels: Tensor) -> None:
        if not isinstance(modality_logits, Mapping) or set(modality_logits) != set(self.modalities):
            got = sorted(modality_logits) if isinstance(modality_logits, Mapping) else type(modality_logits).__name__
            raise ValueError(f"Invalid modality_logits: keys {got}; allowed: exactly {sorted(self.modalities)}")
        if (
            not isinstance(labels, Tensor)
            or labels.dim() != 1
            or labels.dtype.is_floating_point
            or labels.dtype.is_complex
            or labels.dtype == torch.bool
        ):
            what = f"shape {tuple(labels.shape)} dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"Invalid labels: {what}; allowed: a 1-D integer tensor of class indices")
        batch = labels.shape[0]
        if batch == 0:
            raise ValueError("Invalid labels: an empty batch; allowed: at least one sample")
        num_classes = None
        for m in self.modalities:
            o = modality_logits[m]
            if not isinstance(o, Tensor) or o.dim() != 2 or o.shape[0] != batch or not o.dtype.is_floating_point:
                what = f"shape {tuple(o.shape)} dtype {o.dtype}" if isinstance(o, Tensor) else type(o).__name__
                raise ValueError(
                    f"Invalid modality_logits[{m!r}]: {what}; allowed: a floating ({batch}, K) tensor matching labels"
                )
            if num_classes is None:
                num_classes = o.shape[1]
            elif o.shape[1] != num_classes:
                raise ValueError(
                    f"Invalid modality_logits[{m!r}]: {o.shape[1]} classes; allowed: {num_classes} like the others"
                )
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"Invalid labels: class {bad}; allowed: integers in [0, {num_classes - 1}]")

    @torch.no_grad()
    def _compute(self, modality_logits, labels) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        self._validate(modality_logits, labels)
        names = self.modalities
        idx = labels.long().unsqueeze(1)
        device = modality_logits[names[0]].device
        per_modality = []
        for m in names:
            o = modality_logits[m].detach().double()
            per_modality.append(torch.softmax(o, dim=1).gather(1, idx.to(o.device)).sum().to(device))
        scores = dict(zip(names, torch.stack(per_modality).cpu().tolist()))  # one host synchronisation
        coeffs = {m: 1.0 for m in names}
        if not all(math.isfinite(v) and v > 0 for v in scores.values()):
            return coeffs, scores, {m: math.nan for m in names}
        ratios = {}
        for m in names:
            others = [scores[j] for j in names if j != m]
            # fsum of one value is that value: with two modalities the ratio is exactly s_m / s_other.
            ratios[m] = scores[m] / (math.fsum(others) / len(others))
        for m in names:
            if ratios[m] > 1.0:
                coeffs[m] = 1.0 - math.tanh(self.alpha * ratios[m])
        return coeffs, scores, ratios

    def coefficients(self, modality_logits: Mapping[str, Tensor], labels: Tensor) -> dict[str, float]:
        r"""The coefficients :math:`k_m` for this batch (python floats; changes nothing).

        ``modality_logits``: ``{m: (B, K) logits}`` for exactly the encoders' modalities;
        ``labels``: ``(B,)`` class indices. Computed detached in float64. If any score
        :math:`s_m` is zero or not finite, every :math:`k_m` is 1.
        """
        return self._compute(modality_logits, labels)[0]

    # ------------------------------------------------------------------ apply

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` is in the modulation window ``[start, end)``."""
        return self.start <= epoch and (self.end is None or epoch < self.end)

    @torch.no_grad()
    def apply(self, modality_logits: Mapping[str, Tensor], labels: Tensor, epoch: int) -> dict[str, float]:
        r"""Modulate the encoder gradients in place; call after ``backward()``, before ``step()``.

        Inside the window, for each modality with :math:`k_m < 1` and each of its encoder weights
        whose ``.grad`` is not None: OGM ``g.mul_(k)``; OGM-GE ``g <- k g + std(g) * z`` with
        :math:`z \sim \mathcal{N}(0, I)` from this object's generator on ``g``'s device and
        ``std`` the unbiased standard deviation of the unscaled ``g`` (0 for a one-element
        tensor). Modalities with :math:`k_m = 1` get neither scaling nor noise.

        Returns the coefficients *applied*: the :math:`k_m` inside the window, all 1.0 outside it
        (gradients untouched). :attr:`last` records them with the scores, the ratios and
        ``active``.
        """
        _check_int("epoch", epoch, lambda v: v >= 0, "an int >= 0")
        coeffs, scores, ratios = self._compute(modality_logits, labels)
        active = self.active(epoch)
        if not active:
            coeffs = {m: 1.0 for m in self.modalities}
        else:
            for m in self.modalities:
                k = coeffs[m]
                if k < 1.0:
                    for p in self.weights[m]:
                        if p.grad is not None:
                            self._modulate(p, k)
        self.last = ModulationStats(coefficients=dict(coeffs), scores=scores, active=active, ratios=ratios)
        return coeffs

    def _modulate(self, p: Tensor, k: float) -> None:
        g = p.grad
        if g.is_sparse:
            raise ValueError(f"Invalid gradient of a parameter of shape {tuple(p.shape)}: sparse; allowed: dense gradients")
        if not self.noise or g.numel() == 0:
            g.mul_(k)
            return
        # Half-precision gradients are modulated in float32 and rounded back once.
        work_dtype = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        gw = g if work_dtype == g.dtype else g.to(work_dtype)
        std = gw.std() if gw.numel() > 1 else gw.new_zeros(())  # of the unscaled gradient; no sync
        z = torch.randn(g.shape, generator=self._generator(g.device), device=g.device, dtype=work_dtype)
        gw.mul_(k).add_(z.mul_(std))
        if gw is not g:
            g.copy_(gw)
