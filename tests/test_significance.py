"""ModalSignificance against docs/algorithm.md §3 worked by hand: the paper's softmax rule (spelled out, as the
default is the ratio rule) and the ratio rule."""

import math
import warnings

import pytest
import torch

from masked_optim import ModalSignificance

LN2 = math.log(2)


def softmax2(x, y):
    return 1 / (1 + math.exp(y - x)), 1 / (1 + math.exp(x - y))


def example():
    # Labels [0, 0, 1, 1]: p = (1/2, 1/2), H_Y = ln 2.
    # Audio is confident and right: CE = ln(1 + e^-2). Video is uninformative: CE = ln 2.
    labels = torch.tensor([0, 0, 1, 1])
    audio = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    video = torch.zeros(4, 2)
    return {"audio": audio, "video": video}, labels


def test_hand_computed_rates_without_features():
    logits, labels = example()
    est = ModalSignificance(rule="softmax", min_rate=0.01, max_rate=1.0)
    rates = est(logits, labels)
    i_a = LN2 - math.log(1 + math.exp(-2))
    i_v = 0.0
    r_a, r_v = i_a + 0.5, i_v + 0.5
    s_a, s_v = softmax2(r_a / 0.2, r_v / 0.2)
    assert rates == pytest.approx({"audio": 1 - s_a, "video": 1 - s_v}, abs=1e-12)
    assert all(type(v) is float for v in rates.values())
    assert est.last.label_entropy == pytest.approx(LN2, abs=1e-12)
    assert est.last.mutual_information == pytest.approx({"audio": i_a, "video": i_v}, abs=1e-12)
    assert est.last.mi_rate == pytest.approx({"audio": r_a, "video": r_v}, abs=1e-12)
    assert est.last.feature_entropy == {} and not est.last.fallback
    assert rates["audio"] + rates["video"] == pytest.approx(1.0, abs=1e-12)  # two modalities, b = 0


def test_default_clamps_apply():
    logits, labels = example()
    rates = ModalSignificance(rule="softmax")(logits, labels)  # 1 - s_a = 0.0556 -> 0.1, 1 - s_v = 0.944 -> 0.9
    assert rates == {"audio": 0.1, "video": 0.9}


def test_hand_computed_rates_with_features_and_bias():
    logits, labels = example()
    # Uniform features of width 4 have entropy ln 4; one-hot-ish features (10, 0) have less.
    z_a = torch.zeros(4, 4)
    z_v = torch.tensor([[10.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    p = torch.softmax(z_v[0].double(), 0)
    h_v = -(p * p.log()).sum().item()
    est = ModalSignificance(rule="softmax", temperature=0.5, offset=0.3, bias=0.1, min_rate=0.0001, max_rate=1.0)
    rates = est(logits, labels, features={"audio": z_a, "video": z_v})
    i_a = LN2 - math.log(1 + math.exp(-2))
    r_a, r_v = (i_a + 0.3) / math.log(4), (0 + 0.3) / h_v
    s_a, s_v = softmax2(r_a / 0.5, r_v / 0.5)
    assert est.last.feature_entropy == pytest.approx({"audio": math.log(4), "video": h_v}, abs=1e-12)
    assert rates == pytest.approx({"audio": min(1.0, 1 - s_a + 0.1), "video": min(1.0, 1 - s_v + 0.1)}, abs=1e-12)


def test_label_entropy_ignores_absent_classes():
    labels = torch.tensor([0, 0, 0, 2])  # class 1 absent, p = (3/4, 0, 1/4)
    logits = {"a": torch.zeros(4, 3), "b": torch.zeros(4, 3)}
    est = ModalSignificance(rule="softmax", offset=2.0)
    est(logits, labels)
    assert est.last.label_entropy == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-12)
    assert est.last.cross_entropy["a"] == pytest.approx(math.log(3), abs=1e-12)


def test_more_significant_modality_gets_smaller_rate():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(5, (256,), generator=gen)
    strong = torch.nn.functional.one_hot(labels, 5).float() * 3 + torch.randn(256, 5, generator=gen)
    weak = torch.nn.functional.one_hot(labels, 5).float() * 0.5 + torch.randn(256, 5, generator=gen)
    noise = torch.randn(256, 5, generator=gen) * 0.1
    est = ModalSignificance(rule="softmax", temperature=1.0, min_rate=0.01, max_rate=1.0)
    rates = est({"weak": weak, "strong": strong, "noise": noise}, labels)
    mi = est.last.mutual_information
    assert mi["strong"] > mi["weak"] > mi["noise"]
    assert rates["strong"] < rates["weak"] < rates["noise"]


def test_three_modalities_follow_the_softmax_formula():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(3, (64,), generator=gen)
    logits = {m: torch.randn(64, 3, generator=gen) + k * torch.nn.functional.one_hot(labels, 3) for k, m in enumerate("xyz")}
    est = ModalSignificance(rule="softmax", temperature=0.7, min_rate=1e-6, max_rate=1.0)
    rates = est(logits, labels)
    r = est.last.mi_rate
    z = sum(math.exp(r[m] / 0.7) for m in "xyz")
    assert rates == pytest.approx({m: 1 - math.exp(r[m] / 0.7) / z for m in "xyz"}, abs=1e-12)


def test_fallback_when_offset_mutual_information_is_not_positive():
    logits, labels = example()
    logits["video"] = torch.tensor([[0.0, 9.0], [0.0, 9.0], [9.0, 0.0], [9.0, 0.0]])  # confidently wrong
    est = ModalSignificance(rule="softmax")
    assert est(logits, labels) == {"audio": 0.5, "video": 0.5}
    assert est.last.fallback
    assert est.last.mutual_information["video"] + 0.5 <= 0


def test_fallback_when_not_finite():
    logits, labels = example()
    logits["audio"][0, 0] = float("nan")
    est = ModalSignificance(rule="softmax")
    assert est(logits, labels) == {"audio": 0.5, "video": 0.5} and est.last.fallback


def test_ema_smooths_mutual_information_rate_and_skips_fallback_batches():
    logits, labels = example()
    est = ModalSignificance(rule="softmax", beta=0.75, min_rate=1e-6, max_rate=1.0)
    est(logits, labels)
    r1 = est.last.mi_rate
    swapped = {"audio": logits["video"], "video": logits["audio"]}
    est(swapped, labels)
    r2 = {"audio": r1["video"], "video": r1["audio"]}
    expected = {m: 0.75 * r1[m] + 0.25 * r2[m] for m in r1}
    assert est.last.mi_rate == pytest.approx(expected, abs=1e-12)
    bad = dict(logits, video=torch.tensor([[0.0, 9.0]] * 2 + [[9.0, 0.0]] * 2))
    est(bad, labels)
    assert est.last.fallback and est.state_dict()["ema"] == pytest.approx(expected, abs=1e-12)
    fresh = ModalSignificance(rule="softmax", beta=0.75)
    fresh.load_state_dict(est.state_dict())
    assert fresh.state_dict() == est.state_dict()


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(temperature=0), ValueError, r"Invalid temperature: 0; allowed: a number > 0"),
        (dict(min_rate=0.0), ValueError, r"Invalid min_rate: 0\.0; allowed: a number in \(0, 1\]"),
        (dict(max_rate=1.2), ValueError, r"Invalid max_rate: 1\.2; allowed: a number in \(0, 1\]"),
        (dict(min_rate=0.8, max_rate=0.5), ValueError, r"Invalid min_rate=0\.8 > max_rate=0\.5; allowed: min_rate <= max_rate"),
        (dict(beta=1.0), ValueError, r"Invalid beta: 1\.0; allowed: a number in \[0, 1\)"),
        (dict(offset=float("inf")), ValueError, r"Invalid offset: inf; allowed: a finite number"),
        (dict(bias="0"), TypeError, r"Invalid bias: '0'; allowed: a finite number"),
        (dict(rule="linear"), ValueError, r"Invalid rule: 'linear'; allowed: one of 'softmax', 'ratio'"),
        (dict(rule="ratio", power=0), ValueError, r"Invalid power: 0; allowed: a number > 0"),
        (dict(rule="ratio", power=True), TypeError, r"Invalid power: True; allowed: a number > 0"),
        (dict(release_at=-0.1), ValueError, r"Invalid release_at: -0\.1; allowed: a number >= 0 or math\.inf"),
        (dict(release_at=float("nan")), ValueError, r"Invalid release_at: nan; allowed: a number >= 0 or math\.inf"),
        (dict(release_at="0.2"), TypeError, r"Invalid release_at: '0\.2'; allowed: a number >= 0 or math\.inf"),
        (dict(release_at=True), TypeError, r"Invalid release_at: True; allowed"),
        (dict(release_beta=1.0), ValueError, r"Invalid release_beta: 1\.0; allowed: a number in \[0, 1\)"),
    ],
)
def test_constructor_validation(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ModalSignificance(**kwargs)


def test_call_validation():
    logits, labels = example()
    est = ModalSignificance(rule="softmax")
    with pytest.raises(ValueError, match=r"Invalid labels: shape \(4,\) dtype torch.float32; allowed: a 1-D integer tensor"):
        est(logits, labels.float())
    with pytest.raises(ValueError, match=r"Invalid logits\['video'\]: shape \(3, 2\); allowed: \(4, K\)"):
        est({"audio": logits["audio"], "video": torch.zeros(3, 2)}, labels)
    with pytest.raises(ValueError, match=r"Invalid logits\['video'\]: 3 classes; allowed: 2"):
        est({"audio": logits["audio"], "video": torch.zeros(4, 3)}, labels)
    with pytest.raises(ValueError, match=r"Invalid features: keys \['audio'\]; allowed: the same modalities as logits"):
        est(logits, labels, features={"audio": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match=r"Invalid logits: dict; allowed: a non-empty dict"):
        est({}, labels)


def test_fallback_when_feature_entropy_is_zero():
    # Features so large that softmax is exactly one-hot in float64: H_m = 0, r_m = inf -> fallback, no exception.
    logits, labels = example()
    features = {"audio": torch.randn(4, 8), "video": torch.zeros(4, 8)}
    features["audio"][:, 0] = 1e4
    est = ModalSignificance(rule="softmax")
    assert est(logits, labels, features) == {"audio": 0.5, "video": 0.5}
    assert est.last.fallback and est.last.feature_entropy["audio"] == 0.0


# ----------------------------------------------------------------------------- the ratio rule
def _logits_with_accuracy(p_right, labels):
    """Two-class logits whose softmax gives the true class probability ``p_right`` on every sample."""
    right, wrong = math.log(p_right), math.log(1 - p_right)
    return torch.tensor([[right, wrong] if y == 0 else [wrong, right] for y in labels.tolist()], dtype=torch.float64)


def test_ratio_rule_two_modalities_by_hand():
    labels = torch.tensor([0, 1, 0, 1])  # H_Y = ln 2
    logits = {"a": _logits_with_accuracy(0.9, labels), "b": _logits_with_accuracy(0.6, labels)}
    est = ModalSignificance(rule="ratio", release_at=math.inf)  # docs/algorithm.md §3 exactly (no release)
    rates = est(logits, labels)
    i_a, i_b = LN2 + math.log(0.9), LN2 + math.log(0.6)  # 0.5878, 0.1823
    assert rates == pytest.approx({"a": i_b / i_a, "b": 1.0}, abs=1e-12)  # the weakest keeps the full step
    assert est.last.mi_rate == pytest.approx({"a": i_a, "b": i_b}, abs=1e-12) and not est.last.fallback
    # temperature, offset and bias do not enter the ratio rule; power does
    same = ModalSignificance(rule="ratio", temperature=3.0, offset=2.0, bias=0.3, release_at=math.inf)(logits, labels)
    assert same == rates
    squared = ModalSignificance(rule="ratio", power=2.0, min_rate=1e-4, release_at=math.inf)(logits, labels)
    assert squared == pytest.approx({"a": (i_b / i_a) ** 2, "b": 1.0}, abs=1e-12)


def test_ratio_rule_three_modalities_with_features_floor_and_clamp():
    labels = torch.tensor([0, 1, 0, 1])
    logits = {
        "a": _logits_with_accuracy(0.9, labels),
        "b": _logits_with_accuracy(0.6, labels),
        "c": _logits_with_accuracy(0.5, labels),  # I = 0: floored to 1e-3
    }
    z_uniform = torch.zeros(4, 4)  # entropy ln 4
    z_peaked = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    p = torch.softmax(z_peaked[0].double(), 0)
    h_peaked = -(p * p.log()).sum().item()
    features = {"a": z_uniform, "b": z_peaked, "c": z_uniform}
    u = {"a": (LN2 + math.log(0.9)) / math.log(4), "b": (LN2 + math.log(0.6)) / h_peaked, "c": 1e-3 / math.log(4)}
    est = ModalSignificance(rule="ratio", min_rate=1e-4, release_at=math.inf)
    rates = est(logits, labels, features)
    assert est.last.mi_rate == pytest.approx(u, abs=1e-12)
    assert rates == pytest.approx({m: u["c"] / u[m] for m in u}, abs=1e-12)
    assert rates["c"] == 1.0
    # the default floor min_rate = 0.1 applies to the dominant modalities (here both below it)
    floored = ModalSignificance(rule="ratio", release_at=math.inf)(logits, labels, features)
    assert floored == {"a": 0.1, "b": 0.1, "c": 1.0}
    # and max_rate, when given, caps the weakest too
    capped = ModalSignificance(rule="ratio", min_rate=1e-4, max_rate=0.8, release_at=math.inf)(logits, labels, features)
    assert capped["c"] == 0.8 and capped["a"] == pytest.approx(u["c"] / u["a"], abs=1e-12)


def test_ratio_rule_fallback_keeps_every_step_and_states_refuse_the_other_rule():
    labels = torch.tensor([0, 1, 0, 1])
    logits = {"a": _logits_with_accuracy(0.9, labels), "b": torch.full((4, 2), float("nan"))}
    est = ModalSignificance(rule="ratio")
    assert est(logits, labels) == {"a": 1.0, "b": 1.0} and est.last.fallback
    paper = ModalSignificance(rule="softmax")
    paper({"a": logits["a"], "b": logits["a"]}, labels)
    with pytest.raises(ValueError, match=r"an EMA of rule 'softmax'; allowed: rule 'ratio'"):
        est.load_state_dict(paper.state_dict())
    est.load_state_dict({"ema": None})  # no EMA yet: nothing to mix up
    with pytest.raises(ValueError, match=r"an EMA of rule 'softmax'"):
        est.load_state_dict({"ema": {"a": 1.0, "b": 2.0}})  # written before the rule existed: softmax


# ----------------------------------------------------------------------------- release
def _two(p_a, p_b, labels):
    return {"a": _logits_with_accuracy(p_a, labels), "b": _logits_with_accuracy(p_b, labels)}


def test_release_defaults_per_rule():
    assert ModalSignificance().release_at == 0.2 and ModalSignificance().release_beta == 0.9
    assert ModalSignificance(rule="softmax").release_at == math.inf  # the paper's rule never releases
    assert ModalSignificance(rule="ratio", release_at=0).release_at == 0.0


def test_release_by_hand_latches_and_reset_rearms():
    """EMA of I_m / H_Y by hand (release_beta 0.5, release_at 0.2); the ratio rates until the weakest
    modality's EMA reaches 0.2, then every rate is max_rate for good, even if the modality falls back."""
    labels = torch.tensor([0, 1, 0, 1])  # H_Y = ln 2
    x = lambda p: (LN2 + math.log(p)) / LN2  # noqa: E731 - the normalised information of accuracy p
    est = ModalSignificance(rule="ratio", release_at=0.2, release_beta=0.5)
    ema_b = None
    for p_b in (0.5, 0.55, 0.6, 0.62):  # b's I / H_Y: 0, 0.1375, 0.263, 0.310
        rates = est(_two(0.9, p_b, labels), labels)
        ema_b = x(p_b) if ema_b is None else 0.5 * ema_b + 0.5 * x(p_b)
        assert est.state_dict()["info_ema"]["b"] == pytest.approx(ema_b, abs=1e-12)
        i_a, i_b = LN2 + math.log(0.9), max(LN2 + math.log(p_b), 1e-3)
        if ema_b < 0.2:
            assert not est.released and not est.last.released
            assert rates == pytest.approx({"a": max(0.1, i_b / i_a), "b": 1.0}, abs=1e-12)
        else:
            assert est.released and est.last.released and rates == {"a": 1.0, "b": 1.0}
    # 0, 0.069, 0.166, 0.238: released on the fourth batch, not before
    assert est.released and ema_b == pytest.approx(0.2380, abs=1e-3)
    assert est(_two(0.9, 0.5, labels), labels) == {"a": 1.0, "b": 1.0}  # latched: b uninformative again
    est.reset()
    assert not est.released and est.state_dict()["info_ema"] is None
    assert est(_two(0.9, 0.5, labels), labels)["a"] == pytest.approx(0.1)  # rebalancing again (floor)


def test_release_gives_max_rate_and_softmax_can_release_too():
    labels = torch.tensor([0, 1, 0, 1])
    capped = ModalSignificance(rule="ratio", max_rate=0.8, release_beta=0.0)
    assert capped(_two(0.9, 0.7, labels), labels) == {"a": 0.8, "b": 0.8}  # b: I / H_Y = 0.485 >= 0.2
    paper = ModalSignificance(rule="softmax", release_at=0.2, release_beta=0.0)
    assert paper(_two(0.9, 0.7, labels), labels) == {"a": 0.9, "b": 0.9}
    never = ModalSignificance(rule="ratio", release_at=math.inf, release_beta=0.0)
    for _ in range(3):
        assert never(_two(0.9, 0.7, labels), labels)["a"] < 1.0 and not never.released


def test_release_ema_skips_fallback_and_single_class_batches():
    labels = torch.tensor([0, 1, 0, 1])
    est = ModalSignificance(rule="ratio", release_beta=0.5)
    est(_two(0.9, 0.5, labels), labels)
    before = est.state_dict()["info_ema"]
    est({"a": _logits_with_accuracy(0.9, labels), "b": torch.full((4, 2), float("nan"))}, labels)  # fallback
    one_class = torch.tensor([1, 1, 1, 1])  # H_Y = 0: I_m / H_Y undefined
    est(_two(0.9, 0.9, one_class), one_class)
    assert est.state_dict()["info_ema"] == before and not est.released


def test_release_state_round_trip_and_states_written_before_release():
    labels = torch.tensor([0, 1, 0, 1])
    est = ModalSignificance(rule="ratio", release_beta=0.0)
    est(_two(0.9, 0.7, labels), labels)
    assert est.released
    fresh = ModalSignificance(rule="ratio", release_beta=0.0)
    fresh.load_state_dict(est.state_dict())
    assert fresh.released and fresh.state_dict() == est.state_dict()
    assert fresh(_two(0.9, 0.5, labels), labels) == {"a": 1.0, "b": 1.0}
    old = ModalSignificance(rule="ratio")
    old.load_state_dict({"ema": None, "rule": "ratio"})  # a checkpoint from before release existed
    assert not old.released and old.state_dict()["info_ema"] is None
    with pytest.raises(ValueError, match=r"Invalid state: released='yes'; allowed: True or False"):
        old.load_state_dict({"ema": None, "rule": "ratio", "released": "yes"})


# ----------------------------------------------------------------------------- loud failures
def _logits(batch=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(batch, k, generator=g), "b": torch.randn(batch, k, generator=g)}


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, 1, 2, 4, 0, 1, 2, 3]), r"Invalid labels: class 4; allowed: integers in \[0, 3\] \(the logits have 4 columns\)"),
    (torch.tensor([-1, 1, 2, 3, 0, 1, 2, 3]), r"Invalid labels: class -1; allowed: integers in \[0, 3\]"),
    (torch.zeros(8), r"Invalid labels: shape \(8,\) dtype torch.float32; allowed: a 1-D integer tensor of class indices"),
    (torch.zeros(8, dtype=torch.bool), r"Invalid labels: shape \(8,\) dtype torch.bool; allowed: a 1-D integer tensor"),
])
def test_bad_labels_are_named_errors(labels, match):
    est = ModalSignificance()
    with pytest.raises(ValueError, match=match):
        est(_logits(), labels)
    assert est.last is None  # nothing was recorded


def test_probabilities_passed_as_logits_are_refused():
    est = ModalSignificance()
    logits = _logits()
    with pytest.raises(ValueError, match=r"Invalid logits\['b'\]: every row is in \[0, 1\] and sums to 1, i.e. probabilities; "
                                         r"allowed: logits \(pre-softmax scores"):
        est({"a": logits["a"], "b": logits["b"].softmax(1)}, torch.arange(8) % 4)
    est(logits, torch.arange(8) % 4)  # the same values as logits pass


def test_nonfinite_logits_warn_once_and_are_counted():
    est = ModalSignificance()
    logits = _logits()
    bad = {"a": logits["a"].clone(), "b": logits["b"]}
    bad["a"][3, 1] = float("nan")
    y = torch.arange(8) % 4
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf in logits of \['a'\]: this batch's rates are the fallback \(1.0\)"):
        rates = est(bad, y)
    assert rates == {"a": 1.0, "b": 1.0} and est.last.fallback and est.last.nonfinite_logits == ("a",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per estimator
        est(bad, y)
        est(logits, y)
    assert est.nonfinite_batches == 2 and est.last.nonfinite_logits == ()
