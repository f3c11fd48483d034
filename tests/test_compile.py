"""A training step that calls ``opt.step()`` under ``torch.compile`` (inductor, CPU).

The optimizer step is excluded from tracing on purpose (``torch.compiler.disable``, see
``MaskedOptimizer.step``): the compiled function's forward and backward are compiled, the step runs
eagerly at a graph break. What must hold: every mode and backend runs, the rates may change every
step (``set_rates`` outside, or ``step(rates=...)`` inside the compiled function), and nothing
recompiles after the first steps (30 steps, the number of distinct graphs counted).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from masked_optim import ConcatFusion, MaskedMultiModalAdamW, MaskedMultiModalSGD, modality_param_groups
from masked_optim.backends import backend_status

STEPS = 30


def _model():
    torch.manual_seed(0)
    enc = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 8), "b": torch.nn.Linear(4, 8)})
    return enc, ConcatFusion({"a": 8, "b": 8}, 3)


CASES = [
    pytest.param(MaskedMultiModalSGD, "amss+", "cpp", False, id="sgd-amss+-cpp-set_rates"),
    pytest.param(MaskedMultiModalSGD, "scale", "reference", True, id="sgd-scale-reference-step_rates"),
    pytest.param(MaskedMultiModalSGD, "uniform", "reference", False, id="sgd-uniform-reference-set_rates"),
    pytest.param(MaskedMultiModalAdamW, "amss", "cpp", True, id="adamw-amss-cpp-step_rates"),
]


@pytest.mark.slow
@pytest.mark.parametrize("cls,mask,backend,rates_inside", CASES)
def test_compiled_training_step_runs_without_recompiling(cls, mask, backend, rates_inside):
    if backend_status(backend, torch.device("cpu"), "adamw" if cls is MaskedMultiModalAdamW else "sgd") is not None:
        pytest.skip(f"{backend} unavailable here")
    torch._dynamo.reset()
    counters.clear()
    enc, head = _model()
    kwargs = {"momentum": 0.9} if cls is MaskedMultiModalSGD else {}
    opt = cls(modality_param_groups(enc, shared=head), lr=0.05, mask=mask, backend=backend, **kwargs)

    def train_step(x, y, rates):
        out = head({m: enc[m](x[m]) for m in enc})
        loss = torch.nn.functional.cross_entropy(out.logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step(rates=rates) if rates_inside else opt.step()
        return loss.detach()

    compiled = torch.compile(train_step, backend="inductor")
    gen = torch.Generator().manual_seed(1)
    graphs, before = [], [p.detach().clone() for p in enc.parameters()]
    for i in range(STEPS):
        x = {"a": torch.randn(16, 6, generator=gen), "b": torch.randn(16, 4, generator=gen)}
        y = torch.randint(3, (16,), generator=gen)
        rates = {"a": 0.3 + 0.02 * i, "b": 0.95 - 0.01 * i}  # a new rate every step
        if not rates_inside:
            opt.set_rates(rates)
        loss = compiled(x, y, rates if rates_inside else None)
        assert torch.isfinite(loss)
        graphs.append(counters["stats"]["unique_graphs"])
        stats = opt.last_step_stats()
        assert stats["a"].rate == rates["a"] and stats["a"].backend == backend
    assert graphs[2] == graphs[-1], f"recompiled after warm-up: distinct graphs per step {graphs}"
    assert graphs[-1] <= 4, graphs
    assert all(not torch.equal(p, q) for p, q in zip(enc.parameters(), before))
    assert opt.state[next(iter(enc["a"].parameters()))]["step"] == STEPS  # every step ran


@pytest.mark.parametrize("cls", [MaskedMultiModalSGD, MaskedMultiModalAdamW])
def test_fullgraph_is_refused_by_the_graph_break(cls):
    """The documented difference: fullgraph=True cannot hold the step, which is never traced."""
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(4))
    opt = cls([{"params": [p], "modality": "a"}], lr=0.1)
    p.grad = torch.ones(4)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"torch.compiler.disable\(\)`d function"):
        torch.compile(lambda: opt.step(), fullgraph=True)()
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before)
