"""One parameter group's masked step, dispatched per tensor to a backend (cf. ``torch.optim.sgd.sgd``).

:class:`MaskedMultiModalSGD.step` gathers each param group's tensors into a :class:`GroupTensors`
and hands it here, in two calls so that nothing is updated before every gradient is checked:

1. :func:`prepare` (all groups at once): picks each tensor's backend and runs the backend's
   preparation, which also yields the probe of the non-finite check (:class:`Probes`). The cpp
   backend runs its fused stage 1 for the group's tensors in one call
   (``torch.ops.masked_optim.tensor_scalars_multi``), whose float64 sums of ``g**2`` give the probe
   and whose ``[alpha, beta]`` and scores the kernel then reuses (with ``mask="scale"``, which has
   no stage 1, the same op computes the sums of squares alone); the
   other backends' tensors are probed together, by one multi-tensor ``torch._foreach_norm`` per
   group, device and dtype (shards: ``aminmax``).
2. :func:`masked_sgd_step` / :func:`masked_adamw_step` (per group, once the probes are all
   finite): runs each backend on its tensors and returns the kept-unit counts.

Tensors with nothing to mask (shared or ``masked=False`` groups, ``mask="none"``, rate 1) always
run the reference, i.e. ``torch.optim.SGD``'s (``torch.optim.AdamW``'s) own ops, so that masking
off is the torch optimizer bit for bit; so do AdamW's ``mask="scale"`` tensors (AdamW with
``lr * rate``, docs/algorithm.md §2.8).
Sharded (DTensor) tensors run the reference too: only it takes a global unit offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from ..functional import WATERFILL_MAX_ITER, ShardSpec, _compute_dtype, masked_adamw, masked_sgd
from ..modes import Mode

__all__ = [
    "GroupTensors", "AdamState", "Probes", "Backend", "backend_named", "effective_sampler", "prepare", "masked_sgd_step",
    "masked_adamw_step", "REFERENCE",
]

REFERENCE = "reference"  # what runs tensors with nothing to mask, and sharded tensors

Resolver = Callable[[str, torch.device, str], str]  # (requested, device, sampler) -> backend name


def effective_sampler(mask: str, sampler: str) -> str:
    """The sampler that matters for backend selection: ``mask="scale"`` samples nothing, so its
    ``sampler`` option is ignored (the fused kernels run it even with ``sampler="multinomial"``)."""
    return "poisson" if mask == "scale" else sampler


@dataclass
class AdamState:
    """The AdamW state of a group's tensors with a gradient, as local tensors (one entry per tensor):
    ``max_exp_avg_sqs`` entries are None without amsgrad; ``steps`` are the 0-d step tensors."""

    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Optional[Tensor]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)


@dataclass
class GroupTensors:
    """The tensors of one param group that have a gradient, as one step sees them.

    ``params`` are the group's parameters (DTensors for sharded ones) and ``local_params`` and
    ``grads`` their local tensors; ``keys`` the Philox keys of this step, ``shards`` where each local shard sits
    (None when the tensor is all here). ``options``: the param group (``lr``, ``mask``, ...);
    ``rate``: the keep rate of this step; ``mode``: the group's kernel mode. ``masked``: the group
    masks (a modality's group with ``masked=True`` and a mask other than ``"none"``); ``sparse``:
    masked at a rate below 1, i.e. something to sample or scale (otherwise the step is the torch
    optimizer's). ``kind``: ``"sgd"`` or ``"adamw"``, the update that runs. The optimizer fills the
    state: ``momentum_buffers`` (SGD: local tensors, None before the first step with momentum;
    :func:`masked_sgd_step` replaces them by the buffers it wrote) or ``adam`` (AdamW).
    :func:`prepare` fills ``backends``, ``prepared`` and ``prepared_groups`` (what a backend's
    group-level preparation leaves for its ``run``, by backend name).
    """

    options: Mapping[str, Any]
    params: list[Tensor]
    local_params: list[Tensor]
    grads: list[Tensor]
    keys: list[int]
    shards: list[Optional[ShardSpec]]
    rate: float
    mode: Mode
    masked: bool
    sparse: bool
    kind: str = "sgd"
    momentum_buffers: list[Optional[Tensor]] = field(default_factory=list)
    adam: Optional[AdamState] = None
    backends: list["Backend"] = field(default_factory=list)
    prepared: list[Optional[tuple[Tensor, Optional[Tensor]]]] = field(default_factory=list)
    prepared_groups: dict[str, Any] = field(default_factory=dict)

    def is_distributed(self, i: int) -> bool:
        """Whether tensor ``i`` is a DTensor (its local tensor is another object)."""
        return self.local_params[i] is not self.params[i]

    @property
    def backend_names(self) -> str:
        """The backends that ran, sorted and comma-separated ("" for a group without gradients)."""
        return ",".join(sorted({b.name for b in self.backends}))


@dataclass
class Probes:
    """What :func:`prepare` found out for the non-finite check.

    ``local``: 0-d float64 tensors, each covering one or more gradients (a group's, for the cpp
    backend and the multi-tensor norm), non-finite iff one of them holds NaN or Inf (or, for tensors
    sampled by importance, iff a square ``g**2`` overflows; or, a false alarm, iff a sum overflows);
    ``sharded``: the same for sharded tensors, per all-reduce function, to be summed over the shards
    (every rank holds them in the same order); ``scored``: ``(position among all gradients,
    gradient)`` of the tensors whose importance ``g**2`` is computed, for telling overflowing squares
    from NaN and Inf.
    """

    local: list[Tensor] = field(default_factory=list)
    sharded: dict[Callable, list[Tensor]] = field(default_factory=dict)
    scored: list[tuple[int, Tensor]] = field(default_factory=list)


# What Backend.prepare returns for a probe that prepare() computes, with the group's others, in one
# multi-tensor norm (_norm_probes).
DEFERRED = object()


def _minmax_probe(batch: GroupTensors, i: int) -> Tensor:
    """The probe of a shard: ``min(g) + max(g)`` in float64, NaN or +-Inf iff ``g`` has one
    (summed over the shards; every rank probes, also with an empty shard)."""
    g = batch.grads[i]
    low, high = torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(()))
    return low.double() + high.double()


def _norm_probes(batch: GroupTensors, idx: list[int]) -> list[Tensor]:
    """The probes of tensors ``idx`` (unsharded, non-empty): one 0-d float64 tensor per device and
    dtype, the largest of their 2-norms (``torch._foreach_norm``: one multi-tensor launch, not a
    reduction per tensor), computed in the compute dtype. NaN or Inf iff a gradient has one, or
    its norm overflows (a false alarm, which the optimizer's precise check clears). For tensors
    sampled by importance, also non-finite when a norm squared overflows, i.e. possibly some
    ``g**2`` (the precise check tells which)."""
    groups: dict[tuple, list[Tensor]] = {}
    for i in idx:
        g = batch.grads[i]
        groups.setdefault((g.device, g.dtype), []).append(g)
    squares = batch.sparse and batch.mode.sampled
    out = []
    for (_, dtype), grads in groups.items():
        compute = _compute_dtype(dtype)
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=None if compute == dtype else compute))
        probe = norms.double()
        if squares:
            probe = probe + (norms * norms * 0).double()
        out.append(probe.amax())
    return out


class Backend:
    """One implementation of the masked step: ``prepare`` one tensor, ``run`` a list of them."""

    name = ""

    def prepare(self, batch: GroupTensors, i: int) -> tuple[Optional[tuple], Any]:
        """``(prepared, probe)`` for tensor ``i``: what ``run`` may reuse, and its non-finite probe,
        or :data:`DEFERRED` for the default probe, which :func:`prepare` computes for all such
        tensors of the group at once."""
        return None, DEFERRED

    def prepare_group(self, batch: GroupTensors, idx: list[int]) -> Optional[tuple[list[Optional[tuple]], Tensor]]:
        """``(prepared per tensor of idx, one probe for them all)`` from one call for the tensors
        ``idx`` of the group (unsharded), or None (the default) to :meth:`prepare` them one by one."""
        return None

    def run(self, batch: GroupTensors, idx: list[int], bufs: list[Optional[Tensor]]) -> list[Union[Tensor, int]]:
        """Update tensors ``idx`` of ``batch`` (``bufs`` their momentum buffers, replaced in place
        by the ones written) and return their kept-unit counts."""
        raise NotImplementedError

    def run_adamw(self, batch: GroupTensors, idx: list[int]) -> list[Union[Tensor, int]]:
        """The lazy AdamW step (docs/algorithm.md §2.8) of tensors ``idx`` of ``batch``, in place
        (``batch.adam``; the caller has not incremented the steps); return the kept-unit counts."""
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The pure-PyTorch step of :func:`masked_optim.functional.masked_sgd` (every option, shards)."""

    name = REFERENCE

    def run(self, batch, idx, bufs):
        o = batch.options
        shards = [batch.shards[i] for i in idx]
        return masked_sgd(
            [batch.local_params[i] for i in idx],
            [batch.grads[i] for i in idx],
            bufs,
            [batch.keys[i] for i in idx],
            lr=o["lr"],
            momentum=o["momentum"],
            dampening=o["dampening"],
            weight_decay=o["weight_decay"],
            nesterov=o["nesterov"],
            maximize=o["maximize"],
            mask=o["mask"] if batch.sparse else "none",
            rate=batch.rate if batch.sparse else 1.0,
            granularity=o["granularity"],
            smoothing=o["smoothing"],
            sampler=o["sampler"],
            unbiased=o["unbiased"],
            max_iter=WATERFILL_MAX_ITER,
            shards=shards if any(s is not None for s in shards) else None,
            foreach=o.get("foreach"),
            fused=o.get("fused"),
        )

    def run_adamw(self, batch, idx):
        o, a = batch.options, batch.adam
        shards = [batch.shards[i] for i in idx]
        return masked_adamw(
            [batch.local_params[i] for i in idx],
            [batch.grads[i] for i in idx],
            [a.exp_avgs[i] for i in idx],
            [a.exp_avg_sqs[i] for i in idx],
            [a.max_exp_avg_sqs[i] for i in idx],
            [a.steps[i] for i in idx],
            [batch.keys[i] for i in idx],
            lr=o["lr"],
            beta1=o["betas"][0],
            beta2=o["betas"][1],
            eps=o["eps"],
            weight_decay=o["weight_decay"],
            amsgrad=o["amsgrad"],
            maximize=o["maximize"],
            mask=o["mask"] if batch.sparse else "none",
            rate=batch.rate if batch.sparse else 1.0,
            granularity=o["granularity"],
            smoothing=o["smoothing"],
            sampler=o["sampler"],
            unbiased=o["unbiased"],
            max_iter=WATERFILL_MAX_ITER,
            shards=shards if any(s is not None for s in shards) else None,
            foreach=o["foreach"],
            fused=o["fused"],
        )


def _step_buffer(param: Tensor, buf: Optional[Tensor], momentum: float) -> tuple[Tensor, bool]:
    """``(buffer, first_step)``: the momentum buffer a kernel writes for the contiguous ``param``, a
    new one on the first step, a contiguous copy of a strided one, or an empty tensor without momentum."""
    if momentum == 0:
        return param.new_empty(0), False
    if buf is None:
        return torch.empty_like(param, memory_format=torch.contiguous_format), True
    return (buf if buf.is_contiguous() else buf.contiguous()), False


class FusedBackend(Backend):
    """A per-tensor kernel with the contract of :mod:`masked_optim.backends` (cuda, triton)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._kernel: Optional[Callable] = None

    @property
    def kernel(self) -> Callable:
        if self._kernel is None:
            from . import kernel_for  # noqa: PLC0415  (triton is imported on first use only)

            self._kernel = kernel_for(self.name)
        return self._kernel

    def run(self, batch, idx, bufs):
        """One kernel call per tensor; non-contiguous tensors go through contiguous copies."""
        o = batch.options
        momentum, kernel = o["momentum"], self.kernel
        counts = []
        for j, i in enumerate(idx):
            p, g = batch.local_params[i], batch.grads[i]
            pc = p if p.is_contiguous() else p.contiguous()
            buf, first = _step_buffer(pc, bufs[j], momentum)
            if momentum != 0:
                bufs[j] = buf
            scalars, scores = batch.prepared[i] if batch.prepared and batch.prepared[i] is not None else (None, None)
            kept, _ = kernel(
                pc, g.contiguous(), buf, scores, scalars, batch.keys[i], float(batch.rate), float(o["smoothing"]),
                WATERFILL_MAX_ITER, int(batch.mode), o["granularity"] == "channel", float(o["lr"]), float(momentum),
                float(o["dampening"]), float(o["weight_decay"]), bool(o["nesterov"]), o["maximize"], first,
            )
            if pc is not p:
                p.copy_(pc)
            counts.append(kept)
        return counts

    @property
    def adamw_kernel(self) -> Callable:
        from . import adamw_kernel_for  # noqa: PLC0415

        return adamw_kernel_for(self.name)

    def run_adamw(self, batch, idx):
        """One kernel call per tensor (masked modes only: scale and dense tensors run the reference);
        non-contiguous tensors go through contiguous copies."""
        o, a, kernel = batch.options, batch.adam, self.adamw_kernel
        counts = []
        for i in idx:
            a.steps[i] += 1
            tensors = [batch.local_params[i], a.exp_avgs[i], a.exp_avg_sqs[i], a.max_exp_avg_sqs[i]]
            if tensors[3] is None:
                tensors[3] = tensors[0].new_empty(0)
            work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
            scalars, scores = batch.prepared[i] if batch.prepared and batch.prepared[i] is not None else (None, None)
            kept, _ = kernel(
                work[0], batch.grads[i].contiguous(), work[1], work[2], work[3], scores, scalars, batch.keys[i],
                float(batch.rate), float(o["smoothing"]), WATERFILL_MAX_ITER, int(batch.mode), o["granularity"] == "channel",
                float(o["lr"]), float(o["betas"][0]), float(o["betas"][1]), float(o["eps"]), float(o["weight_decay"]),
                float(a.steps[i]), bool(o["amsgrad"]), bool(o["maximize"]),
            )
            for t, w in zip(tensors, work):
                if w is not t:
                    t.copy_(w)
            counts.append(kept)
        return counts


def _has_cpu_kernel(op: str) -> bool:
    """Whether the loaded extension implements ``masked_optim::op`` on CPU (a build from before the op
    was added does not: the backend then calls the one-tensor ops)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"masked_optim::{op}", "CPU")


class CppBackend(FusedBackend):
    """The fused C++ op on CPU tensors, one call per param group and stage (the multi-tensor ops
    ``tensor_scalars_multi`` and ``masked_sgd_multi_``, as ``torch._foreach_*``). Stage 1 runs in
    :meth:`prepare_group`: its float64 sums of ``g**2`` give the probe (non-finite iff some ``g`` has
    NaN or Inf or a square overflows), and the update reuses its ``[alpha, beta]`` and scores.
    ``mask="scale"`` has no stage 1: the op then computes the sums of squares alone, the probe (one
    read of each gradient; an overflowing square is a false alarm, which the optimizer's precise check
    clears). It is cheaper than the default multi-tensor norm from 1M parameters up (2-core AMD EPYC,
    Zen 5, 15 tensors, 2026-12-05: 0.49 against 1.0 ms at 10M, 8.1 against 11.5 ms at 100M; 0.045
    against 0.028 ms at 0.1M, with one op call per tensor)."""

    _multi: Optional[bool] = None

    @classmethod
    def has_multi(cls) -> bool:
        if cls._multi is None:
            cls._multi = _has_cpu_kernel("tensor_scalars_multi") and _has_cpu_kernel("masked_sgd_multi_")
        return cls._multi

    def prepare(self, batch, i):
        o = batch.options
        scalars, scores, sumsq = torch.ops.masked_optim.tensor_scalars(
            batch.grads[i], float(batch.rate), float(o["smoothing"]), WATERFILL_MAX_ITER, int(batch.mode),
            o["granularity"] == "channel",
        )
        if not batch.mode.sampled:
            return None, sumsq
        return (scalars, scores if scores.numel() else None), sumsq

    def prepare_group(self, batch, idx):
        if not self.has_multi():
            return None
        o = batch.options
        scalars, scores, sumsq = torch.ops.masked_optim.tensor_scalars_multi(
            [batch.grads[i] for i in idx], float(batch.rate), float(o["smoothing"]), WATERFILL_MAX_ITER,
            int(batch.mode), o["granularity"] == "channel",
        )
        if not batch.mode.sampled:
            return [None] * len(idx), sumsq.sum()
        batch.prepared_groups[self.name] = (idx, scalars)
        prepared = [(row, sc if sc.numel() else None) for row, sc in zip(scalars.unbind(0), scores)]
        return prepared, sumsq.sum()

    def run(self, batch, idx, bufs):
        """One ``masked_sgd_multi_`` call for the tensors ``idx`` (non-contiguous ones through
        contiguous copies), with the scalars of :meth:`prepare_group` when it prepared the same tensors."""
        if not self.has_multi():
            return super().run(batch, idx, bufs)
        o = batch.options
        momentum = o["momentum"]
        params, grads, moms, firsts, copies = [], [], [], [], []
        for j, i in enumerate(idx):
            p = batch.local_params[i]
            pc = p if p.is_contiguous() else p.contiguous()
            if pc is not p:
                copies.append((p, pc))
            buf, first = _step_buffer(pc, bufs[j], momentum)
            if momentum != 0:
                bufs[j] = buf
            params.append(pc)
            grads.append(batch.grads[i].contiguous())
            moms.append(buf)
            firsts.append(first)
        group = batch.prepared_groups.get(self.name)
        scalars = group[1] if group is not None and group[0] == idx else None
        scores = [batch.prepared[i][1] if batch.prepared and batch.prepared[i] is not None else None for i in idx]
        kept = torch.ops.masked_optim.masked_sgd_multi_(
            params, grads, moms, scores, scalars, [batch.keys[i] for i in idx], float(batch.rate),
            float(o["smoothing"]), WATERFILL_MAX_ITER, int(batch.mode), o["granularity"] == "channel", float(o["lr"]),
            float(momentum), float(o["dampening"]), float(o["weight_decay"]), bool(o["nesterov"]), bool(o["maximize"]),
            firsts,
        )
        for p, pc in copies:
            p.copy_(pc)
        return kept.tolist()


_BACKENDS: dict[str, Backend] = {}


def backend_named(name: str) -> Backend:
    """The backend object of a name that :func:`~masked_optim.backends.resolve_backend` returns."""
    if name not in _BACKENDS:
        from . import FUSED  # noqa: PLC0415

        if name == REFERENCE:
            _BACKENDS[name] = ReferenceBackend()
        elif name == "cpp":
            _BACKENDS[name] = CppBackend(name)
        elif name in FUSED:
            _BACKENDS[name] = FusedBackend(name)
        else:
            raise ValueError(f"Invalid backend: {name!r}; allowed: one of {(REFERENCE,) + FUSED}")
    return _BACKENDS[name]


def _route(batch: GroupTensors, resolve: Resolver) -> None:
    """Pick each tensor's backend: the resolved one for a sparse, unsharded tensor, else the reference
    (also AdamW's ``scale`` tensors: torch's AdamW with ``lr * rate``)."""
    o = batch.options
    sampler = effective_sampler(o["mask"], o["sampler"])
    fused = batch.sparse and not (batch.kind == "adamw" and batch.mode is Mode.SCALE)
    batch.backends = [
        backend_named(resolve(o["backend"], p.device, sampler) if fused and not batch.is_distributed(i) else REFERENCE)
        for i, p in enumerate(batch.params)
    ]


def _by_backend(batch: GroupTensors, unsharded: bool = False) -> dict[Backend, list[int]]:
    """The positions of the group's tensors per backend, in order (``unsharded``: sharded ones left out)."""
    out: dict[Backend, list[int]] = {}
    for i, backend in enumerate(batch.backends):
        if not (unsharded and batch.shards[i] is not None):
            out.setdefault(backend, []).append(i)
    return out


def prepare(batches: list[GroupTensors], resolve: Resolver, check: bool) -> Probes:
    """Route every tensor of every group and, when ``check``, run each backend's preparation.

    ``resolve(requested, device, sampler)`` names the backend (the optimizer's cached
    :func:`~masked_optim.backends.resolve_backend`). Nothing is updated here. Groups and tensors are
    visited in order, so the sharded probes are in the same order on every rank.
    """
    probes = Probes()
    offset = 0  # position of the group's first gradient among all groups' gradients
    for batch in batches:
        _route(batch, resolve)
        batch.prepared = [None] * len(batch.params)
        batch.prepared_groups = {}
        deferred = []
        whole: set[int] = set()  # the tensors prepared by their backend's prepare_group
        if check:
            for backend, idx in _by_backend(batch, unsharded=True).items():
                done = backend.prepare_group(batch, idx)
                if done is not None:
                    for i, prepared in zip(idx, done[0]):
                        batch.prepared[i] = prepared
                    probes.local.append(done[1])
                    whole.update(idx)
        for i, backend in enumerate(batch.backends if check else ()):
            if i not in whole:
                batch.prepared[i], probe = backend.prepare(batch, i)
                if batch.shards[i] is not None:
                    probe = _minmax_probe(batch, i) if probe is DEFERRED else probe
                    probes.sharded.setdefault(batch.shards[i].all_reduce, []).append(probe)
                elif probe is DEFERRED:
                    if batch.grads[i].numel():
                        deferred.append(i)
                elif probe is not None:
                    probes.local.append(probe)
            if batch.sparse and batch.mode.sampled and batch.grads[i].numel():
                probes.scored.append((offset + i, batch.grads[i]))
        probes.local.extend(_norm_probes(batch, deferred))
        offset += len(batch.grads)
    return probes


def masked_sgd_step(batch: GroupTensors) -> list[Union[Tensor, int]]:
    """Run one group's step (after :func:`prepare`): each backend on its tensors, in place.

    Returns the kept-unit count of every tensor (0-d device tensors or ints, read lazily), and
    replaces ``batch.momentum_buffers`` entries by the buffers written (new or contiguous ones).
    """
    kept: list = [None] * len(batch.params)
    for backend, idx in _by_backend(batch).items():
        bufs = [batch.momentum_buffers[i] for i in idx]
        counts = backend.run(batch, idx, bufs)
        for j, i in enumerate(idx):
            kept[i] = counts[j]
            batch.momentum_buffers[i] = bufs[j]
    return kept


def masked_adamw_step(batch: GroupTensors) -> list[Union[Tensor, int]]:
    """Run one group's AdamW step (after :func:`prepare`): each backend on its tensors, in place
    (``batch.adam``, steps included). Returns the kept-unit count of every tensor."""
    kept: list = [None] * len(batch.params)
    for backend, idx in _by_backend(batch).items():
        for i, count in zip(idx, backend.run_adamw(batch, idx)):
            kept[i] = count
    return kept
