"""Mixed precision: torch.amp.GradScaler skips a step with inf gradients without touching the
optimizer (parameters, momentum, per-tensor step counts, hence the mask sequence), and training
under torch.autocast works."""

import pytest
import torch
import torch.nn.functional as F

from masked_optim import MaskedMultiModalSGD, ModalSignificance, modality_param_groups
from masked_optim.experiments import build_model


def _batches(n):
    g = torch.Generator().manual_seed(2)
    return [({"a": torch.randn(32, 10, generator=g), "b": torch.randn(32, 6, generator=g)}, torch.randint(4, (32,), generator=g))
            for _ in range(n)]


def _run(batches, inject_inf_at=None, skip=None, mask="amss+"):
    torch.manual_seed(0)
    model = build_model({"a": (10,), "b": (6,)}, 4)
    opt = MaskedMultiModalSGD(modality_param_groups(model.encoders, shared=model.head), lr=0.05, momentum=0.9,
                              weight_decay=1e-4, mask=mask, seed=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    est = ModalSignificance()
    skipped = 0
    for i, (x, y) in enumerate(batches):
        if i == skip:
            continue
        out = model(x)
        loss = F.cross_entropy(out.logits, y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if i == inject_inf_at:
            next(model.encoders["a"].parameters()).grad[0, 0] = float("inf")
        opt.set_rates(est({m: o.detach() for m, o in out.modality_logits.items()}, y))
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < scale_before
    return model, opt, skipped


@pytest.mark.parametrize("mask", ["amss+", "uniform"])
def test_grad_scaler_skips_an_inf_step_as_if_it_had_not_happened(mask):
    batches = _batches(8)
    m_inf, opt_inf, skipped = _run(batches, inject_inf_at=3, mask=mask)
    m_ref, opt_ref, _ = _run(batches, skip=3, mask=mask)
    assert skipped == 1
    # Loss scales are powers of two, so unscaled gradients are exact: everything is bit-identical.
    for (k, p), q in zip(m_inf.state_dict().items(), m_ref.state_dict().values()):
        assert torch.equal(p, q), k
    for p, q in zip(m_inf.parameters(), m_ref.parameters()):
        s_inf, s_ref = opt_inf.state[p], opt_ref.state[q]
        assert s_inf["step"] == s_ref["step"] == 7  # the skipped step did not advance the mask stream
        assert torch.equal(s_inf["momentum_buffer"], s_ref["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_under_autocast(dtype):
    torch.manual_seed(0)
    model = build_model({"a": (10,), "b": (6,)}, 4)
    opt = MaskedMultiModalSGD(modality_param_groups(model.encoders, shared=model.head), lr=0.05, momentum=0.9, mask="amss")
    est = ModalSignificance()
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in _batches(5):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
            loss = F.cross_entropy(out.logits, y)
        assert out.logits.dtype == dtype
        opt.zero_grad()
        loss.backward()
        rates = est({m: o.detach().float() for m, o in out.modality_logits.items()}, y)
        opt.step(rates=rates)
    for p, p0 in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and not torch.equal(p, p0)
    for m in ("a", "b"):  # the estimator's rates (default ratio rule: in [0.1, 1]) reached the step
        assert 0.1 <= float(rates[m]) <= 1.0
        assert opt.last_step_stats()[m].rate == rates[m]
