"""ModalityProbes (docs/algorithm.md §3.8): per-modality logits for any fusion, trained on detached features."""

from __future__ import annotations

import pytest
import torch

from masked_optim import ModalityProbes


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.randn(3, 8, generator=g) * 3
    a = centers[y] + torch.randn(n, 8, generator=g)  # separable
    b = torch.randn(n, 5, generator=g)  # noise: no information about y
    return {"a": a, "b": b}, y


def _acc(o, y):
    return (o.argmax(1) == y).float().mean().item()


def test_probes_learn_a_separable_problem():
    feats, y = _toy()
    probes = ModalityProbes({"a": 8, "b": 5}, 3, lr=0.05)
    first = probes({m: z[:64] for m, z in feats.items()}, y[:64])
    assert _acc(first["a"], y[:64]) < 0.5  # zero weights: uniform logits, argmax 0
    for _ in range(30):
        for i in range(0, 256, 64):
            out = probes({m: z[i:i + 64] for m, z in feats.items()}, y[i:i + 64])
    assert _acc(out["a"], y[192:]) > 0.9
    assert _acc(probes.logits(feats)["a"], y) > 0.9
    assert probes.steps == 1 + 30 * 4


def test_logits_are_taken_before_the_update_and_detached():
    feats, y = _toy(64)
    probes = ModalityProbes({"a": 8, "b": 5}, 3)
    before = probes.logits(feats)
    out = probes(feats, y)
    for m in feats:
        assert torch.equal(out[m], before[m]) and not out[m].requires_grad
    assert not torch.equal(probes.logits(feats)["a"], before["a"])


def test_no_gradient_reaches_the_features():
    feats, y = _toy(64)
    feats = {m: z.clone().requires_grad_(True) for m, z in feats.items()}
    ModalityProbes({"a": 8, "b": 5}, 3)(feats, y)
    for z in feats.values():
        assert z.grad is None


def test_building_and_calling_draws_no_random_numbers():
    state = torch.get_rng_state()
    feats, y = _toy(32)
    probes = ModalityProbes({"a": 8, "b": 5}, 3)
    probes(feats, y)
    assert torch.equal(torch.get_rng_state(), state)


def test_state_round_trip():
    feats, y = _toy(128)
    a = ModalityProbes({"a": 8, "b": 5}, 3)
    for _ in range(3):
        a(feats, y)
    b = ModalityProbes({"a": 8, "b": 5}, 3)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        oa, ob = a(feats, y), b(feats, y)
        for m in feats:
            assert torch.equal(oa[m], ob[m])
    with pytest.raises(ValueError, match="Invalid state"):
        ModalityProbes({"a": 8}, 3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="Invalid state"):
        b.load_state_dict({"probes": {}})


def test_errors_name_the_argument():
    feats, y = _toy(16)
    probes = ModalityProbes({"a": 8, "b": 5}, 3)
    with pytest.raises(ValueError, match=r"Invalid features: modalities \['a'\]; allowed: exactly \['a', 'b'\]"):
        probes({"a": feats["a"]}, y)
    with pytest.raises(ValueError, match=r"Invalid features\['b'\]: shape \(16, 4\); allowed: \(16, 5\)"):
        probes({"a": feats["a"], "b": feats["b"][:, :4]}, y)
    with pytest.raises(ValueError, match=r"Invalid labels: class 3; allowed: 0 <= label < num_classes = 3"):
        probes(feats, torch.full((16,), 3))
    with pytest.raises(ValueError, match=r"Invalid labels: class -1"):
        probes(feats, torch.full((16,), -1))
    with pytest.raises(ValueError, match="Invalid labels"):
        probes(feats, y.float())
    with pytest.raises(ValueError, match=r"Invalid dims\['a'\]: 0"):
        ModalityProbes({"a": 0}, 3)
    with pytest.raises(ValueError, match="Invalid num_classes"):
        ModalityProbes({"a": 2}, 1)
    with pytest.raises(ValueError, match="Invalid lr"):
        ModalityProbes({"a": 2}, 3, lr=0.0)
