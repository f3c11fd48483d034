"""Every fused backend that can run here against the pure-PyTorch reference (docs/algorithm.md §2, §4).

Kernel-level parity: each step the kernel is fed the reference's per-tensor scalars
``[alpha, beta]`` (and, per channel, the reference's unit scores), so masks must be bit-identical;
parameters and momentum buffers must agree within the dtype tolerance table over 10 steps.
The scalars the kernel computes itself are compared with the reference's within the same table.
Mode 5 (``mask="scale"``) draws nothing: its kept count is every unit and its scalars are [0, 1].
"""

import os

import pytest
import torch

from masked_optim import MaskedMultiModalSGD
from masked_optim.backends import BackendUnavailable, backend_status, kernel_for, resolve_backend
from masked_optim.functional import _single_tensor_masked_sgd, inclusion_scalars, masked_gradient_given_scalars, unit_scores
from masked_optim.modes import Mode
from masked_optim.rng import derive_key
from tolerances import TOLERANCES, assert_close_normwise

CPU = torch.device("cpu")
FUSED = ["cpp", "triton"]
MODES = [m for m in Mode if m != Mode.DENSE]  # test_dense_mode_is_sgd covers Mode.DENSE
SHAPES = [(0,), (1,), (4097,), (278011,), (5, 123, 123), (64, 3, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STEPS = 10


def _require(backend):
    reason = backend_status(backend, CPU)
    if reason is not None:
        if backend == "cpp" and os.environ.get("MASKED_OPTIM_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the C++ extension is required here but unavailable: {reason}")
        pytest.skip(f"{backend} unavailable: {reason}")


def _reference_scalars(grad, rate, mode, granularity, maximize):
    g = -grad if maximize else grad
    scores = unit_scores(g, granularity)
    if mode == Mode.SCALE:  # scale: q = 1, nothing to compute
        return scores, torch.tensor([0.0, 1.0], dtype=scores.dtype)
    if not mode.importance:  # uniform: q = rate
        return scores, torch.tensor([0.0, rate], dtype=scores.dtype)
    alpha, beta = inclusion_scalars(scores, rate, 0.5)
    return scores, torch.stack([alpha, beta])


def _grad(shape, dtype, step):
    gen = torch.Generator().manual_seed(100 + step)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(shape, generator=gen, dtype=torch.float64))
    return g.to(dtype)


def _grid():
    """cpp: every mode x granularity x dtype x shape. triton runs in its ~4 ms-per-program
    interpreter here, so it gets the small shapes in fp32 and bf16; tests/test_triton_kernels.py
    covers its other dtypes and large shapes with large blocks."""
    for backend in FUSED:
        for mode in MODES:
            for granularity in ("element", "channel"):
                for dtype in DTYPES:
                    for shape in SHAPES:
                        if backend == "triton" and (torch.Size(shape).numel() > 4097 or dtype in (torch.float16, torch.float64)):
                            continue
                        name = f"{backend}-{mode.mask}{'-unbiased' if mode == Mode.UNIFORM_UNBIASED else ''}-{granularity}-{str(dtype).split('.')[1]}-{'x'.join(map(str, shape))}"
                        yield pytest.param(backend, mode, granularity, dtype, shape, id=name)


@pytest.mark.parametrize("backend,mode,granularity,dtype,shape", list(_grid()))
def test_kernel_matches_reference(backend, mode, granularity, dtype, shape):
    _require(backend)
    kernel = kernel_for(backend)
    mask, unbiased = mode.mask, mode.unbiased
    channel = granularity == "channel"
    gen = torch.Generator().manual_seed(1)
    p_ref = torch.randn(shape, generator=gen).to(dtype)
    p_ker = p_ref.clone()
    bufs = [None]
    b_ker = torch.empty_like(p_ker)
    momentum, dampening, nesterov, wd = (0.9, 0.0, True, 1e-2) if mode % 2 else (0.9, 0.1, False, 0.0)
    maximize = mode in (Mode.AMSS_PLUS, Mode.SCALE)
    for step in range(STEPS):
        rate = [0.3, 0.7, 0.05][step % 3]
        key = derive_key(7, step, 3)
        g = _grad(shape, dtype, step)
        scores, scalars = _reference_scalars(g, rate, mode, granularity, maximize)
        (ref_kept,) = _single_tensor_masked_sgd(
            [p_ref], [g], bufs, [key], lr=0.05, momentum=momentum, dampening=dampening, weight_decay=wd,
            nesterov=nesterov, maximize=maximize, mask=mask, rate=rate, granularity=granularity, smoothing=0.5,
            sampler="poisson", unbiased=unbiased, max_iter=4,
        )
        kept, out_scalars = kernel(
            p_ker, g, b_ker, scores if channel else None, scalars, key, rate, 0.5, 4, mode, channel,
            0.05, momentum, dampening, wd, nesterov, maximize, step == 0,
        )
        assert int(kept) == int(ref_kept), f"step {step}: kept {int(kept)} != reference {int(ref_kept)}"
        assert_close_normwise(p_ker, p_ref)
        assert_close_normwise(b_ker, bufs[0])
        # The scalars the kernel computes by itself, from its own reduction.
        if p_ref.numel():
            _, own = kernel(
                p_ker.clone(), g, b_ker.clone(), None, None, key, rate, 0.5, 4, mode, channel,
                0.05, momentum, dampening, wd, nesterov, maximize, False,
            )
            torch.testing.assert_close(own.to(scalars.dtype), scalars, **TOLERANCES[scalars.dtype])


@pytest.mark.parametrize("backend", FUSED)
def test_dense_mode_is_sgd(backend):
    _require(backend)
    kernel = kernel_for(backend)
    p = torch.randn(1000, dtype=torch.float64)
    g = torch.randn(1000, dtype=torch.float64)
    b = torch.empty_like(p)
    ref = p.clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for step in range(3):
        kept, _ = kernel(p, g, b, None, None, 1, 1.0, 0.5, 4, Mode.DENSE, False, 0.1, 0.9, 0.0, 1e-3, True, False, step == 0)
        ref.grad = g
        opt.step()
        assert int(kept) == 1000
    torch.testing.assert_close(p, ref.detach(), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mask", ["amss", "amss+", "uniform", "scale"])
def test_optimizer_on_fused_backend_matches_reference_backend(backend, mask):
    """Through the optimizer, non-contiguous and zero-size parameters included, 10 steps."""
    _require(backend)

    def build(name):
        gen = torch.Generator().manual_seed(0)
        ps = [
            torch.randn(7, 5, generator=gen).t().requires_grad_(),  # non-contiguous leaf
            torch.randn(0, 4, generator=gen).requires_grad_(),
            torch.randn(33, generator=gen).requires_grad_(),
            torch.randn(6, 2, 3, generator=gen).requires_grad_(),
        ]
        opt = MaskedMultiModalSGD([{"params": ps, "modality": "m"}], lr=0.1, momentum=0.9, weight_decay=1e-3,
                                  mask=mask, granularity="channel" if mask in ("amss", "scale") else "element",
                                  backend=name)
        return ps, opt

    ps_ref, opt_ref = build("reference")
    ps_ker, opt_ker = build(backend)
    assert not ps_ker[0].is_contiguous()
    for step in range(STEPS):
        for a, b in zip(ps_ref, ps_ker):
            a.grad = _grad(a.shape, torch.float32, step)
            b.grad = a.grad.clone()
        opt_ref.step(rates={"m": 0.4})
        opt_ker.step(rates={"m": 0.4})
        assert opt_ker.last_step_stats()["m"].backend == backend
        assert opt_ker.last_step_stats()["m"].kept_units == opt_ref.last_step_stats()["m"].kept_units
    for a, b in zip(ps_ref, ps_ker):
        torch.testing.assert_close(b, a, **TOLERANCES[torch.float32])
        torch.testing.assert_close(opt_ker.state[b]["momentum_buffer"], opt_ref.state[a]["momentum_buffer"], **TOLERANCES[torch.float32])


def test_auto_prefers_cpp_on_cpu_when_built():
    expected = "cpp" if backend_status("cpp", CPU) is None else "reference"
    assert resolve_backend("auto", CPU) == expected


def test_explicit_unavailable_backends_raise_with_reason():
    with pytest.raises(BackendUnavailable, match=r"backend='cuda' is unavailable: the cuda backend runs on CUDA tensors, got cpu tensors"):
        MaskedMultiModalSGD([torch.zeros(2, requires_grad=True)], backend="cuda")
    with pytest.raises(BackendUnavailable, match=r"cannot run sampler='multinomial'"):
        MaskedMultiModalSGD([torch.zeros(2, requires_grad=True)], backend="cpp", sampler="multinomial", mask="amss+")
    assert resolve_backend("auto", CPU, sampler="multinomial") == "reference"


def test_kernel_rejects_bad_input():
    _require("cpp")
    k = kernel_for("cpp")
    p = torch.zeros(4)
    with pytest.raises(RuntimeError, match="grad must match param"):
        k(p, torch.zeros(5), p.new_empty(0), None, None, 1, 0.5, 0.5, 4, Mode.AMSS, False, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"mode must be in 0\.\.5"):
        k(p, torch.zeros(4), p.new_empty(0), None, None, 1, 0.5, 0.5, 4, len(Mode) + 1, False, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="momentum_buffer must be a contiguous tensor like param"):
        k(p, torch.zeros(4), p.new_empty(0), None, None, 1, 0.5, 0.5, 4, Mode.AMSS, False, 0.1, 0.9, 0.0, 0.0, False, False, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", [Mode.UNIFORM, Mode.UNIFORM_UNBIASED, Mode.AMSS, Mode.AMSS_PLUS], ids=lambda m: m.name)
@pytest.mark.parametrize(
    "scalars", [(0.0, 0.5), (0.0, 1.0), (0.0, 0.0), (0.0, -0.0), (-1.0, 0.2), (float("nan"), 0.5), (1e30, 0.0), (2.0, 3.0)],
    ids=["half", "one", "zero", "minus-zero", "negative", "nan", "huge", "above-one"],
)
def test_element_keep_decision_at_edge_probabilities(scalars, mode, dtype):
    """The cpp element loop decides ``u < q`` on bit patterns (csrc/cpu/masked_sgd_cpu.cpp,
    KeepBits): q = 0, -0, negative or NaN must keep nothing, q >= 1 everything, and every other
    unit exactly as the reference (gradients with zeros, infinities and NaN included)."""
    _require("cpp")
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(5000, generator=gen, dtype=torch.float64)
    g[::97] = 0.0
    g[1::389], g[2::391] = float("inf"), float("nan")
    g = g.to(dtype)
    key, rate = derive_key(3, 1, 2), 0.4
    sc = torch.tensor(scalars, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ref, ref_kept = masked_gradient_given_scalars(g, rate=rate, key=key, mask=mode.mask, scalars=sc, unbiased=mode.unbiased)
    p = torch.zeros_like(g)
    kept, _ = kernel_for("cpp")(
        p, g, p.new_empty(0), None, sc, key, rate, 0.5, 4, mode, False, 1.0, 0.0, 0.0, 0.0, False, False, False,
    )
    assert int(kept) == int(ref_kept)
    torch.testing.assert_close((-p).to(ref.dtype), ref.to(dtype).to(ref.dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("mode", [Mode.UNIFORM, Mode.AMSS, Mode.AMSS_PLUS, Mode.SCALE], ids=lambda m: m.mask)
def test_tensor_scalars_is_the_fused_stage_one(mode, granularity):
    """The cpp backend's preparation (backends.dispatch.CppBackend.prepare): the same [alpha, beta] the fused step computes, and the sum of g^2."""
    _require("cpp")
    channel = granularity == "channel"
    g = _grad((300, 41), torch.float32, 0)
    scalars, scores, sumsq = torch.ops.masked_optim.tensor_scalars(g, 0.4, 0.5, 4, mode, channel)
    _, own = kernel_for("cpp")(torch.zeros_like(g), g, g.new_empty(0), None, None, 1, 0.4, 0.5, 4, mode, channel,
                               0.1, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(scalars, own)
    torch.testing.assert_close(sumsq, g.double().square().sum(), rtol=1e-6, atol=0)
    if mode == Mode.SCALE:  # scale has no stage 1
        assert torch.equal(scalars, torch.tensor([0.0, 1.0])) and scores.numel() == 0
    elif channel:
        torch.testing.assert_close(scores, unit_scores(g, "channel"), **TOLERANCES[torch.float32])
    else:
        assert scores.numel() == 0


def _adversarial_grad(kind: str, n: int = 200_000) -> torch.Tensor:
    """Gradients that defeat the cpp stage 1's sampled guess of where the water-filling thresholds
    lie (64 evenly spaced runs of n / 4096 elements, between 16 and 256, a multiple of 16), so that its
    fallbacks run."""
    g = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.1
    in_sample = torch.zeros(n, dtype=torch.bool)
    stride, run = n // 64, min(256, max(16, n // 4096)) // 16 * 16
    for r in range(64):
        in_sample[r * stride : r * stride + run] = True
    if kind == "big-in-sample":  # the sample overestimates the sum: candidates collected again
        g[in_sample] *= 300
    elif kind == "big-outside-sample":  # it underestimates it: units counted as saturated are not
        g[~in_sample] *= 300
    elif kind == "sparse":  # 1% non-zero, none of them in the sample
        keep = (torch.arange(n) % 100 == 7) & ~in_sample
        g = torch.where(keep, g * 50, torch.zeros_like(g))
    return g


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["gaussian", "big-in-sample", "big-outside-sample", "sparse"])
def test_stage_one_is_exact_when_its_sampled_guess_is_wrong(kind, rate):
    """The cpp stage 1 guesses the saturation threshold from a sample of the gradient, stores the
    units above it in the same pass as the sum, and checks the guess against the true sum: a wrong
    guess costs passes, never accuracy. Its [alpha, beta] must match the reference's."""
    _require("cpp")
    g = _adversarial_grad(kind)
    mode = Mode.AMSS_PLUS
    scalars, _, sumsq = torch.ops.masked_optim.tensor_scalars(g, rate, 0.5, 4, mode, False)
    alpha, beta = inclusion_scalars(unit_scores(g, "element"), rate, 0.5)
    torch.testing.assert_close(scalars, torch.stack([alpha, beta]), **TOLERANCES[torch.float32])
    # The sum of squares (the non-finite probe) is accumulated in float32 lanes.
    torch.testing.assert_close(sumsq, g.double().square().sum(), rtol=TOLERANCES[torch.float32]["rtol"], atol=0)
    assert 0 < float(beta) and float(alpha) > 0


@pytest.mark.parametrize("rate", [0.3, 0.7])
def test_stage_one_sums_of_large_tensors_are_accurate(rate):
    """The float32 lanes of the cpp stage-1 sums are flushed to float64 every 4096 values: kept for a
    whole thread's range (4M values here), they lost the small terms, and [alpha, beta] of an 8M
    Gaussian gradient was 1.5e-5 off (float32's tolerance here is 1e-5) while the reference's float32
    result is 1e-7 from the float64 one."""
    _require("cpp")
    g = torch.randn(8_000_000, generator=torch.Generator().manual_seed(0))
    scalars, _, sumsq = torch.ops.masked_optim.tensor_scalars(g, rate, 0.5, 30, Mode.AMSS_PLUS, False)
    exact = torch.stack(inclusion_scalars(unit_scores(g.double(), "element"), rate, 0.5))
    torch.testing.assert_close(scalars.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(sumsq, g.double().square().sum(), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_stage_one_rounds_that_alternate_end_where_all_rounds_would():
    """In float32 the water-filling rounds of a large tensor can alternate between two values of c
    (here 30M Gaussian units at rate 0.7 on the AVX-512 path, from round 5 on). The cpp stage 1 then
    stops and takes the value the last round would give, by parity: the [alpha, beta] after k rounds
    must go on alternating exactly as the rounds it ran do, for every k, and match the reference's."""
    _require("cpp")
    g = torch.randn(30_000_000, generator=torch.Generator().manual_seed(0))
    rate, mode = 0.7, Mode.AMSS_PLUS
    seq = [torch.ops.masked_optim.tensor_scalars(g, rate, 0.5, k, mode, False)[0] for k in range(0, 13)]  # k rounds
    alphas = [float(s[0]) for s in seq]
    # The first k whose value is that of k - 2 ran all its rounds (the stop needs a round after it).
    first = next((k for k in range(2, len(seq)) if torch.equal(seq[k], seq[k - 2])), None)
    if first is None or len(set(alphas[first:])) != 2:  # the float32 sums of other CPU paths may converge instead
        pytest.skip(f"the rounds do not alternate on this CPU path, so there is nothing to check: {alphas}")
    for k in range(first, len(seq)):  # rounds k and k - 2 end on the same value, and k - 1 on the other
        assert torch.equal(seq[k], seq[k - 2]) and not torch.equal(seq[k], seq[k - 1]), (k, alphas)
    alpha, beta = inclusion_scalars(unit_scores(g, "element"), rate, 0.5, max_iter=12)
    torch.testing.assert_close(seq[-1], torch.stack([alpha, beta]), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("mask", ["amss+", "scale"])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_large_finite_gradients_are_not_mistaken_for_non_finite(backend, mask):
    """The cheap check (a sum of g^2, or min + max) overflows; the precise check clears the alarm.

    With importance sampling the squares themselves must stay finite (a g whose square overflows is
    refused: tests/test_properties.py), so amss+ gets 1e154 (g^2 = 1e308, their sum overflows) and
    scale, which needs no importance, 1.7e308 (min + max overflows too)."""
    _require(backend)
    p = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
    opt = MaskedMultiModalSGD([{"params": [p], "modality": "m"}], lr=1e-300, backend=backend, mask=mask)
    p.grad = torch.full((1000,), 1e154 if mask == "amss+" else 1.7e308, dtype=torch.float64)
    opt.step(rates={"m": 0.5})
    assert not opt.last_step_stats().skipped and torch.isfinite(p).all()
