"""Metrics of the docs/algorithm.md §7 protocol against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from masked_optim.experiments.metrics import accuracy, linear_probe_accuracy, macro_f1, mean_std, paired_difference

# ------------------------------------------------------------------------------------- accuracy


def test_accuracy_predictions_and_logits():
    labels = torch.tensor([0, 1, 2, 1])
    assert accuracy(torch.tensor([0, 1, 1, 1]), labels) == 0.75
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    # argmax: 0, 1, 1, and the first maximum (0) on the tie of the last row.
    assert accuracy(logits, labels) == 0.5
    assert type(accuracy(logits, labels)) is float
    assert accuracy(torch.tensor([3], dtype=torch.int32), torch.tensor([3])) == 1.0


def test_accuracy_errors():
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"Invalid labels: 2 samples; allowed: 3"):
        accuracy(torch.tensor([0, 1, 2]), labels[:2])
    with pytest.raises(ValueError, match=r"Invalid logits_or_pred: shape \(3,\) dtype torch.float32"):
        accuracy(torch.tensor([0.0, 1.0, 2.0]), labels)
    with pytest.raises(ValueError, match=r"Invalid logits_or_pred: shape \(3, 2, 1\)"):
        accuracy(torch.zeros(3, 2, 1), labels)
    with pytest.raises(ValueError, match=r"Invalid labels: shape \(3,\) dtype torch.float32"):
        accuracy(torch.tensor([0, 1, 2]), labels.float())
    with pytest.raises(ValueError, match=r"Invalid labels: empty"):
        accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------------------------- macro-F1


def test_macro_f1_hand_computed():
    labels = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    # class 0: tp 1, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 0 -> 0.
    # Classes 3 and 4 (num_classes=5) appear nowhere and are left out.
    assert macro_f1(pred, labels, num_classes=5) == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-15)
    # A class present only in the predictions counts, with F1 0: labels {0, 1}, predictions {0, 1, 2}.
    labels = torch.tensor([0, 0, 1])
    pred = torch.tensor([0, 2, 1])
    # class 0: tp 1, fn 1 -> 2/3; class 1: 1; class 2: fp 1 -> 0.
    assert macro_f1(pred, labels, num_classes=3) == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-15)
    assert macro_f1(labels, labels, num_classes=3) == 1.0
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([0, 0]), num_classes=2) == 0.0


def test_macro_f1_from_logits_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g)
    labels = torch.randint(0, 5, (64,), generator=g)
    assert macro_f1(logits, labels, 5) == macro_f1(logits.argmax(1), labels, 5)
    with pytest.raises(ValueError, match=r"Invalid pred_or_logits: 5 columns; allowed: num_classes=6"):
        macro_f1(logits, labels, 6)


def test_macro_f1_errors():
    with pytest.raises(ValueError, match=r"Invalid pred_or_logits: class 3; allowed: integers in \[0, 2\]"):
        macro_f1(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"Invalid labels: class -1"):
        macro_f1(torch.tensor([0, 1]), torch.tensor([0, -1]), 3)
    with pytest.raises(ValueError, match=r"Invalid num_classes: 1; allowed: an int >= 2"):
        macro_f1(torch.tensor([0]), torch.tensor([0]), 1)


def test_macro_f1_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        labels = torch.randint(0, 6, (40,), generator=g)
        pred = torch.where(torch.rand(40, generator=g) < 0.5, labels, torch.randint(0, 7, (40,), generator=g))
        want = sklearn_metrics.f1_score(labels.numpy(), pred.numpy(), average="macro", zero_division=0)
        assert macro_f1(pred, labels, 7) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------- linear probe


def clustered(n, d, k, spread, gen, centers=None):
    centers = torch.randn(k, d, generator=gen) * 3 if centers is None else centers
    y = torch.randint(0, k, (n,), generator=gen)
    return centers[y] + spread * torch.randn(n, d, generator=gen), y, centers


def test_separable_features_give_perfect_accuracy():
    g = torch.Generator().manual_seed(0)
    x, y, c = clustered(600, 16, 5, 0.1, g)
    xe, ye, _ = clustered(300, 16, 5, 0.1, g, c)
    assert linear_probe_accuracy(x, y, xe, ye, 5) == 1.0
    # Training accuracy on separable data is 1 as well.
    assert linear_probe_accuracy(x, y, x, y, 5) == 1.0


def test_noise_features_give_chance():
    g = torch.Generator().manual_seed(2)
    n, k = 2000, 10
    x, xe = torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g)
    y, ye = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    acc = linear_probe_accuracy(x, y, xe, ye, k)
    # The eval labels are uniform and independent of everything the probe saw, so the number of
    # correct predictions is Binomial(n, 1/k) whatever the probe learnt: sd = sqrt(0.09 / 2000) = 0.0067.
    assert abs(acc - 1 / k) < 5 * math.sqrt((1 / k) * (1 - 1 / k) / n)


def test_standardisation_uses_train_statistics_only():
    # One feature; train classes on either side of 0 (mean 0), so the probe's boundary is near 0.
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    xe, ye = torch.tensor([[-0.5], [0.5]]), torch.tensor([0, 1])
    assert linear_probe_accuracy(x, y, xe, ye, 2) == 1.0
    # Shifting only the eval features moves both points to class 1's side: it must change the
    # result. Standardising the eval set with its own mean would undo the shift and keep 1.0.
    assert linear_probe_accuracy(x, y, xe + 3.0, ye, 2) == 0.5
    # Shifting and scaling train and eval together must not change anything.
    assert linear_probe_accuracy(5 * x + 3.0, y, 5 * xe + 3.0, ye, 2) == 1.0
    # An eval set with a single distinct value (its own std would be 0) is fine.
    assert linear_probe_accuracy(x, y, torch.tensor([[1.5], [1.5]]), torch.tensor([1, 1]), 2) == 1.0
    # Adding far-away eval points must not change the predictions for the others. Statistics of
    # the eval set (alone, or pooled with the train set) would squeeze the train features to
    # nearly one value; with the L2 penalty the probe then leans to the training majority
    # (class 1 here) and misclassifies the class-0 point.
    x = torch.tensor([[-2.0], [-1.0], [1.0], [1.5], [2.0], [2.5]])
    y = torch.tensor([0, 0, 1, 1, 1, 1])
    xe, ye = torch.tensor([[-1.5], [1.5]]), torch.tensor([0, 1])
    far_x = torch.cat([xe, torch.full((100, 1), 1000.0)])
    far_y = torch.cat([ye, torch.ones(100, dtype=torch.long)])
    assert linear_probe_accuracy(x, y, xe, ye, 2) == 1.0
    assert linear_probe_accuracy(x, y, far_x, far_y, 2) == 1.0


def test_probe_is_deterministic_and_leaves_inputs_alone():
    g = torch.Generator().manual_seed(3)
    x, y, c = clustered(300, 8, 4, 2.0, g)
    xe, ye, _ = clustered(300, 8, 4, 2.0, g, c)
    x.requires_grad_(True)
    x_copy = x.detach().clone()
    a = linear_probe_accuracy(x, y, xe, ye, 4)
    b = linear_probe_accuracy(x, y, xe, ye, 4)
    assert a == b and 0.4 < a < 1.0  # overlapping clusters: informative but not perfect
    assert torch.equal(x.detach(), x_copy) and x.grad is None
    # float64 and float32 inputs fit the same (the probe always works in float64).
    assert linear_probe_accuracy(x.double(), y, xe.double(), ye, 4) == a
    # Classes absent from the training set are allowed (num_classes > labels seen).
    assert 0.0 <= linear_probe_accuracy(x, y, xe, ye, 6) <= 1.0


def test_probe_errors():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    cases = [
        ((x, y[:9], x, y, 2), ValueError, r"Invalid train_labels: 9 samples; allowed: 10"),
        ((x, y, x[:8], y, 2), ValueError, r"Invalid eval_labels: 10 samples; allowed: 8"),
        ((x[:, 0], y, x, y, 2), ValueError, r"Invalid train_features: shape \(10,\) dtype torch.float32; allowed: a floating \(N, D\)"),
        ((x, y, x[None], y, 2), ValueError, r"Invalid eval_features: shape \(1, 10, 3\)"),
        ((x, y[:, None], x, y, 2), ValueError, r"Invalid train_labels: shape \(10, 1\)"),
        ((x, y, x[:, :2], y, 2), ValueError, r"Invalid eval_features: 2 features; allowed: 3"),
        ((x, y, x, y, 1), ValueError, r"Invalid num_classes: 1; allowed: an int >= 2"),
        ((x, y, x, y, 0), ValueError, r"Invalid num_classes: 0"),
        ((x, y, x, y, 2.0), TypeError, r"Invalid num_classes: 2.0"),
        ((x, y + 1, x, y, 2), ValueError, r"Invalid train_labels: class 2; allowed: integers in \[0, 1\]"),
        ((x, y.float(), x, y, 2), ValueError, r"Invalid train_labels: shape \(10,\) dtype torch.float32"),
        ((x.long(), y, x, y, 2), ValueError, r"Invalid train_features: shape \(10, 3\) dtype torch.int64"),
        ((torch.full((10, 3), float("nan")), y, x, y, 2), ValueError, r"Invalid train_features: contains NaN or inf"),
        ((x[:0], y[:0], x, y, 2), ValueError, r"Invalid train_features: shape \(0, 3\)"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            linear_probe_accuracy(*args)
    with pytest.raises(ValueError, match=r"Invalid weight_decay: -1.0"):
        linear_probe_accuracy(x, y, x, y, 2, weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"Invalid max_iter: 0; allowed: an int >= 1"):
        linear_probe_accuracy(x, y, x, y, 2, max_iter=0)


# ----------------------------------------------------------------------------------- seed stats


def test_mean_std_hand_computed():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; sample variance 5 / 3.
    assert mean_std([1, 2, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3)), abs=1e-15)
    assert mean_std(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((2.5, math.sqrt(5 / 3)), abs=1e-15)
    assert mean_std(np.array([0.7, 0.7, 0.7])) == pytest.approx((0.7, 0.0), abs=1e-15)
    assert mean_std([0.8]) == (0.8, 0.0)  # one value: std 0.0 by choice
    m, s = mean_std([1.0, float("nan")])
    assert math.isnan(m) and math.isnan(s)
    assert all(type(v) is float for v in mean_std((1, 2)))


def test_paired_difference_hand_computed():
    # d = (0.1, 0, 0.1): mean 1/15; deviations (1/30, -2/30, 1/30); s_d = sqrt((6/900)/2) = sqrt(3)/30;
    # se = s_d / sqrt(3) = 1/30.
    mean, se = paired_difference([0.9, 0.8, 0.85], [0.8, 0.8, 0.75])
    assert mean == pytest.approx(1 / 15, abs=1e-15)
    assert se == pytest.approx(1 / 30, abs=1e-15)
    mean, se = paired_difference([0.5], [0.25])
    assert mean == 0.25 and math.isnan(se)
    assert paired_difference([1, 2, 3], [1, 2, 3]) == (0.0, 0.0)


def test_seed_stats_errors():
    with pytest.raises(ValueError, match=r"Invalid values: empty"):
        mean_std([])
    with pytest.raises(TypeError, match=r"Invalid values: str"):
        mean_std("123")
    with pytest.raises(TypeError, match=r"Invalid values: element True"):
        mean_std([True, 1.0])
    with pytest.raises(ValueError, match=r"Invalid values: shape \(2, 2\)"):
        mean_std(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"Invalid b: 2 values; allowed: 3"):
        paired_difference([1, 2, 3], [1, 2])
