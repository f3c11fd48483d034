"""PyTorch's optimizer contract, driven by its own ``OptimizerInfo`` for SGD and AdamW.

Our port of the ``TestOptimRenewed`` tests of PyTorch's ``test/test_optim.py`` that apply to a CPU
SGD (errors, going the right direction with and without LR schedulers, tensor LR, param groups,
state_dict determinism and backward compatibility, deepcopy, weights-only save/load, hooks,
foreach/fused against the for-loop, params without grads), over the inputs of
``torch.testing._internal.common_optimizers`` (``optim_inputs_func_sgd`` / ``_adamw``,
``optim_error_inputs_func_sgd`` / ``_adamw``). Each runs for the torch class (the control) and
``MaskedMultiModalSGD`` / ``MaskedMultiModalAdamW`` in four variants: no modality, modality groups
at rate 1, ``amss+`` at rate 0.5 and ``scale`` at rate 0.5. The deliberate differences are tested
at the end, each with its message (the list is in docs/guide.md, "Differences from torch.optim").
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn import Parameter

from masked_optim import MaskedMultiModalAdamW, MaskedMultiModalSGD

co = pytest.importorskip("torch.testing._internal.common_optimizers", reason="needs expecttest (the [test] extra)")

INFOS = {cls: next(info for info in co.optim_db if info.optim_cls is cls) for cls in (torch.optim.SGD, torch.optim.AdamW)}
CPU = torch.device("cpu")


def _modality_groups(params):
    """A list of tensors (or named tensors) becomes one group of modality 'a'; each dict of a list of
    dicts gets modality 'm<i>'. Anything else (a bad input) is passed on unchanged."""
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, dict) for p in params):
        return [dict(g, modality=f"m{i}") for i, g in enumerate(params)]
    if isinstance(params, (list, tuple)) and params and not any(isinstance(p, dict) for p in params):
        return [{"params": list(params), "modality": "a"}]
    return params


def _masked(cls, mask, rate):
    def build(params, **kwargs):
        opt = cls(_modality_groups(params), mask=mask, seed=5, **kwargs)
        opt.set_rates({m: rate for m in opt.modalities})
        return opt

    return build


VARIANTS = {}
for _torch_cls, _cls in ((torch.optim.SGD, MaskedMultiModalSGD), (torch.optim.AdamW, MaskedMultiModalAdamW)):
    _name = _cls.__name__
    VARIANTS.update({
        f"{_torch_cls.__name__}-control": (_torch_cls, _torch_cls),
        f"{_name}-no-modality": (_torch_cls, _cls),
        f"{_name}-modalities-rate-1": (_torch_cls, _masked(_cls, "amss+", 1.0)),
        f"{_name}-amss+-rate-0.5": (_torch_cls, _masked(_cls, "amss+", 0.5)),
        f"{_name}-scale-rate-0.5": (_torch_cls, _masked(_cls, "scale", 0.5)),
    })
variants = pytest.mark.parametrize("variant", list(VARIANTS))


def _info(variant):
    return INFOS[VARIANTS[variant][0]]


def _build(variant):
    return VARIANTS[variant][1]


def _weight_bias(contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        return Parameter(torch.randn(10, 5, generator=gen)), Parameter(torch.randn(10, generator=gen))
    return (Parameter(torch.randn(10, 5, 2, generator=gen)[..., 0]), Parameter(torch.randn(10, 2, generator=gen)[..., 0]))


def _closure(opt, w, b, x):
    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    return closure


@variants
def test_errors(variant):
    build = _build(variant)
    for error_input in _info(variant).optim_error_inputs_func(device=CPU, dtype=torch.float32):
        inp = error_input.optimizer_error_input
        assert error_input.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR, inp.desc
        params = inp.params if inp.params is not None else [Parameter(torch.randn(2, 2))]
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                build(params, **inp.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                build(params, **inp.kwargs)


@variants
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [True, False])
def test_forloop_goes_right_direction(variant, contiguous, with_lrsched):
    build = _build(variant)
    for schedulers_c in (_info(variant).scheduler_inputs if with_lrsched else [[]]):
        for inp in _info(variant).optim_inputs_func(device=CPU):  # fresh inputs per scheduler: a tensor lr is mutated in place
            w, b = _weight_bias(contiguous)
            x = torch.randn(5, generator=torch.Generator().manual_seed(1))
            opt = build([w, b], **dict(inp.kwargs, foreach=False))
            scheds = [s(opt) for s in schedulers_c]
            closure = _closure(opt, w, b, x)
            initial = closure().item()
            for _ in range(20):
                loss = closure()
                opt.step()
                for s in scheds:
                    s.step(loss) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
            if inp.kwargs.get("maximize", False):
                assert closure().item() > initial, inp.desc
            else:
                assert closure().item() < initial, inp.desc


@variants
def test_param_group_with_lrscheduler_goes_right_direction(variant):
    build = _build(variant)
    for schedulers_c in _info(variant).scheduler_inputs:
        w, b = _weight_bias()
        x = torch.randn(5, generator=torch.Generator().manual_seed(1))
        opt = build([{"params": [w]}, {"params": [b], "lr": 0.01}])
        scheds = [s(opt) for s in schedulers_c]
        closure = _closure(opt, w, b, x)
        initial = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            for s in scheds:
                s.step(loss) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
        assert closure().item() < initial


@variants
def test_tensor_lr_is_the_number_lr(variant):
    """A 1-element tensor lr steps as the same number (within the float32 table, as torch's test)."""
    build = _build(variant)
    for inp in _info(variant).optim_inputs_func(device=CPU):
        kwargs = {k: v for k, v in inp.kwargs.items() if k != "lr"}
        results = []
        for lr in (1e-3, torch.tensor(1e-3)):
            w, b = _weight_bias()
            x = torch.randn(5, generator=torch.Generator().manual_seed(1))
            opt = build([w, b], lr=lr, **kwargs)
            for _ in range(5):
                opt.step(_closure(opt, w, b, x))
            results.append((w.detach(), b.detach()))
        for a, c in zip(*results):  # torch's own AdamW rounds 1 - lr * wd in float32 for a tensor lr
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=inp.desc)  # the float32 row of tests/tolerances.py


def _primed(build, kwargs, steps=3, seed=0):
    w, b = _weight_bias(seed=seed)
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    opt = build([w, b], **kwargs)
    for _ in range(steps):
        opt.step(_closure(opt, w, b, x))
    return opt, w, b, x


@variants
def test_state_dict_deterministic(variant):
    """A copy loaded from the state dict steps exactly as the original, and both (and a deepcopy) give
    equal state dicts, key for key."""
    build = _build(variant)
    for inp in _info(variant).optim_inputs_func(device=CPU):
        opt, w, b, x = _primed(build, inp.kwargs)
        w2, b2 = Parameter(w.detach().clone()), Parameter(b.detach().clone())
        opt2 = build([w2, b2], **inp.kwargs)
        saved = copy.deepcopy(opt.state_dict())
        opt2.load_state_dict(copy.deepcopy(saved))
        for _ in range(3):
            opt.step(_closure(opt, w, b, x))
            opt2.step(_closure(opt2, w2, b2, x))
            assert torch.equal(w, w2) and torch.equal(b, b2), inp.desc
        sd, sd2, sd3 = opt.state_dict(), opt2.state_dict(), copy.deepcopy(opt).state_dict()
        for other in (sd2, sd3):
            assert other["param_groups"] == sd["param_groups"], inp.desc
            assert other["state"].keys() == sd["state"].keys()
            for k in sd["state"]:
                assert other["state"][k].keys() == sd["state"][k].keys()


@variants
def test_deepcopy_copies_all_public_attrs(variant):
    opt, *_ = _primed(_build(variant), {"weight_decay": 0.1})  # state in every variant
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
    assert public(copy.deepcopy(opt)) == public(opt)


@variants
def test_can_load_older_state_dict(variant):
    """Groups without the newer flags (as checkpoints written before they existed) load and step."""
    build = _build(variant)
    for inp in _info(variant).optim_inputs_func(device=CPU):
        opt, w, b, x = _primed(build, inp.kwargs)
        sd = copy.deepcopy(opt.state_dict())
        for group in sd["param_groups"]:
            for key in ("foreach", "fused", "differentiable", "maximize"):
                group.pop(key, None)
        opt2 = build([w, b], **inp.kwargs)
        opt2.load_state_dict(sd)
        opt2.step(_closure(opt2, w, b, x))


@variants
def test_save_load_equality_with_weights_only(variant):
    for inp in _info(variant).optim_inputs_func(device=CPU):
        opt, w, b, x = _primed(_build(variant), inp.kwargs)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        opt2 = _build(variant)([Parameter(w.detach().clone()), Parameter(b.detach().clone())], **inp.kwargs)
        opt2.load_state_dict(loaded)
        assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"], inp.desc


@variants
def test_step_is_noop_when_params_have_no_grad(variant):
    for inp in _info(variant).optim_inputs_func(device=CPU):
        w, b = _weight_bias()
        before = (w.detach().clone(), b.detach().clone())
        opt = _build(variant)([w, b], **inp.kwargs)
        opt.step()
        assert torch.equal(w, before[0]) and torch.equal(b, before[1]), inp.desc


@variants
def test_optimizer_can_be_printed(variant):
    opt, *_ = _primed(_build(variant), {})
    assert type(opt).__name__ in repr(opt)


@variants
def test_step_hooks_fire_in_order(variant):
    opt, w, b, x = _primed(_build(variant), {}, steps=0)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.step(_closure(opt, w, b, x))
    assert calls == ["pre", "post"]


@variants
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_impl_matches_forloop(variant, impl):
    """``foreach=True`` / ``fused=True`` against the for-loop (the masked variants' masked tensors run
    their kernel either way; their dense tensors run torch's implementation)."""
    for inp in _info(variant).optim_inputs_func(device=CPU):
        results = []
        for flag in (False, True):
            opt, w, b, x = _primed(_build(variant), dict(inp.kwargs, **{impl: flag}), steps=5)
            results.append((w.detach(), b.detach()))
        for a, c in zip(*results):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)  # the float32 row of tests/tolerances.py


@variants
def test_step_is_noop_for_zero_grads(variant):
    """Zero gradients without weight decay move nothing (inputs with weight decay skipped, as torch's test)."""
    for inp in _info(variant).optim_inputs_func(device=CPU):
        w, b = _weight_bias()
        before = (w.detach().clone(), b.detach().clone())
        opt = _build(variant)([w, b], **inp.kwargs)
        if opt.param_groups[0]["weight_decay"] != 0:  # AdamW's default decays
            continue
        for _ in range(3):
            w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
            opt.step()
        assert torch.equal(w, before[0]) and torch.equal(b, before[1]), inp.desc


@variants
def test_load_nontensor_step(variant):
    """A checkpoint whose ``step`` entries are python numbers (older torch) loads and steps."""
    opt, w, b, x = _primed(_build(variant), {})
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].item()
    opt.load_state_dict(sd)
    opt.step(_closure(opt, w, b, x))


@variants
def test_state_dict_hooks_run(variant):
    opt, w, b, x = _primed(_build(variant), {})
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["sd-pre", "load-post"]


@variants
def test_mixed_dtypes_in_one_group(variant):
    w64 = Parameter(torch.randn(4, 3, dtype=torch.float64))
    b32 = Parameter(torch.randn(4))
    opt = _build(variant)([w64, b32], lr=0.01)
    before = (w64.detach().clone(), b32.detach().clone())
    for _ in range(3):
        opt.zero_grad()
        (w64.sum() ** 2 + (b32 * 2).sum()).backward()
        opt.step()
    assert w64.dtype == torch.float64 and b32.dtype == torch.float32
    assert not torch.equal(w64, before[0]) and not torch.equal(b32, before[1])


# ----------------------------------------------------------------------------- deliberate differences
MASKED = [MaskedMultiModalSGD, MaskedMultiModalAdamW]


@pytest.mark.parametrize("cls", MASKED)
@pytest.mark.parametrize("named", [False, True])
def test_difference_complex_parameters_are_refused(cls, named):
    p = Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"of dtype torch.complex64; allowed: real floating-point parameters \(complex ones "
                                         r"are not supported: pass torch.view_as_real\(p\)"):
        cls([("w", p)] if named else [p])


@pytest.mark.parametrize("cls", MASKED)
def test_difference_sparse_gradients_are_refused(cls):
    p = Parameter(torch.randn(4, 3))
    opt = cls([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(ValueError, match=r"layout torch.sparse_coo; allowed: dense \(torch.strided\) gradients \(use "
                                         r"nn.Embedding\(sparse=False\) or torch.optim.SparseAdam\)"):
        opt.step()


@pytest.mark.parametrize("cls", MASKED)
def test_difference_differentiable_is_refused(cls):
    with pytest.raises(ValueError, match=r"Invalid differentiable: True; allowed: False \(the masked steps run under "
                                         "torch.no_grad"):
        cls([Parameter(torch.randn(3))], differentiable=True)


@pytest.mark.parametrize("cls", MASKED)
def test_difference_nonfinite_gradients_raise_by_default(cls):
    p = Parameter(torch.randn(3))
    opt = cls([p])
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(FloatingPointError, match="Pass nonfinite='skip' to skip such steps, or 'ignore' to update anyway"):
        opt.step()
    cls([p], nonfinite="ignore").step()  # torch.optim's behaviour, on request


@pytest.mark.parametrize("name", ["momentum", "weight_decay"])
def test_difference_tensor_momentum_and_weight_decay_are_refused(name):
    """torch.optim.SGD takes them; here only lr may be a tensor (the kernels take these as numbers)."""
    torch.optim.SGD([Parameter(torch.randn(3))], lr=0.1, **{name: torch.tensor(0.5)})
    shown = "momentum value" if name == "momentum" else name
    with pytest.raises(TypeError, match=rf"Invalid {shown}: tensor\(0\.5000\) \(type Tensor\); allowed: a number >= 0"):
        MaskedMultiModalSGD([Parameter(torch.randn(3))], lr=0.1, **{name: torch.tensor(0.5)})
