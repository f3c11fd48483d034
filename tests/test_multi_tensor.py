"""The cpp backend's multi-tensor ops (one call per param group) against its one-tensor ops.

``tensor_scalars_multi`` and ``masked_sgd_multi_`` run every tensor of a list through the loops of
``tensor_scalars`` and ``masked_sgd_``: one tensor per thread when the tensors balance the threads,
else one tensor after the other over every thread. Either way a tensor's results are those of its
one-tensor op at 1 thread or at every thread, bit for bit; these tests compare them so (the
parity of the one-tensor ops with the reference is tests/test_backends.py's).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from masked_optim import MaskedMultiModalSGD
from masked_optim.backends import backend_status
from masked_optim.backends.dispatch import CppBackend
from masked_optim.modes import Mode

CPU = torch.device("cpu")
OPS = torch.ops.masked_optim
MODES = [Mode.UNIFORM, Mode.UNIFORM_UNBIASED, Mode.AMSS, Mode.AMSS_PLUS, Mode.SCALE]
# Many tensors that balance two threads (one tensor per thread), of every dtype, channel shapes among
# them; sizes above the one-tensor ops' grain (32768 elements: split over threads on their own) and
# above the stage-1 pass that stores candidates (16384 elements).
BALANCED = [((300, 240), torch.float32), ((64, 32, 3, 3), torch.float32), ((61000,), torch.float64),
            ((250, 230), torch.bfloat16), ((480, 110), torch.float32), ((45001,), torch.float16),
            ((200, 200), torch.float32), ((150, 210), torch.float64)]
# One tensor too large to share: one tensor after the other, each over every thread.
UNBALANCED = [((700, 400), torch.float32), ((33, 3), torch.float32), ((4099,), torch.float64)]


def _require_cpp():
    reason = backend_status("cpp", CPU)
    if reason is not None:
        pytest.skip(f"cpp unavailable: {reason}")
    if not CppBackend.has_multi():
        pytest.fail("masked_optim._C loaded without its multi-tensor ops: rebuild it")


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensors(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in spec:
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(shape, generator=gen, dtype=torch.float64))
        out.append(g.to(dtype))
    return out


def _step_args(spec, seed, momentum):
    params = _tensors(spec, seed)
    grads = _tensors(spec, seed + 1)
    bufs = _tensors(spec, seed + 2) if momentum else [torch.empty(0, dtype=p.dtype) for p in params]
    keys = [1000 + 17 * i for i in range(len(spec))]
    firsts = [i % 3 == 0 for i in range(len(spec))]
    return params, grads, bufs, keys, firsts


def _one_tensor_steps(params, grads, bufs, keys, firsts, mode, channel, momentum, given):
    kept = []
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        scalars = None if given is None else given[i].to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        k, _ = OPS.masked_sgd_(p, g, b, None, scalars, keys[i], 0.4, 0.5, 30, int(mode), channel, 0.05, momentum, 0.1,
                               1e-2, False, mode == Mode.AMSS, firsts[i])
        kept.append(int(k))
    return kept


@pytest.mark.parametrize("spec,threads", [(BALANCED, 2), (BALANCED, 1), (UNBALANCED, 2)],
                         ids=["one-tensor-per-thread", "one-thread", "tensor-after-tensor"])
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_multi_ops_are_the_one_tensor_ops_bit_for_bit(mode, channel, spec, threads):
    _require_cpp()
    # the one-tensor ops at the thread count each tensor runs on: 1 when each tensor has a thread
    single_threads = 1 if spec is BALANCED else threads
    grads = _tensors(spec, 5)
    with _threads(threads):
        scalars, scores, sumsq = OPS.tensor_scalars_multi(grads, 0.4, 0.5, 30, int(mode), channel)
    assert scalars.shape == (len(spec), 2) and scalars.dtype == torch.float64
    assert sumsq.shape == (len(spec),) and sumsq.dtype == torch.float64 and len(scores) == len(spec)
    with _threads(single_threads):
        for i, g in enumerate(grads):
            s, sc, sq = OPS.tensor_scalars(g, 0.4, 0.5, 30, int(mode), channel)
            assert torch.equal(scalars[i], s.double()), (i, scalars[i], s)
            assert torch.equal(scores[i], sc) and torch.equal(sumsq[i], sq)
    # the update, with the scalars given and without (its own stage 1), with and without momentum
    for given, momentum in ((scalars, 0.9), (None, 0.0), (None, 0.9)):
        params, grads, bufs, keys, firsts = _step_args(spec, 11, momentum)
        ref = [t.clone() for t in params], [t.clone() for t in bufs]
        with _threads(threads):
            kept = OPS.masked_sgd_multi_(params, grads, bufs, [None] * len(spec), given, keys, 0.4, 0.5, 30, int(mode),
                                         channel, 0.05, momentum, 0.1, 1e-2, False, mode == Mode.AMSS, firsts)
        with _threads(single_threads):
            ref_kept = _one_tensor_steps(ref[0], grads, ref[1], keys, firsts, mode, channel, momentum, given)
        assert kept.dtype == torch.int64 and kept.tolist() == ref_kept
        for a, b in zip(params + bufs, ref[0] + ref[1]):
            assert torch.equal(a, b)


def test_multi_ops_take_the_given_scores_of_channel_granularity():
    _require_cpp()
    params, grads, bufs, keys, firsts = _step_args(BALANCED[:3], 3, 0.9)
    scalars, scores, _ = OPS.tensor_scalars_multi(grads, 0.3, 0.5, 30, int(Mode.AMSS_PLUS), True)
    # scores doubled: the kernel must use them (q_j = min(1, alpha s_j + beta)), not recompute them
    doubled = [s * 2 if s.numel() else None for s in scores]
    ref = [t.clone() for t in params], [t.clone() for t in bufs]
    OPS.masked_sgd_multi_(params, grads, bufs, doubled, scalars, keys, 0.3, 0.5, 30, int(Mode.AMSS_PLUS), True, 0.05,
                          0.9, 0.0, 0.0, False, False, firsts)
    for i in range(3):
        OPS.masked_sgd_(ref[0][i], grads[i], ref[1][i], doubled[i], scalars[i].to(torch.float64 if grads[i].dtype == torch.float64 else torch.float32),
                        keys[i], 0.3, 0.5, 30, int(Mode.AMSS_PLUS), True, 0.05, 0.9, 0.0, 0.0, False, False, firsts[i])
        assert torch.equal(params[i], ref[0][i]) and torch.equal(bufs[i], ref[1][i])
    undoubled = [t.clone() for t in ref[0]]
    OPS.masked_sgd_multi_(undoubled, grads, [t.clone() for t in bufs], [None] * 3, scalars, keys, 0.3, 0.5, 30,
                          int(Mode.AMSS_PLUS), True, 0.05, 0.9, 0.0, 0.0, False, False, firsts)
    assert not all(torch.equal(a, b) for a, b in zip(undoubled, params))  # the scores made a difference


def test_multi_ops_reject_bad_input_before_updating_anything():
    _require_cpp()
    params, grads, bufs, keys, firsts = _step_args(BALANCED[:3], 3, 0.9)
    before = [p.clone() for p in params]

    def step(**kw):
        args = dict(params=params, grads=grads, bufs=bufs, scores=[None] * 3, scalars=None, keys=keys, rate=0.4,
                    mode=int(Mode.AMSS), firsts=firsts)
        args.update(kw)
        OPS.masked_sgd_multi_(args["params"], args["grads"], args["bufs"], args["scores"], args["scalars"], args["keys"],
                              args["rate"], 0.5, 30, args["mode"], False, 0.05, 0.9, 0.0, 0.0, False, False,
                              args["firsts"])

    with pytest.raises(RuntimeError, match=r"masked_sgd_multi_: grads must have one entry per param \(3\), got 2"):
        step(grads=grads[:2])
    with pytest.raises(RuntimeError, match=r"keys must have one entry per param \(3\), got 4"):
        step(keys=keys + [5])
    with pytest.raises(RuntimeError, match=r"first_steps must have one entry per param \(3\), got 1"):
        step(firsts=[True])
    with pytest.raises(RuntimeError, match=r"scalars must be \[n, 2\] .*got \[3\]"):
        step(scalars=torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[2\] must be a contiguous tensor like params\[2\]"):
        step(bufs=bufs[:2] + [torch.zeros(3)])
    with pytest.raises(RuntimeError, match=r"grad must match param"):  # the last tensor's: checked before any update
        step(grads=grads[:2] + [grads[2][:5]])
    with pytest.raises(RuntimeError, match=r"rate must be in \(0, 1\], got 1.5"):
        step(rate=1.5)
    with pytest.raises(RuntimeError, match=r"mode must be in 0..5"):
        step(mode=9)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    with pytest.raises(RuntimeError, match=r"tensor_scalars_multi: mode must be in 1..5, got 0"):
        OPS.tensor_scalars_multi(grads, 0.4, 0.5, 30, 0, False)


def _optimizer_run(multi, mask, granularity, steps=3):
    """Three steps of a group of three tensors (one not contiguous, one without a gradient at the first
    step, so that the first steps differ within the group) on the cpp backend."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300, 200, generator=gen))
    b = torch.nn.Parameter(torch.randn(150, 300, generator=gen).t())  # a non-contiguous leaf
    c = torch.nn.Parameter(torch.randn(40000, generator=gen))
    opt = MaskedMultiModalSGD([{"params": [a, b, c], "modality": "m"}], lr=0.05, momentum=0.9, mask=mask,
                              granularity=granularity, backend="cpp")
    opt.set_rates({"m": 0.4})
    saved = CppBackend._multi
    CppBackend._multi = multi
    try:
        for step in range(steps):
            for p in (a, b, c):
                p.grad = None if (step == 0 and p is c) else torch.randn(p.shape, generator=gen)
            opt.step()
    finally:
        CppBackend._multi = saved
    return [a, b, c], [opt.state[p]["momentum_buffer"] for p in (a, b, c)], opt.last_step_stats()


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+", "scale"])
def test_optimizer_steps_the_same_with_and_without_the_multi_tensor_ops(mask, granularity):
    _require_cpp()
    with _threads(1):  # one thread: the one-tensor ops then round their sums as the multi-tensor ones
        params, bufs, stats = _optimizer_run(True, mask, granularity)
        ref_params, ref_bufs, ref_stats = _optimizer_run(False, mask, granularity)
    assert not params[1].is_contiguous()
    for x, y in zip(params + bufs, ref_params + ref_bufs):
        assert torch.equal(x, y)
    assert stats == ref_stats and stats.modalities["m"].backend == "cpp"
