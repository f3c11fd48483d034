"""Reference models for the benchmarks: one encoder per modality and a concatenation fusion head.

Vector modalities (``(n, d)`` features) get an MLP; sensor windows (``(n, channels, time)``) get a
small 1-D CNN. Both end in a ReLU feature vector of width ``feature_dim`` that the
:class:`~masked_optim.fusion.ConcatFusion` head concatenates; the head's per-modality slice logits
feed :class:`~masked_optim.ModalSignificance` and the per-modality accuracies.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..fusion import ConcatFusion, FusionOutput

__all__ = ["MLPEncoder", "Conv1dEncoder", "MultimodalNet", "AttentionFusionNet", "ModelOutput", "build_model", "FUSIONS"]

FUSIONS = ("concat", "attention")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: a positive int")
    return value


class MLPEncoder(nn.Sequential):
    """``d_in -> hidden -> ... -> feature_dim`` with ReLU after every layer (docs/algorithm.md §8's encoder)."""

    def __init__(self, d_in: int, hidden: Sequence[int] = (128,), feature_dim: int = 64) -> None:
        widths = [_positive_int("d_in", d_in), *(_positive_int("hidden", h) for h in hidden), _positive_int("feature_dim", feature_dim)]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers)
        self.feature_dim = feature_dim


class Conv1dEncoder(nn.Module):
    """A small 1-D CNN for ``(batch, channels, time)`` sensor windows.

    Three convolution blocks (16, 32, 64 filters; kernels 7, 5, 3; the first with stride 2, the
    first two followed by max-pooling), batch normalisation, global average pooling over time, and
    a linear layer to ``feature_dim`` with ReLU. About 0.3 M multiply-adds per 200-sample window,
    so a whole comparison fits on two CPU cores.
    """

    def __init__(self, in_channels: int, feature_dim: int = 64, width: int = 16) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("width", width)
        self.feature_dim = _positive_int("feature_dim", feature_dim)
        c1, c2, c3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, c1, 7, stride=2, padding=3), nn.BatchNorm1d(c1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(c1, c2, 5, padding=2), nn.BatchNorm1d(c2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(c2, c3, 3, padding=1), nn.BatchNorm1d(c3), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )
        self.proj = nn.Sequential(nn.Linear(c3, feature_dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"Invalid input: shape {tuple(x.shape)}; allowed: (batch, channels, time)")
        return self.proj(self.features(x))


class ModelOutput(NamedTuple):
    """``logits`` (B, K) fused; ``modality_logits`` ``{m: o_m}`` (the head's slices; None for a fusion
    without slices, e.g. :class:`AttentionFusionNet`); ``features`` ``{m: z_m}``."""

    logits: Tensor
    modality_logits: Optional[dict[str, Tensor]]
    features: dict[str, Tensor]


def _feature_dims(encoders: Mapping[str, nn.Module]) -> dict[str, int]:
    dims = {}
    for m, enc in encoders.items():
        dim = getattr(enc, "feature_dim", None)
        if not isinstance(dim, int):
            raise ValueError(f"Invalid encoders[{m!r}]: it has no int attribute feature_dim; allowed: an encoder that declares its output width")
        dims[m] = dim
    return dims


class _EncoderNet(nn.Module):
    """What both fusion models share: ``encoders`` (a ModuleDict; each declares ``feature_dim``), their
    widths ``dims``, ``modalities`` and the encoder pass over a checked input."""

    def __init__(self, encoders: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not isinstance(encoders, Mapping) or not encoders:
            raise ValueError(f"Invalid encoders: {encoders!r}; allowed: a non-empty dict {{modality: nn.Module}}")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.dims = _feature_dims(self.encoders)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def _features(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if set(x) != set(self.encoders):
            raise ValueError(f"Invalid input: modalities {sorted(x)}; allowed: exactly {sorted(self.encoders)}")
        return {m: enc(x[m]) for m, enc in self.encoders.items()}


class MultimodalNet(_EncoderNet):
    """``encoders[m](x[m]) -> z_m``, then a :class:`ConcatFusion` head on ``[z_1; ...; z_M]``.

    Pass ``model.encoders`` and ``model.head`` to :func:`~masked_optim.modality_param_groups`.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], num_classes: int) -> None:
        super().__init__(encoders)
        self.head = ConcatFusion(self.dims, num_classes)

    def forward(self, x: Mapping[str, Tensor]) -> ModelOutput:
        features = self._features(x)
        out: FusionOutput = self.head(features)
        return ModelOutput(out.logits, out.modality_logits, features)


class AttentionFusionNet(_EncoderNet):
    """``encoders[m](x[m]) -> z_m``, each projected to a token, fused by one multi-head self-attention layer.

    The tokens ``t_m = W_m z_m + e_m`` (a linear projection per modality plus a learned modality
    embedding) go through ``nn.MultiheadAttention`` (one layer, ``heads`` heads) with a residual
    connection and layer norm; their mean feeds a linear classifier. The fused logits are not a sum
    of per-modality terms, so there are no slice logits: ``forward`` returns ``modality_logits=None``
    and the estimator's logits come from :class:`~masked_optim.ModalityProbes` (docs/algorithm.md §3.8).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], num_classes: int, *, token_dim: int = 32, heads: int = 4) -> None:
        _positive_int("token_dim", token_dim)
        if _positive_int("heads", heads) > token_dim or token_dim % heads:
            raise ValueError(f"Invalid heads: {heads!r}; allowed: a divisor of token_dim = {token_dim}")
        super().__init__(encoders)
        self.proj = nn.ModuleDict({m: nn.Linear(d, token_dim) for m, d in self.dims.items()})
        self.embed = nn.Parameter(torch.zeros(len(self.dims), token_dim))
        self.attn = nn.MultiheadAttention(token_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(token_dim)
        self.classifier = nn.Linear(token_dim, _positive_int("num_classes", num_classes))

    def forward(self, x: Mapping[str, Tensor]) -> ModelOutput:
        features = self._features(x)
        tokens = torch.stack([self.proj[m](features[m]) for m in self.encoders], 1) + self.embed
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        fused = self.norm(tokens + mixed).mean(1)
        return ModelOutput(self.classifier(fused), None, features)


def build_model(
    shapes: Mapping[str, tuple[int, ...]],
    num_classes: int,
    fusion: str = "concat",
    *,
    hidden: Sequence[int] = (128,),
    feature_dim: int = 64,
    conv_width: int = 16,
) -> "MultimodalNet | AttentionFusionNet":
    """An encoder per modality from its per-sample shape: ``(d,)`` -> MLP, ``(channels, time)`` -> CNN;
    ``fusion="concat"`` (default): a :class:`MultimodalNet` (concatenation head with slice logits),
    ``"attention"``: an :class:`AttentionFusionNet` (cross-attention over modality tokens, no slices)."""
    if fusion not in FUSIONS:
        raise ValueError(f"Invalid fusion: {fusion!r}; allowed: one of {list(FUSIONS)}")
    encoders: dict[str, nn.Module] = {}
    for m, shape in shapes.items():
        shape = tuple(shape)
        if len(shape) == 1:
            encoders[m] = MLPEncoder(shape[0], hidden, feature_dim)
        elif len(shape) == 2:
            encoders[m] = Conv1dEncoder(shape[0], feature_dim, conv_width)
        else:
            raise ValueError(f"Invalid shapes[{m!r}]: {shape}; allowed: (features,) or (channels, time)")
    if fusion == "attention":
        return AttentionFusionNet(encoders, num_classes)
    return MultimodalNet(encoders, num_classes)


@torch.no_grad()
def predict(model: MultimodalNet, x: Mapping[str, Tensor], batch_size: int = 1024) -> ModelOutput:
    """Forward the whole split in eval mode, in chunks of ``batch_size``; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        n = next(iter(x.values())).shape[0]
        parts = [model({m: v[i : i + batch_size] for m, v in x.items()}) for i in range(0, n, batch_size)]
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("Invalid input: 0 samples; allowed: at least one")
    return ModelOutput(
        torch.cat([p.logits for p in parts]),
        None if parts[0].modality_logits is None
        else {m: torch.cat([p.modality_logits[m] for p in parts]) for m in parts[0].modality_logits},
        {m: torch.cat([p.features[m] for p in parts]) for m in parts[0].features},
    )
