"""Wiring helpers: per-modality parameter groups and a concatenation fusion head with slice logits."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["modality_param_groups", "ConcatFusion", "FusionOutput", "slice_logits", "NORM_LAYERS"]

# Normalisation layers, matched by type (never by parameter name).
NORM_LAYERS: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _params_of(obj: Union[nn.Module, Tensor, Iterable], what: str) -> list[Tensor]:
    if isinstance(obj, nn.Module):
        return [p for p in obj.parameters() if p.requires_grad]
    if isinstance(obj, Tensor):
        return [obj]
    try:
        items = list(obj)
    except TypeError:
        raise TypeError(f"Invalid {what}: {type(obj).__name__}; allowed: an nn.Module, a Parameter, or an iterable of them") from None
    out: list[Tensor] = []
    for item in items:
        out.extend(_params_of(item, what))
    return out


def _bias_and_norm_params(module: nn.Module) -> set[int]:
    """ids of every parameter of a normalisation layer and every parameter with fewer than 2 dims."""
    ids = set()
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if isinstance(sub, NORM_LAYERS) or p.dim() < 2:
                ids.add(id(p))
    return ids


def modality_param_groups(
    encoders: Mapping[str, Union[nn.Module, Iterable]],
    shared: Union[nn.Module, Tensor, Iterable] = (),
    *,
    mask_biases_and_norms: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`MaskedMultiModalSGD`, one per modality plus one shared.

    Args:
        encoders: ``{modality: module}`` or an ``nn.ModuleDict`` (or an iterable of modules / parameters per modality).
        shared: modules or parameters updated densely (``modality=None``), e.g. the fusion head.
        mask_biases_and_norms: when False, the parameters of normalisation layers and every
            parameter with fewer than two dimensions (biases) go into a group of their modality with
            ``masked=False``, as the official AMSS code leaves them dense. Matched by module type
            and tensor rank, never by name.
        **options: copied into every group (e.g. ``lr=0.1``, ``weight_decay=1e-4``).

    Parameters with ``requires_grad=False`` are left out. Raises ``ValueError`` if a parameter
    belongs to two modalities, or to a modality and ``shared``.
    """
    if isinstance(encoders, nn.ModuleDict):
        encoders = dict(encoders.items())
    if not isinstance(encoders, Mapping) or not encoders:
        raise ValueError(f"Invalid encoders: {type(encoders).__name__}; allowed: a non-empty dict {{modality: nn.Module}}")
    owner: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    # Qualified names, where a module gives them (its first owner's name for a shared tensor), for errors.
    named: dict[int, str] = {}
    for key, obj in [*((f"encoders[{m!r}]", e) for m, e in encoders.items()), ("shared", shared)]:
        for mod in [obj] if isinstance(obj, nn.Module) else [o for o in obj if isinstance(o, nn.Module)] if isinstance(obj, (list, tuple)) else []:
            for n, p in mod.named_parameters():
                named.setdefault(id(p), f"{key}.{n}")

    def claim(params: list[Tensor], name: str) -> None:
        for p in params:
            if id(p) in owner and owner[id(p)] != name:
                what = f"parameter {named[id(p)]} (shape {tuple(p.shape)})" if id(p) in named else f"a parameter of shape {tuple(p.shape)}"
                raise ValueError(
                    f"Invalid encoders/shared: {what} belongs to both {owner[id(p)]} and {name}; allowed: each "
                    "parameter in one place"
                )
            owner[id(p)] = name

    for modality, module in encoders.items():
        if not isinstance(modality, str) or not modality:
            raise TypeError(f"Invalid encoders key: {modality!r}; allowed: a non-empty str")
        params = list({id(p): p for p in _params_of(module, f"encoders[{modality!r}]")}.values())
        claim(params, f"modality {modality!r}")
        if mask_biases_and_norms or not isinstance(module, nn.Module):
            dense_ids: set[int] = set()
        else:
            dense_ids = _bias_and_norm_params(module)
        masked = [p for p in params if id(p) not in dense_ids]
        dense = [p for p in params if id(p) in dense_ids]
        if masked:
            groups.append({"params": masked, "modality": modality, **options})
        if dense:
            groups.append({"params": dense, "modality": modality, "masked": False, **options})
    shared_params = list({id(p): p for p in _params_of(shared, "shared")}.values())
    claim(shared_params, "shared")
    if shared_params:
        groups.append({"params": shared_params, "modality": None, **options})
    return groups


class FusionOutput(NamedTuple):
    """``logits``: fused (B, K); ``modality_logits``: ``{m: o_m}`` with ``sum_m o_m == logits``."""

    logits: Tensor
    modality_logits: dict[str, Tensor]


def slice_logits(head: nn.Linear, features: Mapping[str, Tensor], *, fused: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per-modality logits of a concatenation head ``o = W [z_1; ...; z_M] + b``.

    ``o_m = z_m W_m^T + b / M`` where ``W_m`` is the block of columns that sees ``z_m``, **in the
    order of** ``features`` (which must be the order in which they were concatenated); the slices sum
    to the fused logits. Features of another dtype than the head (bf16 features, an fp32 head) are
    cast to the head's dtype outside autocast (under autocast the matmul casts as the head's did).

    ``fused``: the head's output for these features. When given, the slices are checked to sum to it
    (within the tolerance of the dtype, relative to the logits' size): a mismatch means the features
    are not in the head's column order, or are not the head's input, and raises ``ValueError``. The
    check reads one value on the host.
    """
    widths = [z.shape[-1] for z in features.values()]
    if sum(widths) != head.in_features:
        raise ValueError(
            f"Invalid features: widths {dict(zip(features, widths))} sum to {sum(widths)}; "
            f"allowed: they must sum to head.in_features={head.in_features}"
        )
    blocks = torch.split(head.weight, widths, dim=1)
    n = len(widths)
    out = {}
    for (m, z), w in zip(features.items(), blocks):
        if z.dtype != w.dtype and not torch.is_autocast_enabled(z.device.type):
            z = z.to(w.dtype)
        out[m] = z @ w.t() + (head.bias / n if head.bias is not None else 0.0)
    if fused is not None:
        total = sum(out.values())
        if total.shape != fused.shape:
            raise ValueError(f"Invalid fused: shape {tuple(fused.shape)}; allowed: {tuple(total.shape)}, the head's output for these features")
        tol = 1e-2 if fused.dtype in (torch.float16, torch.bfloat16) else 1e-4
        err = ((total.float() - fused.float()).abs().max() / fused.float().abs().max().clamp_min(1.0)).item()
        if not err <= tol:
            raise ValueError(
                f"Invalid features: the slices do not sum to the fused logits (relative error {err:.3g}, allowed: "
                f"{tol:g}); pass the features in the order the head concatenates them (got {list(features)}), "
                "and the head's own input"
            )
    return out


class ConcatFusion(nn.Module):
    """Linear head on the concatenated modality features, returning fused and slice logits.

    Args:
        dims: ``{modality: feature width}``, in concatenation order.
        num_classes: output classes.

    ``forward({m: z_m})`` returns :class:`FusionOutput`; the features must carry exactly the
    modalities of ``dims``.
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int, bias: bool = True) -> None:
        super().__init__()
        if not isinstance(dims, Mapping) or not dims:
            raise ValueError(f"Invalid dims: {dims!r}; allowed: a non-empty dict {{modality: width}}")
        for m, d in dims.items():
            if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
                raise ValueError(f"Invalid dims[{m!r}]: {d!r}; allowed: a positive int")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"Invalid num_classes: {num_classes!r}; allowed: a positive int")
        self.dims = dict(dims)
        self.fc = nn.Linear(sum(self.dims.values()), num_classes, bias=bias)

    def forward(self, features: Mapping[str, Tensor]) -> FusionOutput:
        if set(features) != set(self.dims):
            raise ValueError(f"Invalid features: modalities {sorted(features)}; allowed: exactly {sorted(self.dims)}")
        ordered = {m: features[m] for m in self.dims}
        parts = slice_logits(self.fc, ordered)
        return FusionOutput(self.fc(torch.cat(list(ordered.values()), dim=-1)), parts)
