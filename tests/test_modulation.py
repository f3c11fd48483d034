"""OGMGE (docs/algorithm.md §6) against hand-computed coefficients, exact gradient scaling and noise statistics."""

import io
import math

import pytest
import torch
from torch import nn

from masked_optim.experiments.modulation import ModulationStats, OGMGE

NEG = -1e4  # exp(NEG - 0) underflows to exactly 0 in float64: those classes get probability 0


def logits_with_p(labels, num_classes, ties):
    """(B, K) logits giving the true class probability exactly 1/ties: the true class and
    ties - 1 other classes at 0, the rest at NEG."""
    out = torch.full((len(labels), num_classes), NEG)
    for i, y in enumerate(labels):
        cols = [y] + [c for c in range(num_classes) if c != y][: ties - 1]
        out[i, cols] = 0.0
    return out


def encoders():
    torch.manual_seed(1)
    audio = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 5))
    video = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5))
    return {"audio": audio, "video": video}


def fill_grads(mods, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in mods.values():
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.1 + 0.01
    return {m: [p.grad.clone() for p in mod.parameters()] for m, mod in mods.items()}


LABELS = torch.tensor([0, 1, 2, 3])


def audio_dominant():
    # s_a = 4 * 1/2 = 2, s_v = 4 * 1/4 = 1: ratio_a = 2 exactly.
    return {"audio": logits_with_p(LABELS, 4, 2), "video": logits_with_p(LABELS, 4, 4)}


# ---------------------------------------------------------------------------------- coefficients


def test_two_modalities_hand_computed():
    mods = encoders()
    ogm = OGMGE(mods, alpha=0.8)
    k = ogm.coefficients(audio_dominant(), LABELS)
    assert k == {"audio": pytest.approx(1 - math.tanh(1.6), rel=1e-15), "video": 1.0}
    assert all(type(v) is float for v in k.values())
    # Swapped: video dominates with the same ratio.
    logits = audio_dominant()
    k = ogm.coefficients({"audio": logits["video"], "video": logits["audio"]}, LABELS)
    assert k == {"audio": 1.0, "video": pytest.approx(1 - math.tanh(1.6), rel=1e-15)}
    # alpha enters as tanh(alpha * ratio).
    k = OGMGE(mods, alpha=0.25).coefficients(audio_dominant(), LABELS)
    assert k["audio"] == pytest.approx(1 - math.tanh(0.5), rel=1e-15)


def test_coefficients_do_not_touch_grads_or_last():
    mods = encoders()
    before = fill_grads(mods)
    ogm = OGMGE(mods)
    ogm.coefficients(audio_dominant(), LABELS)
    assert ogm.last is None
    for m, mod in mods.items():
        assert all(torch.equal(p.grad, g) for p, g in zip(mod.parameters(), before[m]))


def test_three_modalities_hand_computed():
    a, v, t = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
    ogm = OGMGE({"a": a, "v": v, "t": t}, alpha=0.8)
    # s = (2, 1, 1): rho_a = 2 / ((1 + 1) / 2) = 2; rho_v = rho_t = 1 / ((2 + 1) / 2) = 2/3.
    logits = {"a": logits_with_p(LABELS, 4, 2), "v": logits_with_p(LABELS, 4, 4), "t": logits_with_p(LABELS, 4, 4)}
    k = ogm.coefficients(logits, LABELS)
    assert k == {"a": pytest.approx(1 - math.tanh(1.6), rel=1e-15), "v": 1.0, "t": 1.0}
    # Two dominant modalities: s = (2, 2, 0.5) with K = 8: rho_a = rho_v = 2 / 1.25 = 1.6, rho_t = 0.25.
    logits = {"a": logits_with_p(LABELS, 8, 2), "v": logits_with_p(LABELS, 8, 2), "t": logits_with_p(LABELS, 8, 8)}
    k = ogm.coefficients(logits, LABELS)
    assert k == {"a": pytest.approx(1 - math.tanh(0.8 * 1.6), rel=1e-15),
                 "v": pytest.approx(1 - math.tanh(0.8 * 1.6), rel=1e-15), "t": 1.0}
    ogm.apply(logits, LABELS, epoch=0)
    assert ogm.last.scores == pytest.approx({"a": 2.0, "v": 2.0, "t": 0.5}, rel=1e-15)
    assert ogm.last.ratios == pytest.approx({"a": 1.6, "v": 1.6, "t": 0.25}, rel=1e-15)


def official_two_modality(out_a, out_v, labels, alpha):
    """The authors' rule (GeWu-Lab/OGM-GE_CVPR2022 main.py), written independently in float64."""
    sm = lambda o: torch.softmax(o.double(), 1)  # noqa: E731
    score_a = sum(float(sm(out_a)[i][labels[i]]) for i in range(len(labels)))
    score_v = sum(float(sm(out_v)[i][labels[i]]) for i in range(len(labels)))
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return {"audio": 1.0, "video": 1 - math.tanh(alpha * ratio_v)}
    return {"audio": 1 - math.tanh(alpha * ratio_a), "video": 1.0}


def test_general_rule_reduces_to_the_two_modality_rule():
    ogm = OGMGE(encoders(), alpha=0.8)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        labels = torch.randint(0, 6, (16,), generator=g)
        out_a, out_v = torch.randn(16, 6, generator=g) * 2, torch.randn(16, 6, generator=g) * 2
        got = ogm.coefficients({"audio": out_a, "video": out_v}, labels)
        want = official_two_modality(out_a, out_v, labels, 0.8)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert min(got.values()) < 1.0 and max(got.values()) == 1.0


def test_jump_at_ratio_one():
    ogm = OGMGE(encoders(), alpha=0.8)
    labels = torch.tensor([0])
    video = torch.zeros(1, 2)  # p = 1/2
    below = ogm.coefficients({"audio": torch.tensor([[-1e-6, 0.0]]), "video": video}, labels)
    at = ogm.coefficients({"audio": torch.zeros(1, 2), "video": video}, labels)
    above = ogm.coefficients({"audio": torch.tensor([[1e-6, 0.0]]), "video": video}, labels)
    assert at == {"audio": 1.0, "video": 1.0}
    assert above["video"] == 1.0 and below["audio"] == 1.0
    # Just above 1 the dominant modality drops from 1 to just below 1 - tanh(alpha) = 0.336...
    assert 1 - math.tanh(0.8) - 1e-5 < above["audio"] < 1 - math.tanh(0.8)
    assert 1 - math.tanh(0.8) - 1e-5 < below["video"] < 1 - math.tanh(0.8)


@pytest.mark.parametrize("case", ["zero_score", "nan", "inf"])
def test_unusable_scores_give_all_ones(case):
    mods = encoders()
    before = fill_grads(mods)
    labels = torch.tensor([0, 0])
    audio = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    if case == "zero_score":  # p_true = exp(-1e4) = 0 for every sample of video
        video = torch.tensor([[NEG, 0.0], [NEG, 0.0]])
    else:
        video = torch.tensor([[float(case), 0.0], [0.0, 0.0]])
    ogm = OGMGE(mods, noise=True)
    assert ogm.coefficients({"audio": audio, "video": video}, labels) == {"audio": 1.0, "video": 1.0}
    assert ogm.apply({"audio": audio, "video": video}, labels, epoch=0) == {"audio": 1.0, "video": 1.0}
    assert all(math.isnan(r) for r in ogm.last.ratios.values())
    for m, mod in mods.items():
        assert all(torch.equal(p.grad, g) for p, g in zip(mod.parameters(), before[m]))


# ------------------------------------------------------------------------------------- gradients


def test_ogm_scales_weights_exactly_and_nothing_else():
    mods = encoders()
    before = fill_grads(mods)
    ogm = OGMGE(mods, noise=False)
    k = ogm.apply(audio_dominant(), LABELS, epoch=0)
    assert k["video"] == 1.0 and k["audio"] < 1.0
    assert ogm.last == ModulationStats(
        coefficients=k, scores={"audio": 2.0, "video": 1.0}, active=True, ratios={"audio": 2.0, "video": 0.5}
    )
    scaled = 0
    for p, g in zip(mods["audio"].parameters(), before["audio"]):
        if p.dim() >= 2:
            assert torch.equal(p.grad, k["audio"] * g)
            scaled += 1
        else:  # biases and LayerNorm scale / shift
            assert torch.equal(p.grad, g)
    assert scaled == 2
    for p, g in zip(mods["video"].parameters(), before["video"]):
        assert torch.equal(p.grad, g)


def test_none_grads_and_frozen_params_are_skipped():
    mods = encoders()
    before = fill_grads(mods)
    first = mods["audio"][0]
    first.weight.grad = None
    last = mods["audio"][2]
    last.weight.requires_grad_(False)
    ogm = OGMGE(mods, noise=True)
    assert all(p is not last.weight for p in ogm.weights["audio"])
    ogm.apply(audio_dominant(), LABELS, epoch=0)
    assert first.weight.grad is None
    assert torch.equal(last.weight.grad, before["audio"][4])


@pytest.mark.parametrize("noise", [False, True])
def test_window(noise):
    mods = encoders()
    ogm = OGMGE(mods, start=2, end=4, noise=noise)
    for epoch, active in [(0, False), (1, False), (2, True), (3, True), (4, False), (10, False)]:
        before = fill_grads(mods, seed=epoch)
        k = ogm.apply(audio_dominant(), LABELS, epoch=epoch)
        assert ogm.last.active is active
        assert ogm.last.scores == {"audio": 2.0, "video": 1.0}  # reported either way
        w, g = mods["audio"][0].weight, before["audio"][0]
        if active:
            assert k["audio"] < 1.0 and not torch.equal(w.grad, g)
        else:
            assert k == {"audio": 1.0, "video": 1.0}
            for m, mod in mods.items():
                assert all(torch.equal(p.grad, b) for p, b in zip(mod.parameters(), before[m]))
    forever = OGMGE(mods, start=3)
    assert not forever.active(2) and forever.active(3) and forever.active(10**6)


def test_noise_has_the_std_of_the_unscaled_gradient():
    enc_a, enc_v = nn.Linear(500, 400), nn.Linear(3, 3)
    g = torch.Generator().manual_seed(7)
    enc_a.weight.grad = torch.randn(400, 500, generator=g) * 2.0 + 0.3  # 200k elements, std ~2
    enc_a.bias.grad = torch.randn(400, generator=g)
    for p in enc_v.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    grad, bias, vgrads = enc_a.weight.grad.clone(), enc_a.bias.grad.clone(), [p.grad.clone() for p in enc_v.parameters()]
    ogm = OGMGE({"audio": enc_a, "video": enc_v}, alpha=0.8, noise=True, seed=123)
    k = ogm.apply(audio_dominant(), LABELS, epoch=0)["audio"]
    eps = (enc_a.weight.grad.double() - (k * grad).double()).reshape(-1)
    n = eps.numel()
    sigma = grad.double().std().item()
    # The sample std of n normal draws has standard error ~ sigma / sqrt(2n) (= 0.16% here), the
    # sample mean sigma / sqrt(n), the correlation with an independent tensor 1 / sqrt(n).
    assert abs(eps.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n)
    assert abs(eps.mean().item()) < 5 * sigma / math.sqrt(n)
    centred = grad.double().reshape(-1) - grad.double().mean()
    corr = (eps - eps.mean()) @ centred / (eps.std() * centred.std() * (n - 1))
    assert abs(corr.item()) < 5 / math.sqrt(n)
    # The scaled std k * sigma (a plausible bug) is far outside that band.
    assert abs(k * sigma - sigma) > 50 * sigma / math.sqrt(2 * n)
    assert torch.equal(enc_a.bias.grad, bias)
    assert all(torch.equal(p.grad, v) for p, v in zip(enc_v.parameters(), vgrads))


def test_one_element_weight_gets_no_noise():
    enc_a, enc_v = nn.Linear(1, 1, bias=False), nn.Linear(2, 2)
    enc_a.weight.grad = torch.tensor([[0.5]])
    for p in enc_v.parameters():
        p.grad = torch.ones_like(p)
    ogm = OGMGE({"audio": enc_a, "video": enc_v}, noise=True)
    k = ogm.apply(audio_dominant(), LABELS, epoch=0)["audio"]
    assert torch.equal(enc_a.weight.grad, torch.tensor([[0.5]]) * k)


def test_half_precision_grads_keep_their_dtype():
    mods = {"audio": nn.Linear(50, 40).half(), "video": nn.Linear(3, 3).half()}
    for m in mods.values():
        for p in m.parameters():
            p.grad = torch.randn(p.shape).half()
    OGMGE(mods, noise=True).apply(audio_dominant(), LABELS, epoch=0)
    assert mods["audio"].weight.grad.dtype == torch.float16
    assert torch.isfinite(mods["audio"].weight.grad).all()


def run_steps(ogm, mods, steps, first_seed=0):
    out = []
    for t in range(steps):
        fill_grads(mods, seed=first_seed + t)
        ogm.apply(audio_dominant(), LABELS, epoch=0)
        out.append([p.grad.clone() for p in mods["audio"].parameters()])
    return out


def test_reproducible_and_independent_of_global_rng():
    mods = encoders()
    rng = torch.get_rng_state()
    a = run_steps(OGMGE(mods, seed=5), mods, 3)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(999)
    b = run_steps(OGMGE(mods, seed=5), mods, 3)
    c = run_steps(OGMGE(mods, seed=6), mods, 3)
    assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[1][0])  # the generator advances


def test_state_dict_round_trip_resumes_exactly():
    mods = encoders()
    uninterrupted = run_steps(OGMGE(mods, seed=11), mods, 4)
    first = OGMGE(mods, seed=11)
    run_steps(first, mods, 2)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = OGMGE(mods, seed=0)  # the seed comes from the state
    resumed.load_state_dict(torch.load(buf))
    assert resumed.seed == 11
    tail = run_steps(resumed, mods, 2, first_seed=2)
    assert all(torch.equal(x, y) for sa, sb in zip(uninterrupted[2:], tail) for x, y in zip(sa, sb))
    # A fresh state (no generator used yet) restarts from the seed.
    fresh = OGMGE(mods, seed=11)
    fresh.load_state_dict(OGMGE(mods, seed=11).state_dict())
    again = run_steps(fresh, mods, 1)
    assert all(torch.equal(x, y) for x, y in zip(uninterrupted[0], again[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grads_use_a_cuda_generator_and_resume():
    mods = {m: e.cuda() for m, e in encoders().items()}
    logits = {m: o.cuda() for m, o in audio_dominant().items()}
    labels = LABELS.cuda()

    def steps(ogm, n, start=0):
        out = []
        for t in range(n):
            g = torch.Generator().manual_seed(start + t)
            for mod in mods.values():
                for p in mod.parameters():
                    p.grad = torch.randn(p.shape, generator=g).cuda()
            ogm.apply(logits, labels, epoch=0)
            out.append(mods["audio"][0].weight.grad.clone())
        return out

    full = steps(OGMGE(mods, seed=3), 3)
    part = OGMGE(mods, seed=3)
    steps(part, 1)
    assert any(k.startswith("cuda") for k in part.state_dict()["generators"])
    resumed = OGMGE(mods, seed=3)
    resumed.load_state_dict(part.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(full[1:], steps(resumed, 2, start=1)))


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(alpha=0), ValueError, r"Invalid alpha: 0; allowed: a finite number > 0"),
        (dict(alpha=-1.0), ValueError, r"Invalid alpha: -1.0"),
        (dict(alpha=float("nan")), ValueError, r"Invalid alpha: nan"),
        (dict(alpha=float("inf")), ValueError, r"Invalid alpha: inf"),
        (dict(alpha="0.8"), TypeError, r"Invalid alpha: '0.8'"),
        (dict(alpha=True), TypeError, r"Invalid alpha: True"),
        (dict(start=-1), ValueError, r"Invalid start: -1; allowed: an int >= 0"),
        (dict(start=1.0), TypeError, r"Invalid start: 1.0"),
        (dict(start=2, end=2), ValueError, r"Invalid end: 2; allowed: None or an int > start=2"),
        (dict(start=2, end=1), ValueError, r"Invalid end: 1"),
        (dict(end=5.0), TypeError, r"Invalid end: 5.0"),
        (dict(noise=1), TypeError, r"Invalid noise: 1"),
        (dict(seed=-1), ValueError, r"Invalid seed: -1"),
        (dict(seed=2**64), ValueError, r"Invalid seed: 18446744073709551616"),
    ],
)
def test_constructor_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        OGMGE(encoders(), **kwargs)


def test_encoder_errors():
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Invalid encoders: modalities \['a'\]; allowed: at least 2"):
        OGMGE({"a": a})
    with pytest.raises(ValueError, match=r"shape \(2, 2\) belongs to both 'a' and 'v'"):
        OGMGE({"a": a, "v": [v.weight, a.weight]})
    with pytest.raises(ValueError, match=r"Invalid encoders\['v'\]: no parameter with >= 2 dims"):
        OGMGE({"a": a, "v": [v.bias]})
    with pytest.raises(TypeError, match=r"Invalid encoders\['v'\]: int"):
        OGMGE({"a": a, "v": 3})
    with pytest.raises(TypeError, match=r"Invalid encoders key: 3"):
        OGMGE({"a": a, 3: v})
    # nn.ModuleDict and lists of parameters are accepted; duplicates inside a modality are merged.
    ogm = OGMGE(nn.ModuleDict({"a": a, "v": v}))
    assert ogm.modalities == ("a", "v")
    assert len(OGMGE({"a": [a.weight, a.weight], "v": v}).weights["a"]) == 1


def test_call_errors():
    ogm = OGMGE(encoders())
    good = audio_dominant()
    with pytest.raises(ValueError, match=r"Invalid modality_logits: keys \['audio'\]; allowed: exactly \['audio', 'video'\]"):
        ogm.coefficients({"audio": good["audio"]}, LABELS)
    with pytest.raises(ValueError, match=r"Invalid labels: shape \(4,\) dtype torch.float32"):
        ogm.coefficients(good, LABELS.float())
    with pytest.raises(ValueError, match=r"Invalid labels: class 4; allowed: integers in \[0, 3\]"):
        ogm.coefficients(good, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match=r"Invalid modality_logits\['video'\]: shape \(3, 4\)"):
        ogm.coefficients({"audio": good["audio"], "video": good["video"][:3]}, LABELS)
    with pytest.raises(ValueError, match=r"Invalid modality_logits\['video'\]: 5 classes; allowed: 4"):
        ogm.coefficients({"audio": good["audio"], "video": torch.zeros(4, 5)}, LABELS)
    with pytest.raises(ValueError, match=r"Invalid epoch: -1; allowed: an int >= 0"):
        ogm.apply(good, LABELS, epoch=-1)
    with pytest.raises(TypeError, match=r"Invalid epoch: 1.0"):
        ogm.apply(good, LABELS, epoch=1.0)
    with pytest.raises(ValueError, match=r"Invalid state: \['seed'\]"):
        ogm.load_state_dict({"seed": 0})
