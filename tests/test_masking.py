"""The masked gradient of docs/algorithm.md §2 (functional reference): water-filling, sampling statistics, bias.

Statistical tests use fixed keys and a 5-sigma bound from the central limit theorem: a correct
implementation fails one with probability below 1e-6 per comparison.
"""

import math

import pytest
import torch

from masked_optim.functional import (
    inclusion_scalars,
    masked_gradient,
    multinomial_keep_count,
    unit_scores,
)
from masked_optim.rng import derive_key, philox_uniform

SIGMA = 5.0


def heavy_tailed(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype) * torch.exp(2 * torch.randn(shape, generator=gen, dtype=dtype))


def q_of(grad, rate, granularity="element", smoothing=0.5, mask="amss"):
    scores = unit_scores(grad, granularity)
    if mask == "uniform":
        return torch.full_like(scores, rate)
    alpha, beta = inclusion_scalars(scores, rate, smoothing)
    return (scores * alpha + beta).clamp_max(1.0)


# ----------------------------------------------------------------------------- water-filling
def test_inclusion_probabilities_hand_computed():
    # s = [4, 1, 0, 0], rate 0.5, gamma 0.5: pi = [.8, .2, 0, 0], pt = [.525, .225, .125, .125];
    # c = 2 saturates unit 0 (2 * .525 >= 1); c = (2 - 1) / (.225 + .125 + .125) = 1 / .475.
    s = torch.tensor([4.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    alpha, beta = inclusion_scalars(s, 0.5, 0.5)
    q = (s * alpha + beta).clamp_max(1.0)
    c = 1 / 0.475
    expected = torch.tensor([1.0, c * 0.225, c * 0.125, c * 0.125], dtype=torch.float64)
    torch.testing.assert_close(q, expected, rtol=1e-12, atol=0)
    assert q.sum().item() == pytest.approx(2.0, abs=1e-12)


def test_no_saturation_uses_c_equal_budget_exactly():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # pt max = .5*.4 + .125 = .325
    alpha, beta = inclusion_scalars(s, 0.5, 0.5)  # c = 2, 2 * .325 < 1
    assert beta.item() == 2 * 0.5 / 4
    assert alpha.item() == 2 * 0.5 / 10


def test_zero_gradient_gives_uniform_rate():
    alpha, beta = inclusion_scalars(torch.zeros(10, dtype=torch.float64), 0.3, 0.5)
    assert alpha.item() == 0.0
    assert beta.item() == pytest.approx(0.3, abs=1e-15)


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("rate", [0.05, 0.3, 0.7, 0.95])
def test_water_filling_meets_budget_and_bounds(rate, granularity):
    g = heavy_tailed((20000, 8))
    q = q_of(g, rate, granularity)
    n = q.numel()
    assert q.sum().item() == pytest.approx(rate * n, rel=1e-6)
    assert q.max() <= 1
    assert q.min() >= rate * 0.5 - 1e-12  # q >= c * gamma / N >= rate * gamma: 1/q <= 1/(rate*gamma)


# ----------------------------------------------------------------------------- kept fraction
@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+"])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_kept_fraction_matches_rate(mask, granularity, rate):
    """Poisson sampling: E[kept] = sum q = rate * N, Var = sum q (1 - q)."""
    g = heavy_tailed((20000, 8) if granularity == "channel" else (400, 500), seed=1)
    q = q_of(g, rate, granularity, mask=mask)
    n = q.numel()
    _, kept = masked_gradient(g, rate=rate, key=derive_key(0, 0, 0), mask=mask, granularity=granularity)
    bound = SIGMA * math.sqrt((q * (1 - q)).sum().item())
    assert abs(kept.item() - rate * n) <= bound + 1e-6 * n


@pytest.mark.parametrize("rate,n", [(0.3, 10), (0.5, 7), (0.01, 5), (0.999, 1000), (0.25, 278011), (1e-9, 3)])
@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+"])
def test_multinomial_keeps_exactly_ceil(rate, n, mask):
    expected = {(0.3, 10): 3, (0.5, 7): 4, (0.01, 5): 1, (0.999, 1000): 999, (0.25, 278011): 69503, (1e-9, 3): 1}
    assert multinomial_keep_count(rate, n) == expected[(rate, n)]
    g = heavy_tailed(n, seed=n)
    g[: n // 2] = 0  # fewer positive weights than k must still give exactly k units
    _, kept = masked_gradient(g, rate=rate, key=derive_key(1, 2, 3), mask=mask, sampler="multinomial")
    assert kept.item() == expected[(rate, n)]


def test_multinomial_channel_keeps_whole_slices():
    g = heavy_tailed((50, 3, 3), seed=4)
    gm, kept = masked_gradient(g, rate=0.2, key=5, mask="amss", granularity="channel", sampler="multinomial")
    assert kept.item() == 10
    kept_slices = (gm.reshape(50, -1) != 0).any(1)
    assert kept_slices.sum().item() == 10
    assert torch.equal(gm[kept_slices], g[kept_slices])


def test_multinomial_amss_plus_uses_official_weights():
    g = heavy_tailed(64, seed=9)
    gm, _ = masked_gradient(g, rate=0.5, key=11, mask="amss+", sampler="multinomial")
    pi = g.square() / g.square().sum()
    keep = gm != 0
    torch.testing.assert_close(gm[keep], g[keep] / (pi[keep] + 1 / 64), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- expectations
def _mean_over_draws(g, draws, **kw):
    total = torch.zeros_like(g)
    hits = torch.zeros_like(g)
    for t in range(draws):
        gm, _ = masked_gradient(g, key=derive_key(123, t, 0), **kw)
        total += gm
        hits += gm != 0
    return total / draws, hits / draws


def _assert_mean_within_clt(mean, expected, var, draws):
    """Each unit within 5 sigma, and the normalised squared errors sum like a chi-square."""
    se = torch.sqrt(var / draws)
    exact = se == 0
    torch.testing.assert_close(mean[exact], expected[exact], rtol=1e-9, atol=1e-12)
    z = (mean[~exact] - expected[~exact]) / se[~exact]
    assert z.abs().max().item() < SIGMA, f"max |z| = {z.abs().max().item():.2f}"
    k = z.numel()
    assert abs(z.square().sum().item() - k) < SIGMA * math.sqrt(2 * k)


@pytest.mark.slow
@pytest.mark.parametrize("granularity,shape", [("element", (64,)), ("channel", (32, 3))])
def test_amss_plus_is_unbiased(granularity, shape):
    g = heavy_tailed(shape, seed=2)
    g.view(-1)[:4] = 0  # zero-importance units are never rescaled to infinity
    rate, draws = 0.3, 4000
    mean, _ = _mean_over_draws(g, draws, rate=rate, mask="amss+", granularity=granularity)
    q = q_of(g, rate, granularity).view(-1, *([1] * (g.dim() - 1)))
    var = g.square() * (1 / q - 1)
    _assert_mean_within_clt(mean, g, var, draws)


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["amss", "uniform"])
def test_biased_modes_shrink_expected_update_to_q_g(mask):
    g = heavy_tailed(64, seed=3)
    rate, draws = 0.4, 3000
    mean, _ = _mean_over_draws(g, draws, rate=rate, mask=mask)
    q = q_of(g, rate, mask=mask)
    _assert_mean_within_clt(mean, q * g, g.square() * q * (1 - q), draws)


@pytest.mark.slow
def test_uniform_unbiased_rescales_by_rate():
    g = heavy_tailed(64, seed=5)
    rate, draws = 0.25, 3000
    mean, hits = _mean_over_draws(g, draws, rate=rate, mask="uniform", unbiased=True)
    _assert_mean_within_clt(mean, g, g.square() * (1 / rate - 1), draws)
    gm, _ = masked_gradient(g, rate=rate, key=1, mask="uniform", unbiased=True)
    keep = gm != 0
    assert torch.equal(gm[keep], g[keep] / rate)


@pytest.mark.slow
def test_amss_keeps_important_units_more_often():
    g = torch.cat([torch.full((32,), 10.0), torch.full((32,), 0.1)]).double()
    rate, draws = 0.3, 2000
    _, freq = _mean_over_draws(g, draws, rate=rate, mask="amss")
    q = q_of(g, rate)
    assert (q[:32] > q[32:].max()).all()
    se = torch.sqrt(q * (1 - q) / draws)
    assert ((freq - q).abs() < SIGMA * se + 1e-12).all()
    gap_se = math.sqrt(se[0] ** 2 + se[-1] ** 2)
    assert freq[:32].mean() - freq[32:].mean() > SIGMA * gap_se


# ----------------------------------------------------------------------------- structure
def test_rate_one_and_mask_none_return_gradient_unchanged():
    g = heavy_tailed((7, 5), dtype=torch.float32)
    for mask in ["none", "uniform", "amss", "amss+"]:
        gm, kept = masked_gradient(g, rate=1.0 if mask != "none" else 0.3, key=1, mask=mask)
        assert torch.equal(gm, g) and kept == 35 and isinstance(kept, int)


def test_mask_is_a_function_of_key():
    g = heavy_tailed(1000, seed=8)
    a, _ = masked_gradient(g, rate=0.5, key=derive_key(0, 3, 1))
    b, _ = masked_gradient(g.clone(), rate=0.5, key=derive_key(0, 3, 1))
    c, _ = masked_gradient(g, rate=0.5, key=derive_key(0, 4, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)


def test_poisson_mask_is_uniform_below_q():
    """M_j = u_j < q_j with the Philox uniform of unit j."""
    g = heavy_tailed(4097, seed=6)
    key = derive_key(5, 6, 7)
    gm, _ = masked_gradient(g, rate=0.4, key=key, mask="amss")
    u = philox_uniform(key, 4097).double()
    assert torch.equal(gm != 0, u < q_of(g, 0.4))


@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+"])
def test_channel_mask_is_constant_per_slice(mask):
    g = heavy_tailed((40, 6, 5), seed=7) + 1e-3  # no exact zeros
    gm, kept = masked_gradient(g, rate=0.5, key=3, mask=mask, granularity="channel")
    nz = (gm != 0).reshape(40, -1)
    assert (nz.all(1) | (~nz).all(1)).all()
    assert kept.item() == nz.all(1).sum().item()


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), ()])
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_degenerate_shapes(shape, granularity):
    g = torch.ones(shape, dtype=torch.float32)
    gm, kept = masked_gradient(g, rate=0.5, key=1, granularity=granularity)
    assert gm.shape == g.shape and torch.isfinite(gm).all()
    units = (shape[0] if shape else 1) if granularity == "channel" else g.numel()
    assert 0 <= int(kept) <= units


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    g = heavy_tailed(1000, seed=1, dtype=torch.float32).to(dtype)
    gm, _ = masked_gradient(g, rate=0.5, key=9)
    assert gm.dtype == torch.float32
    ref, _ = masked_gradient(g.float(), rate=0.5, key=9)
    assert torch.equal(gm, ref)
