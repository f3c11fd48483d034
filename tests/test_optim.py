"""MaskedMultiModalSGD: validation, rates, step statistics, non-finite gradients, state and resume."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from masked_optim import MaskedMultiModalSGD, modality_param_groups
from masked_optim.backends import resolve_backend
from masked_optim.functional import masked_gradient
from masked_optim.rng import derive_key
from tolerances import TOLERANCES


def two_modality_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(64, 32, generator=gen, dtype=dtype).requires_grad_(), torch.randn(32, generator=gen, dtype=dtype).requires_grad_()]
    v = [torch.randn(16, 3, 5, generator=gen, dtype=dtype).requires_grad_()]
    h = [torch.randn(10, 8, generator=gen, dtype=dtype).requires_grad_()]
    return a, v, h


def groups(a, v, h, **kw):
    return [{"params": a, "modality": "audio"}, {"params": v, "modality": "video"}, {"params": h, "modality": None}]


def fill_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(10_000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


def make(mask="amss+", **kw):
    a, v, h = two_modality_params()
    opt = MaskedMultiModalSGD(groups(a, v, h), lr=0.1, momentum=0.9, mask=mask, **kw)
    return opt, a + v + h


# ----------------------------------------------------------------------------- validation
def _p():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(lr=-0.1), ValueError, r"Invalid lr: -0\.1; allowed: a number >= 0"),
        (dict(lr="0.1"), TypeError, r"Invalid lr: '0\.1' \(type str\); allowed: a number >= 0"),
        (dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0\.5; allowed: a number >= 0"),
        (dict(weight_decay=-1e-4), ValueError, r"Invalid weight_decay: -0\.0001; allowed: a number >= 0"),
        (dict(lr=float("nan")), ValueError, r"Invalid lr: nan; allowed"),
        (dict(nesterov=True), ValueError, r"nesterov=True with momentum=0\.0 and dampening=0\.0; allowed: nesterov requires momentum > 0"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, r"nesterov=True with momentum=0\.9 and dampening=0\.1"),
        (dict(mask="topk"), ValueError, r"Invalid mask: 'topk'; allowed: one of 'none', 'uniform', 'amss', 'amss\+'"),
        (dict(granularity="row"), ValueError, r"Invalid granularity: 'row'; allowed: one of 'element', 'channel'"),
        (dict(sampler="gumbel"), ValueError, r"Invalid sampler: 'gumbel'; allowed: one of 'poisson', 'multinomial'"),
        (dict(backend="gpu"), ValueError, r"Invalid backend: 'gpu'; allowed: one of 'auto', 'reference', 'cpp', 'cuda', 'triton'"),
        (dict(smoothing=1.5), ValueError, r"Invalid smoothing: 1\.5; allowed: a number in \[0, 1\]"),
        (dict(mask="amss", unbiased=True), ValueError, r"Invalid unbiased=True with mask='amss'; allowed: None or False"),
        (dict(mask="amss+", unbiased=False), ValueError, r"Invalid unbiased=False with mask='amss\+'; allowed: None or True"),
        (dict(unbiased="yes"), TypeError, r"Invalid unbiased: 'yes'; allowed: None, True or False"),
        (dict(seed=-1), ValueError, r"Invalid seed: -1; allowed: an int in \[0, 2\*\*64\)"),
        (dict(seed=1.0), ValueError, r"Invalid seed: 1\.0; allowed: an int"),
        (dict(nonfinite="warn"), ValueError, r"Invalid nonfinite: 'warn'; allowed: one of 'raise', 'skip', 'ignore'"),
        (dict(maximize=1), TypeError, r"Invalid maximize: 1; allowed: True or False"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_constructor_rejects_bad_options(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MaskedMultiModalSGD(_p(), **kwargs)


@pytest.mark.parametrize(
    "override,exc,pattern",
    [
        ({"mask": "foo"}, ValueError, r"Invalid param group 1: mask: 'foo'; allowed: one of"),
        ({"lr": -1}, ValueError, r"Invalid param group 1: lr: -1\.0; allowed: a number >= 0"),
        ({"modality": 3}, TypeError, r"Invalid param group 1: modality: 3; allowed: a non-empty str, or None"),
        ({"modality": ""}, TypeError, r"Invalid param group 1: modality: ''"),
        ({"rate": 0.0}, ValueError, r"Invalid param group 1: rate: 0\.0; allowed: a number in \(0, 1\]"),
        ({"masked": "no"}, TypeError, r"Invalid param group 1: masked: 'no'; allowed: True or False"),
    ],
)
def test_group_overrides_are_validated_and_nothing_is_added(override, exc, pattern):
    opt = MaskedMultiModalSGD([{"params": _p(), "modality": "a"}])
    with pytest.raises(exc, match=pattern):
        opt.add_param_group({"params": _p(), **override})
    assert len(opt.param_groups) == 1


def test_parameter_in_two_groups_is_rejected_and_twice_in_one_warns():
    """As torch.optim: a parameter in two groups is an error, twice in one group a warning (and the
    step updates it twice); the messages name the group(s) and the parameter."""
    p = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"params of param group 1: some parameters appear in more than one parameter group "
                                         r"\(a parameter of shape \(2, 3\) is already in param group 0\); allowed: each parameter in exactly one group"):
        MaskedMultiModalSGD([{"params": [p], "modality": "a"}, {"params": [p], "modality": "b"}])
    with pytest.warns(UserWarning, match=r"param group 0 holds a parameter of shape \(2, 3\) twice: optimizer contains a "
                                         r"parameter group with duplicate parameters"):
        MaskedMultiModalSGD([{"params": [p, p], "modality": "a"}])


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match=r"dtype torch\.complex64; allowed: real floating-point"):
        MaskedMultiModalSGD([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


def test_sparse_gradient_is_rejected_before_any_update():
    emb = nn.Embedding(10, 4, sparse=True)
    dense = torch.ones(3, requires_grad=True)
    opt = MaskedMultiModalSGD([{"params": [dense], "modality": "a"}, {"params": emb.parameters(), "modality": "b"}], lr=1.0)
    emb(torch.tensor([1, 2])).sum().backward()
    dense.grad = torch.ones(3)
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Invalid gradient of parameter 1 \(param group 1, shape \(10, 4\)\): layout torch\.sparse_coo; allowed: dense"):
        opt.step()
    assert torch.equal(dense, torch.ones(3)) and torch.equal(emb.weight, before)


@pytest.mark.parametrize(
    "rates,exc,pattern",
    [
        ({"audo": 0.5}, ValueError, r"Invalid rates: unknown modality 'audo'; allowed: one of \['audio', 'video'\]"),
        ({None: 0.5}, ValueError, r"unknown modality None"),
        ({"audio": 0.0}, ValueError, r"Invalid rates\['audio'\]: 0\.0; allowed: a number in \(0, 1\]"),
        ({"audio": 1.5}, ValueError, r"Invalid rates\['audio'\]: 1\.5; allowed: a number in \(0, 1\]"),
        ({"audio": -0.2}, ValueError, r"Invalid rates\['audio'\]: -0\.2"),
        ({"audio": float("nan")}, ValueError, r"Invalid rates\['audio'\]: nan"),
        ({"audio": "high"}, TypeError, r"Invalid rates\['audio'\]: 'high' \(type str\)"),
        ([0.5], TypeError, r"Invalid rates: list; allowed: a dict"),
    ],
)
def test_bad_rates_are_rejected_and_nothing_changes(rates, exc, pattern):
    opt, params = make()
    opt.set_rates({"audio": 0.4})
    with pytest.raises(exc, match=pattern):
        opt.set_rates({"video": 0.2, **rates} if isinstance(rates, dict) else rates)
    assert opt.get_rates() == {"audio": 0.4, "video": 1.0}
    fill_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(exc, match=pattern):
        opt.step(rates=rates)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ----------------------------------------------------------------------------- rates and stats
def test_rates_default_to_one_and_persist_and_override_for_one_step():
    opt, params = make(mask="amss")
    assert opt.modalities == ["audio", "video"]
    assert opt.get_rates() == {"audio": 1.0, "video": 1.0}
    assert opt.last_step_stats() is None
    fill_grads(params, 0)
    opt.step()
    s = opt.last_step_stats()
    assert s["audio"].rate == 1.0 and s["audio"].kept_fraction == 1.0
    opt.set_rates({"audio": 0.25})
    opt.step()
    assert opt.last_step_stats()["audio"].rate == 0.25
    assert opt.last_step_stats()["video"].rate == 1.0
    opt.step(rates={"video": 0.5})
    s = opt.last_step_stats()
    assert (s["audio"].rate, s["video"].rate) == (0.25, 0.5)
    opt.step()
    assert opt.last_step_stats()["video"].rate == 1.0  # the override lasted one step
    assert opt.get_rates() == {"audio": 0.25, "video": 1.0}


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+"])
def test_stats_report_kept_fraction(mask, granularity):
    opt, params = make(mask=mask, granularity=granularity)
    fill_grads(params, 0)
    opt.step(rates={"audio": 0.3, "video": 0.6})
    s = opt.last_step_stats()
    units_a = 64 * 32 + 32 if granularity == "element" else 64 + 32
    units_v = 16 * 3 * 5 if granularity == "element" else 16
    assert (s["audio"].total_units, s["video"].total_units) == (units_a, units_v)
    assert s[None].total_units == 0 and s[None].kept_fraction == 1.0
    assert s["audio"].backend == resolve_backend("auto", torch.device("cpu")) and not s.skipped
    assert s[None].backend == "reference"  # nothing to mask: torch.optim.SGD's own ops
    for m, rate, n in (("audio", 0.3, units_a), ("video", 0.6, units_v)):
        # 5 sigma of a Poisson-binomial count with sum q = rate * n (variance <= n / 4).
        assert abs(s[m].kept_fraction - rate) <= 5 * math.sqrt(0.25 / n)
        assert s[m].kept_fraction == s[m].kept_units / n


def test_shared_and_unmasked_groups_are_dense():
    gen = torch.Generator().manual_seed(0)
    w, b, h = (torch.randn(s, generator=gen).requires_grad_() for s in [(20, 10), (20,), (5, 20)])
    opt = MaskedMultiModalSGD(
        [{"params": [w], "modality": "x"}, {"params": [b], "modality": "x", "masked": False}, {"params": [h]}],
        lr=0.1, mask="amss",
    )
    ref = [t.detach().clone() for t in (w, b, h)]
    for t in (w, b, h):
        t.grad = torch.randn(t.shape, generator=gen)
    opt.step(rates={"x": 0.1})
    assert torch.equal(b, ref[1].add(b.grad, alpha=-0.1)) and torch.equal(h, ref[2].add(h.grad, alpha=-0.1))
    assert (w == ref[0]).float().mean() > 0.5  # most of the masked tensor did not move
    s = opt.last_step_stats()
    assert s["x"].total_units == 200 and s[None].total_units == 0


def test_masked_update_equals_functional_reference():
    """The optimizer applies exactly the masked gradient of tensor i at its step t under the group's seed."""
    opt, params = make(mask="amss+", seed=42, backend="reference")
    opt.param_groups[0]["momentum"] = 0.0
    fill_grads(params, 0)
    before = params[0].detach().clone()
    opt.step(rates={"audio": 0.3})
    gm, _ = masked_gradient(params[0].grad, rate=0.3, key=derive_key(42, 0, 0))
    assert torch.equal(params[0], before.add(gm, alpha=-0.1))


def test_seed_changes_masks_and_same_seed_reproduces():
    masks = []
    for seed in (0, 0, 1):
        opt, params = make(mask="amss", seed=seed)
        fill_grads(params, 0)
        before = params[0].detach().clone()
        opt.step(rates={"audio": 0.5})
        masks.append(params[0] != before)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_update_in_float32(dtype):
    a, v, h = two_modality_params(dtype=torch.float32)
    half = [p.detach().to(dtype).requires_grad_() for p in a + v + h]
    wide = [p.detach().to(dtype).float().requires_grad_() for p in a + v + h]
    opts = [MaskedMultiModalSGD(groups(x[:2], x[2:3], x[3:]), lr=0.1, momentum=0.9, weight_decay=1e-2) for x in (half, wide)]
    for step in range(3):
        fill_grads(half, step)
        for p, q in zip(half, wide):
            q.grad = p.grad.float()
        for o in opts:
            o.step(rates={"audio": 0.5, "video": 0.7})
    for p, q in zip(half, wide):
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), q, **TOLERANCES[dtype])
        assert opts[0].state[p]["momentum_buffer"].dtype == dtype


def test_zero_size_and_scalar_parameters_step():
    params = [torch.zeros(0, 3, requires_grad=True), torch.ones((), requires_grad=True), torch.ones(3, 0, requires_grad=True)]
    for gran in ("element", "channel"):
        opt = MaskedMultiModalSGD([{"params": params, "modality": "m"}], lr=0.1, granularity=gran)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step(rates={"m": 0.5})
        assert all(torch.isfinite(p).all() for p in params)


# ----------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_updates_nothing(bad):
    opt, params = make()
    fill_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    fill_grads(params, 1)
    params[2].grad[0, 0, 1] = bad
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient \(NaN or Inf\) in parameters \[2\].*no parameter was updated"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i]["momentum_buffer"], state["state"][i]["momentum_buffer"]) for i in state["state"])


def test_nonfinite_gradient_skip_leaves_everything_as_if_the_step_never_happened():
    opt, params = make(mask="amss", nonfinite="skip")
    twin, twin_params = make(mask="amss")
    for step in range(2):
        fill_grads(params, step)
        fill_grads(twin_params, step)
        opt.step(rates={"audio": 0.5})
        twin.step(rates={"audio": 0.5})
    fill_grads(params, 99)
    params[0].grad[3, 3] = float("inf")
    opt.step(rates={"audio": 0.5})
    s = opt.last_step_stats()
    assert s.skipped and s.nonfinite_params == (0,) and opt.skipped_steps == 1
    for step in range(2, 4):  # the next steps draw the masks the twin draws
        fill_grads(params, step)
        fill_grads(twin_params, step)
        opt.step(rates={"audio": 0.5})
        twin.step(rates={"audio": 0.5})
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_nonfinite_ignore_updates_like_torch_sgd():
    opt, params = make(nonfinite="ignore")
    fill_grads(params, 0)
    params[3].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[3][0, 0])


# ----------------------------------------------------------------------------- state and resume
def _rates_at(step):
    return {"audio": 0.2 + 0.05 * (step % 7), "video": 0.9 - 0.1 * (step % 5)}


@pytest.mark.parametrize(
    "mask,granularity,sampler",
    [("amss+", "element", "poisson"), ("amss", "channel", "poisson"), ("uniform", "element", "poisson"),
     ("amss+", "element", "multinomial"), ("amss", "channel", "multinomial")],
)
def test_resume_from_state_dict_is_bit_identical(mask, granularity, sampler):
    k = 6
    opt, params = make(mask=mask, granularity=granularity, sampler=sampler, seed=7, weight_decay=1e-3)
    for step in range(k):
        fill_grads(params, step)
        opt.set_rates(_rates_at(step))
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    for step in range(k, 2 * k):
        fill_grads(params, step)
        opt.set_rates(_rates_at(step)) if step % 2 else None
        opt.step()

    buffer.seek(0)
    ckpt = torch.load(buffer)
    resumed_params = [p.clone().requires_grad_() for p in ckpt["params"]]
    fresh = MaskedMultiModalSGD(groups(resumed_params[:2], resumed_params[2:3], resumed_params[3:]), lr=0.5, mask="none")
    fresh.load_state_dict(ckpt["opt"])
    assert fresh.get_rates() == _rates_at(k - 1) and fresh.param_groups[0]["seed"] == 7
    for step in range(k, 2 * k):
        fill_grads(resumed_params, step)
        fresh.set_rates(_rates_at(step)) if step % 2 else None
        fresh.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def _stepped(**kw):
    opt, params = make(mask="amss", seed=3, **kw)
    for step in range(3):
        fill_grads(params, step)
        opt.set_rates(_rates_at(step))
        opt.step()
    return opt, params


def _bad_state(change):
    state = copy.deepcopy(_stepped()[0].state_dict())
    change(state)
    return state


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda s: s["param_groups"].pop(), r"Invalid state_dict: 2 param groups; allowed: 3"),
        (lambda s: s["param_groups"][1]["params"].append(99), r"param group 1 has 2 parameters; allowed: 1"),
        (lambda s: s["param_groups"][0].update(modality="video"),
         r"param group 0 has modality 'video'; allowed: 'audio', this optimizer's group 0"),
        (lambda s: s["param_groups"][2].update(modality="audio"), r"param group 2 has modality 'audio'; allowed: None"),
        (lambda s: s["param_groups"][1].update(rate=1.5), r"state_dict param group 1: rate: 1.5; allowed: a number in \(0, 1\]"),
        (lambda s: s["param_groups"][0].update(mask="amss++"), r"state_dict param group 0: mask: 'amss\+\+'"),
        (lambda s: s["state"][2].update(momentum_buffer=torch.zeros(3)),
         r"momentum_buffer of parameter 2 \(param group 1\) is \(3,\); allowed: a tensor of the parameter's shape \(16, 3, 5\)"),
        (lambda s: s["state"][0].update(step=-1), r"step of parameter 0 \(param group 0\) is -1; allowed: a non-negative int"),
        (lambda s: s["state"][0].update(step=torch.tensor(2.0)), r"step of parameter 0 .* allowed: a non-negative int"),
        (lambda s: s.pop("state"), r"Invalid state_dict: dict with keys \['param_groups'\]; allowed: the dict of"),
    ],
)
def test_loading_another_configurations_state_is_refused_and_changes_nothing(change, pattern):
    opt, params = _stepped()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(_bad_state(change))
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, entry in before["state"].items():
        assert after["state"][k]["step"] == entry["step"]
        assert torch.equal(after["state"][k]["momentum_buffer"], entry["momentum_buffer"])


def test_checkpoint_hyperparameters_replace_the_constructors_as_in_torch_optim():
    opt, _ = _stepped()
    other, _ = make(mask="uniform", seed=11, weight_decay=0.5)
    other.load_state_dict(opt.state_dict())
    assert [g["mask"] for g in other.param_groups] == ["amss"] * 3
    assert other.param_groups[0]["seed"] == 3 and other.param_groups[0]["weight_decay"] == 0.0
    elsewhere, _ = make(backend="reference")
    elsewhere.load_state_dict(opt.state_dict())  # written by backend "auto": runs on its own backend
    assert [g["backend"] for g in elsewhere.param_groups] == ["reference"] * 3
    assert other.get_rates() == opt.get_rates()


def test_a_torch_sgd_checkpoint_continues_with_masking_and_keeps_the_modalities():
    """SGD for k steps, then MaskedMultiModalSGD loaded from SGD's state: rate 1 continues SGD exactly."""
    a, v, h = two_modality_params()
    sgd_params = [p.detach().clone().requires_grad_() for p in a + v + h]
    sgd = torch.optim.SGD(groups(sgd_params[:2], sgd_params[2:3], sgd_params[3:]), lr=0.1, momentum=0.9)
    for step in range(3):
        fill_grads(sgd_params, step)
        sgd.step()
    ours_params = [p.detach().clone().requires_grad_() for p in sgd_params]
    ours = MaskedMultiModalSGD(groups(ours_params[:2], ours_params[2:3], ours_params[3:]), lr=0.3, mask="amss", seed=5)
    sd = copy.deepcopy(sgd.state_dict())  # as if read from disk: torch.optim would share the buffers
    for g in sd["param_groups"]:
        del g["modality"]  # torch.optim.SGD keeps unknown keys; a plain SGD checkpoint has none
    ours.load_state_dict(sd)
    assert [g["modality"] for g in ours.param_groups] == ["audio", "video", None]
    assert [g["mask"] for g in ours.param_groups] == ["amss"] * 3 and ours.param_groups[0]["lr"] == 0.1
    for step in range(3, 6):
        fill_grads(sgd_params, step)
        fill_grads(ours_params, step)
        sgd.step()
        ours.step()  # rates are 1 until set: exactly SGD
    for p, q in zip(sgd_params, ours_params):
        assert torch.equal(p, q)
    ours.set_rates({"audio": 0.5})
    fill_grads(ours_params, 6)
    ours.step()
    assert ours.last_step_stats()["audio"].kept_fraction < 1.0


def test_old_checkpoints_get_new_defaults():
    opt, params = make()
    state = opt.__getstate__()
    for g in state["param_groups"]:
        del g["smoothing"]
    del state["nonfinite"]
    restored = MaskedMultiModalSGD.__new__(MaskedMultiModalSGD)
    restored.__setstate__(state)
    assert restored.param_groups[0]["smoothing"] == 0.5 and restored.nonfinite == "raise"
    opt.nonfinite = "skip"
    copied = pickle.loads(pickle.dumps(opt))
    assert copied.param_groups[1]["modality"] == "video" and copied.nonfinite == "skip"


def test_added_param_group_is_masked_and_keyed_by_its_index():
    opt, params = make(mask="amss")
    extra = torch.randn(30, 30, requires_grad=True)
    opt.add_param_group({"params": [extra], "modality": "text", "rate": 0.3})
    assert opt.modalities == ["audio", "video", "text"] and opt.get_rates()["text"] == 0.3
    fill_grads(params + [extra], 0)
    opt.step()
    s = opt.last_step_stats()
    assert s["text"].total_units == 900 and abs(s["text"].kept_fraction - 0.3) < 5 * math.sqrt(0.25 / 900)


def test_works_with_modality_param_groups_and_a_real_model():
    torch.manual_seed(0)
    enc = {"a": nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU()), "b": nn.Linear(3, 8)}
    head = nn.Linear(16, 2)
    opt = MaskedMultiModalSGD(modality_param_groups(enc, shared=head, mask_biases_and_norms=False), lr=0.1, momentum=0.9)
    x_a, x_b, y = torch.randn(32, 5), torch.randn(32, 3), torch.randint(2, (32,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(head(torch.cat([enc["a"](x_a), enc["b"](x_b)], 1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step(rates={"a": 0.3, "b": 0.9})
    s = opt.last_step_stats()
    assert s["a"].total_units == 5 * 8 and s["b"].total_units == 3 * 8  # biases and norms dense


# ----------------------------------------------------------------------------- mask="scale"
def _scale_backends():
    """Every backend that runs here; triton on CPU only in its interpreter (tests/conftest.py)."""
    from masked_optim.backends import backend_status

    out = []
    for name in ("reference", "cpp", "triton"):
        reason = backend_status(name, torch.device("cpu"))
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def _scale_opt(backend, granularity="element", **kw):
    a, v, h = two_modality_params()
    opt = MaskedMultiModalSGD(groups(a, v, h), lr=0.1, momentum=0.9, weight_decay=1e-3, mask="scale",
                              granularity=granularity, backend=backend, **kw)
    return opt, a + v + h


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("backend", _scale_backends())
def test_scale_stats_report_every_unit_kept_and_the_rate(backend, granularity):
    opt, params = _scale_opt(backend, granularity)
    before = [p.detach().clone() for p in params]
    fill_grads(params, 0)
    opt.step(rates={"audio": 0.3, "video": 0.6})
    s = opt.last_step_stats()
    units_a = 64 * 32 + 32 if granularity == "element" else 64 + 32
    units_v = 16 * 3 * 5 if granularity == "element" else 16
    for m, rate, n in (("audio", 0.3, units_a), ("video", 0.6, units_v)):
        assert s[m].rate == rate and s[m].backend == backend
        assert s[m].kept_units == s[m].total_units == n and s[m].kept_fraction == 1.0
    assert s[None].total_units == 0 and s[None].backend == "reference" and not s.skipped
    # first step with momentum: p = p0 - lr * (rho * g + wd * p0), every element moved
    for p, p0, rho in zip(params[:3], before[:3], (0.3, 0.3, 0.6)):
        expected = p0 - 0.1 * (p.grad * rho + 1e-3 * p0)
        torch.testing.assert_close(p, expected, **TOLERANCES[torch.float32])
        wrong = p0 - 0.1 * (p.grad * rho * rho + 1e-3 * p0)
        assert not torch.allclose(p, wrong, **TOLERANCES[torch.float32])
        assert (p != p0).all()


def test_scale_auto_backend_is_the_fused_one_and_matches_reference():
    results = {}
    for backend in ("auto", "reference"):
        opt, params = _scale_opt(backend)
        for step in range(3):
            fill_grads(params, step)
            opt.step(rates=_rates_at(step))
        results[backend] = (params, opt.last_step_stats())
    assert results["auto"][1]["audio"].backend == resolve_backend("auto", torch.device("cpu"))
    for p, q in zip(results["auto"][0], results["reference"][0]):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: MaskedMultiModalSGD(_p(), mask="scale", unbiased=True),
         r"Invalid unbiased=True with mask='scale'; allowed: None or False"),
        (lambda: MaskedMultiModalSGD([{"params": _p(), "modality": "a"}]).add_param_group(
            {"params": _p(), "modality": "b", "mask": "scale", "unbiased": True}),
         r"Invalid param group 1: unbiased=True with mask='scale'; allowed: None or False"),
        (lambda: MaskedMultiModalSGD([{"params": _p(), "modality": "a", "mask": "scale"}], mask="amss+", unbiased=True),
         r"Invalid param group 0: unbiased=True with mask='scale'"),
    ],
)
def test_scale_refuses_unbiased_true(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_scale_accepts_unbiased_false_and_ignores_the_sampler():
    """sampler is documented as ignored by scale: multinomial runs on the fused backend and gives the
    poisson result bit for bit (no sample is drawn either way)."""
    out = []
    for sampler, unbiased in (("poisson", None), ("multinomial", False)):
        opt, params = _scale_opt(resolve_backend("auto", torch.device("cpu")), sampler=sampler, unbiased=unbiased)
        for step in range(3):
            fill_grads(params, step)
            opt.step(rates=_rates_at(step))
        assert opt.last_step_stats()["audio"].backend == resolve_backend("auto", torch.device("cpu"))
        out.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*out))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", _scale_backends())
def test_scale_nonfinite_gradient_raises_and_updates_nothing(backend, bad):
    opt, params = _scale_opt(backend)
    opt.set_rates({"audio": 0.3, "video": 0.6})
    fill_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    fill_grads(params, 1)
    params[0].grad[5, 7] = bad  # a scale tensor (audio), not only the shared head
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient \(NaN or Inf\) in parameters \[0\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, bufs))


@pytest.mark.parametrize("backend", _scale_backends())
def test_scale_nonfinite_gradient_skip_is_as_if_the_step_never_happened(backend):
    opt, params = _scale_opt(backend, nonfinite="skip")
    twin, twin_params = _scale_opt(backend)
    for step in range(2):
        fill_grads(params, step)
        fill_grads(twin_params, step)
        opt.step(rates=_rates_at(step))
        twin.step(rates=_rates_at(step))
    fill_grads(params, 99)
    params[2].grad[1, 1, 1] = float("nan")  # video, a scale tensor
    opt.step(rates={"audio": 0.3, "video": 0.5})
    s = opt.last_step_stats()
    assert s.skipped and s.nonfinite_params == (2,) and opt.skipped_steps == 1
    for step in range(2, 4):
        fill_grads(params, step)
        fill_grads(twin_params, step)
        opt.step(rates=_rates_at(step))
        twin.step(rates=_rates_at(step))
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_scale_resume_from_state_dict_is_bit_identical(granularity):
    """Rates, mask and momentum buffers come back from the checkpoint: the resumed run continues the
    uninterrupted one bit for bit (a fresh optimizer built with mask='none' takes 'scale' from it)."""
    k = 4
    opt, params = make(mask="scale", granularity=granularity, weight_decay=1e-3)
    for step in range(k):
        fill_grads(params, step)
        opt.set_rates(_rates_at(step))
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    for step in range(k, 2 * k):
        fill_grads(params, step)
        opt.set_rates(_rates_at(step)) if step % 2 else None
        opt.step()

    buffer.seek(0)
    ckpt = torch.load(buffer)

    def resume(mask_override=None):
        resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
        fresh = MaskedMultiModalSGD(groups(resumed[:2], resumed[2:3], resumed[3:]), lr=0.5, mask="none")
        fresh.load_state_dict(ckpt["opt"])
        if mask_override is not None:
            for g in fresh.param_groups:
                g["mask"] = mask_override
        for step in range(k, 2 * k):
            fill_grads(resumed, step)
            fresh.set_rates(_rates_at(step)) if step % 2 else None
            fresh.step()
        return resumed, fresh

    resumed, fresh = resume()
    assert [g["mask"] for g in fresh.param_groups] == ["scale"] * 3 and fresh.get_rates() == opt.get_rates()
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))
    assert not all(torch.equal(p, q) for p, q in zip(params, resume("none")[0]))  # the mask mattered


# ----------------------------------------------------------------------------- structure and dispatch
BACKEND_NAMES = ("cpp", "reference", "cuda", "triton")


OPTIMIZER_MODULES = ("masked_optim._base", "masked_optim.optim", "masked_optim.adamw")


def _optim_tree(name):
    import ast
    import importlib

    with open(importlib.import_module(name).__file__, encoding="utf-8") as f:
        return ast.parse(f.read())


def test_step_is_short():
    """The shared step (masked_optim/_base.py) reads in one screen; the optimizers define none."""
    import ast

    classes = {n.name: n for name in OPTIMIZER_MODULES for n in _optim_tree(name).body if isinstance(n, ast.ClassDef)}
    for name in ("MaskedMultiModalSGD", "MaskedMultiModalAdamW"):
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "step" for n in classes[name].body), name
    cls = classes["MaskedOptimizer"]
    step = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "step")
    assert step.end_lineno - step.lineno + 1 <= 60  # from `def step` to its last line, docstring included


@pytest.mark.parametrize("module", OPTIMIZER_MODULES)
def test_optim_does_not_branch_on_backend_names(module):
    """Backend dispatch lives in masked_optim.backends: the optimizer modules compare no backend name."""
    import ast

    def names_in(node):
        elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return {e.value for e in elts if isinstance(e, ast.Constant) and e.value in BACKEND_NAMES}

    found = [
        (node.lineno, sorted(names_in(side)))
        for node in ast.walk(_optim_tree(module))
        if isinstance(node, ast.Compare)
        for side in [node.left, *node.comparators]
        if names_in(side)
    ]
    assert found == []


def _cpu_backends():
    from masked_optim.backends import backend_status

    return [
        pytest.param(n, marks=pytest.mark.skipif(backend_status(n, torch.device("cpu")) is not None, reason=n))
        for n in ("reference", "cpp", "triton")
    ]


def _batch(mask="amss+", rate=0.4, grads=None, momentum=0.9, granularity="element", backend="reference", seed=3):
    from masked_optim.backends import GroupTensors
    from masked_optim.modes import Mode

    gen = torch.Generator().manual_seed(seed)
    grads = grads if grads is not None else [torch.randn(12, 5, generator=gen), torch.randn(7, generator=gen)]
    params = [torch.randn(g.shape, generator=gen) for g in grads]
    options = dict(lr=0.1, momentum=momentum, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False,
                   mask=mask, granularity=granularity, smoothing=0.5, sampler="poisson", unbiased=None, backend=backend)
    mode = Mode.of(mask)
    return GroupTensors(options, params, list(params), grads, [11 + i for i in range(len(grads))],
                        [None] * len(grads), rate=rate, mode=mode, masked=mode is not Mode.DENSE,
                        sparse=mode is not Mode.DENSE and rate < 1, momentum_buffers=[None] * len(grads))


@pytest.mark.parametrize("mask", ["uniform", "amss", "amss+", "scale", "none"])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_dispatch_runs_the_resolved_backend_and_matches_masked_sgd(backend, mask):
    from masked_optim.backends import masked_sgd_step, prepare
    from masked_optim.functional import masked_sgd

    batch = _batch(mask, backend=backend)
    ref = [p.clone() for p in batch.params]
    ref_bufs = [None] * len(ref)
    ref_kept = masked_sgd(ref, batch.grads, ref_bufs, batch.keys, lr=0.1, momentum=0.9, weight_decay=1e-3,
                          mask=mask, rate=0.4)
    asked = []

    def resolve(requested, device, sampler):
        asked.append((requested, device, sampler))
        return requested

    probes = prepare([batch], resolve, check=True)
    sparse = mask != "none"
    assert asked == ([(backend, torch.device("cpu"), "poisson")] * 2 if sparse else [])  # dense: no resolving
    assert [b.name for b in batch.backends] == [backend if sparse else "reference"] * 2
    # One probe per group: cpp's multi-tensor stage 1 (for scale, its sums of squares alone) probes
    # the group's tensors; every other backend's are in one multi-tensor norm per group and dtype.
    assert len(probes.local) == 1 and not probes.sharded
    assert all(bool(torch.isfinite(p)) for p in probes.local)
    assert [j for j, _ in probes.scored] == ([0, 1] if mask in ("uniform", "amss", "amss+") else [])
    kept = masked_sgd_step(batch)
    assert all(b is not None and b.shape == p.shape for b, p in zip(batch.momentum_buffers, batch.params))
    tol = TOLERANCES[torch.float32] if backend != "reference" else dict(rtol=0, atol=0)
    for p, r, b, rb in zip(batch.params, ref, batch.momentum_buffers, ref_bufs):
        torch.testing.assert_close(p, r, **tol)
        torch.testing.assert_close(b, rb, **tol)
    assert [int(k) for k in kept] == [int(k) for k in ref_kept]


def test_cpp_prepare_is_its_stage_one_and_its_sum_of_squares_probe():
    from masked_optim.backends import backend_status
    from masked_optim.backends.dispatch import backend_named

    if backend_status("cpp", torch.device("cpu")) is not None:
        pytest.skip("cpp backend unavailable")
    batch = _batch("amss+", granularity="channel")
    prepared, probe = backend_named("cpp").prepare(batch, 0)
    scalars, scores, sumsq = torch.ops.masked_optim.tensor_scalars(batch.grads[0], 0.4, 0.5, 4, 4, True)
    assert torch.equal(prepared[0], scalars) and torch.equal(prepared[1], scores)
    assert probe.dtype == torch.float64 and torch.equal(probe, sumsq)
    assert torch.isclose(probe, batch.grads[0].double().square().sum())
    # mask="scale" has no stage 1: nothing prepared, and the op's sum of squares alone is the probe
    batch = _batch("scale")
    prepared, probe = backend_named("cpp").prepare(batch, 0)
    assert prepared is None and probe.dtype == torch.float64 and probe.dim() == 0
    assert torch.isclose(probe, batch.grads[0].double().square().sum())
    batch.grads[0].view(-1)[3] = float("inf")
    assert not bool(torch.isfinite(backend_named("cpp").prepare(batch, 0)[1]))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_dispatch_probes_flag_nan_and_overflowing_squares(backend):
    from masked_optim.backends import prepare

    grads = [torch.ones(4, 3), torch.tensor([1.0, float("nan")]), torch.full((3,), 1e30), torch.zeros(0)]
    first, second = _batch("amss+", grads=grads[:2], backend=backend), _batch("amss+", grads=grads[2:], backend=backend)
    probes = prepare([first, second], lambda requested, device, sampler: requested, check=True)
    # one probe per group (and dtype): the NaN, and the 1e30 whose square overflows float32 (cpp: the
    # sum of its multi-tensor stage 1's sums of squares, empty gradients included)
    assert [bool(torch.isfinite(p)) for p in probes.local] == [False, False]
    assert [j for j, _ in probes.scored] == [0, 1, 2]  # positions among every group's gradients; empty ones skipped
    # nonfinite="ignore": nothing probed, nothing prepared (the kernels compute their own stage 1)
    probes = prepare([_batch("amss+", backend=backend)], lambda *a: backend, check=False)
    assert probes.local == [] and probes.scored == []


def test_norm_probes_group_by_dtype_and_compute_half_norms_in_float32():
    """The default probe: one multi-tensor 2-norm per group, device and dtype, in the compute
    dtype, so that a float16 gradient whose norm exceeds float16's range (65504) is no alarm."""
    from masked_optim.backends import prepare

    grads = [torch.full((10,), 30000.0, dtype=torch.float16), torch.ones(3, dtype=torch.float64),
             torch.ones(2), torch.full((2,), 1e300, dtype=torch.float64).to(torch.float32)]
    batch = _batch("scale", grads=grads[:3], backend="reference")
    probes = prepare([batch], lambda requested, device, sampler: requested, check=True)
    assert len(probes.local) == 3 and all(p.dtype == torch.float64 and p.dim() == 0 for p in probes.local)
    assert all(bool(torch.isfinite(p)) for p in probes.local)
    # an infinite float32 gradient (1e300 rounds to inf) makes its group's probe non-finite
    batch = _batch("scale", grads=grads[2:], backend="reference")
    probes = prepare([batch], lambda requested, device, sampler: requested, check=True)
    assert [bool(torch.isfinite(p)) for p in probes.local] == [False]


def test_dispatch_backend_objects_are_shared_and_names_are_checked():
    from masked_optim.backends.dispatch import backend_named

    assert backend_named("reference") is backend_named("reference")
    with pytest.raises(ValueError, match="Invalid backend: 'auto'"):
        backend_named("auto")


@pytest.mark.parametrize("backend", _cpu_backends())
def test_overflowing_square_names_its_parameter_in_any_group(backend):
    """The overflow check names the parameter by its index, also outside the last param group
    (it used to be shifted by the number of gradients of the groups after it)."""
    a, v, h = two_modality_params()
    opt = MaskedMultiModalSGD(groups(a, v, h), lr=0.1, mask="amss+", backend=backend, nonfinite="skip")
    opt.set_rates({"audio": 0.5, "video": 0.5})
    params = a + v + h
    for bad in (1, 2):  # audio's second tensor, then video's only one
        fill_grads(params, 0)
        with torch.no_grad():
            params[bad].grad.view(-1)[0] = 1e30  # finite, but its square overflows float32
        a[0].grad = None if bad == 2 else a[0].grad  # indices count parameters without a gradient too
        before = [p.detach().clone() for p in params]
        opt.step()
        s = opt.last_step_stats()
        assert s.skipped and s.nonfinite_params == (bad,)
        assert all(torch.equal(p, q) for p, q in zip(params, before))
    opt.nonfinite = "raise"
    with pytest.raises(FloatingPointError, match=r"Gradient too large in parameters \[2\]"):
        opt.step()


def test_an_optimizer_without_modalities_warns_once_per_process(monkeypatch):
    from masked_optim._base import MaskedOptimizer

    monkeypatch.setattr(MaskedOptimizer, "_warned_no_modality", False)
    with pytest.warns(UserWarning, match=r"MaskedMultiModalSGD: no param group has a `modality`, so nothing is rebalanced: "
                                         r"this is torch.optim.SGD. Build the groups with modality_param_groups"):
        MaskedMultiModalSGD([torch.zeros(2, requires_grad=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedMultiModalSGD([torch.zeros(2, requires_grad=True)])  # once
        MaskedMultiModalSGD([{"params": [torch.zeros(2, requires_grad=True)], "modality": "a"}])  # has one: silent
