"""torch.library.opcheck on every masked_optim op (masked_optim/backends/_ops.py declares them).

opcheck runs each op for real and under fake tensors, checks the schema's mutation and aliasing
annotations against what the kernel does, the fake kernel's output metadata against the real one,
and tracing with AOTAutograd (dynamic shapes). Ops whose implementation is not loaded here (the
extension disabled or not built, triton missing) skip with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from masked_optim.backends import _cpp_lib, _ops
from masked_optim.modes import Mode

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _has_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_ops.NAMESPACE}::{name}", "CPU")


def _require_extension(name: str) -> None:
    if not _cpp_lib.available():
        pytest.skip(f"masked_optim::{name} has no implementation here: {_cpp_lib.unavailable_reason()}")
    assert _has_cpu_kernel(name), f"masked_optim._C loaded but registers no CPU kernel for {name}"


def _sgd_args(dtype, mode, channel, momentum, *, shape=(6, 5, 3), rate=0.4, given=False, nesterov=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    buf = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if momentum else torch.empty(0, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scalars = scores = None
    if given:  # the caller's [alpha, beta] (and per-channel scores), as the optimizer passes them
        scalars = torch.tensor([0.3, 0.05], dtype=acc)
        if channel:
            scores = grad.to(acc).reshape(shape[0], -1).square().sum(1)
    return (param, grad, buf, scores, scalars, 12345, rate, 0.5, 4, int(mode), channel, 0.05, momentum, 0.1,
            1e-2, nesterov, mode % 2 == 1, False)


SGD_CASES = [
    pytest.param(mode, channel, dtype, momentum, given,
                 id=f"{mode.name.lower()}-{'channel' if channel else 'element'}-{str(dtype)[6:]}"
                    f"-{'momentum' if momentum else 'plain'}{'-given' if given else ''}")
    for mode, channel, dtype, momentum, given in [
        (Mode.DENSE, False, torch.float32, 0.9, False),
        (Mode.UNIFORM, False, torch.float32, 0.0, False),
        (Mode.UNIFORM_UNBIASED, True, torch.float64, 0.9, False),
        (Mode.AMSS, True, torch.float32, 0.9, False),
        (Mode.AMSS, False, torch.float64, 0.0, False),
        (Mode.AMSS_PLUS, False, torch.float32, 0.9, False),
        (Mode.AMSS_PLUS, True, torch.float64, 0.0, False),
        (Mode.AMSS_PLUS, True, torch.float32, 0.9, True),
        (Mode.SCALE, False, torch.float32, 0.9, False),
        (Mode.SCALE, True, torch.float64, 0.0, False),
    ]
]


# ------------------------------------------------------------------------------ declarations
def test_every_op_is_declared_once_in_python():
    for name, schema in _ops.OPS.items():
        op = getattr(torch.ops.masked_optim, name).default
        assert str(op._schema) == f"{_ops.NAMESPACE}::{name}{schema}"
    assert _ops.OPS["masked_sgd_triton_"] == _ops.OPS["masked_sgd_"]  # one contract, one string


def test_cpp_sources_define_no_schema():
    """The C++ only registers implementations (build_info is the one C++ definition)."""
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".cpp", ".cu", ".h"):
            text = path.read_text()
            assert "TORCH_LIBRARY(" not in text, path
            defs = re.findall(r'm\.def\("([a-z_]+)', text)
            assert defs in ([], ["build_info"]), (path, defs)


def test_cpp_mode_enum_matches_python():
    text = (ROOT / "csrc" / "masked_sgd_math.h").read_text()
    body = re.search(r"enum Mode : int64_t \{(.*?)\};", text, re.S).group(1)
    values = {name: int(v) for name, v in re.findall(r"k(\w+) = (\d+)", body)}
    expected = {"".join(part.capitalize() for part in m.name.split("_")): int(m) for m in Mode}
    assert values == expected


def test_the_rule_is_stated_once_in_cpp():
    """q = min(1, alpha s + beta) and the SGD tail appear in csrc/masked_sgd_math.h only."""
    hits = {}
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".cpp", ".cu", ".h"):
            text = path.read_text()
            for what, pattern in (("clamp", r"> (acc_t|T)\(1\) \? (acc_t|T)\(1\)"),
                                  ("momentum", r"one_minus_dampening \* d"),
                                  ("update", r"lr \* d")):
                if re.search(pattern, text):
                    hits.setdefault(what, []).append(path.name)
    assert hits == {"clamp": ["masked_sgd_math.h"], "momentum": ["masked_sgd_math.h"], "update": ["masked_sgd_math.h"]}


# ------------------------------------------------------------------------------ opcheck, C++ ops
@pytest.mark.parametrize("mode,channel,dtype,momentum,given", SGD_CASES)
def test_opcheck_masked_sgd(mode, channel, dtype, momentum, given):
    _require_extension("masked_sgd_")
    args = _sgd_args(dtype, mode, channel, momentum, given=given, nesterov=mode == Mode.AMSS)
    torch.library.opcheck(torch.ops.masked_optim.masked_sgd_.default, args)


@pytest.mark.parametrize("mode", [Mode.UNIFORM, Mode.AMSS, Mode.AMSS_PLUS, Mode.SCALE], ids=lambda m: m.name.lower())
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_tensor_scalars(mode, channel, dtype):
    _require_extension("tensor_scalars")
    grad = torch.randn(7, 4, 3, dtype=dtype)
    for rate in (0.3, 1.0):  # rate 1: nothing sampled, no scores (the fake says so too)
        torch.library.opcheck(torch.ops.masked_optim.tensor_scalars.default, (grad, rate, 0.5, 4, int(mode), channel))
    # one element per slice is element granularity: no unit scores
    torch.library.opcheck(torch.ops.masked_optim.tensor_scalars.default,
                          (torch.randn(9, 1, dtype=dtype), 0.3, 0.5, 4, int(mode), channel))


@pytest.mark.parametrize("mode", [Mode.UNIFORM, Mode.AMSS_PLUS, Mode.SCALE], ids=lambda m: m.name.lower())
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
def test_opcheck_tensor_scalars_multi(mode, channel):
    _require_extension("tensor_scalars_multi")
    grads = [torch.randn(7, 4, 3), torch.randn(9, 1, dtype=torch.float64), torch.randn(5, dtype=torch.bfloat16)]
    for rate in (0.3, 1.0):
        torch.library.opcheck(torch.ops.masked_optim.tensor_scalars_multi.default, (grads, rate, 0.5, 4, int(mode), channel))


@pytest.mark.parametrize("mode", [Mode.DENSE, Mode.UNIFORM_UNBIASED, Mode.AMSS, Mode.AMSS_PLUS, Mode.SCALE],
                         ids=lambda m: m.name.lower())
@pytest.mark.parametrize("channel", [False, True], ids=["element", "channel"])
@pytest.mark.parametrize("given", [False, True], ids=["own-stage-1", "given"])
def test_opcheck_masked_sgd_multi(mode, channel, given):
    _require_extension("masked_sgd_multi_")
    cases = [_sgd_args(dtype, mode, channel, 0.9, shape=shape, given=given, seed=k)
             for k, (dtype, shape) in enumerate([(torch.float32, (6, 5, 3)), (torch.float64, (11,)), (torch.float16, (4, 9))])]
    params, grads, bufs = [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases]
    scores = [c[3] for c in cases]
    scalars = torch.tensor([[0.3, 0.05]] * 3, dtype=torch.float64) if given else None
    args = (params, grads, bufs, scores, scalars, [5, 6, 7], 0.4, 0.5, 4, int(mode), channel, 0.05, 0.9, 0.1, 1e-2,
            False, False, [True, False, False])
    torch.library.opcheck(torch.ops.masked_optim.masked_sgd_multi_.default, args)


@pytest.mark.parametrize("n", [1, 7, 4096 + 5])
def test_opcheck_philox_uniform(n):
    _require_extension("philox_uniform_")
    torch.library.opcheck(torch.ops.masked_optim.philox_uniform_.default, (torch.empty(n), 99))


def test_opcheck_can_fail():
    """A fake that lies about an output's dtype is caught: opcheck is not vacuous here."""
    lib = torch.library.Library("masked_optim_test_ops", "DEF")
    try:
        lib.define("twice(Tensor x) -> Tensor")
        lib.impl("twice", lambda x: x * 2, "CPU")
        torch.library.register_fake("masked_optim_test_ops::twice", lambda x: x.new_empty(x.shape, dtype=torch.float64),
                                    lib=lib)
        with pytest.raises(Exception):
            torch.library.opcheck(torch.ops.masked_optim_test_ops.twice.default, (torch.randn(3),))
    finally:
        lib._destroy()


def test_fake_kernels_need_no_extension():
    """Meta tensors trace through every declared op without running a kernel."""
    meta = torch.device("meta")
    p = torch.empty(5, 4, device=meta)
    kept, scalars = torch.ops.masked_optim.masked_sgd_(p, p, p, None, None, 1, 0.5, 0.5, 4, int(Mode.AMSS_PLUS), True,
                                                       0.1, 0.9, 0.0, 0.0, False, False, True)
    assert kept.shape == () and kept.dtype == torch.int64 and scalars.shape == (2,) and scalars.dtype == torch.float32
    kept, scalars = torch.ops.masked_optim.masked_sgd_triton_(p.double(), p.double(), p.double(), None, None, 1, 0.5,
                                                              0.5, 4, int(Mode.SCALE), False, 0.1, 0.0, 0.0, 0.0, False,
                                                              False, True)
    assert scalars.dtype == torch.float64
    s, sc, sq = torch.ops.masked_optim.tensor_scalars(p, 0.5, 0.5, 4, int(Mode.AMSS), True)
    assert s.shape == (2,) and sc.shape == (5,) and sq.dtype == torch.float64
    assert torch.ops.masked_optim.philox_uniform_(torch.empty(8, device=meta), 3) is None
    q = torch.empty(6, device=meta, dtype=torch.float64)
    s, sc, sq = torch.ops.masked_optim.tensor_scalars_multi([p, q], 0.5, 0.5, 4, int(Mode.AMSS), True)
    assert s.shape == (2, 2) and s.dtype == torch.float64 and sq.shape == (2,) and sq.dtype == torch.float64
    assert sc[0].shape == (5,) and sc[1].shape == (0,) and sc[1].dtype == torch.float64
    kept = torch.ops.masked_optim.masked_sgd_multi_([p, q], [p, q], [p, q], [None, None], s, [1, 2], 0.5, 0.5, 4,
                                                    int(Mode.AMSS_PLUS), False, 0.1, 0.9, 0.0, 0.0, False, False,
                                                    [True, True])
    assert kept.shape == (2,) and kept.dtype == torch.int64


# ------------------------------------------------------------------------------ opcheck, Triton op
def _triton_module():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    from masked_optim.backends import triton_kernels as tk

    ok, why = tk.triton_available()
    if not ok:
        pytest.skip(why)
    if not _has_cpu_kernel("masked_sgd_triton_"):
        pytest.skip("masked_optim::masked_sgd_triton_ runs on CPU tensors only under TRITON_INTERPRET=1")
    return tk


@pytest.mark.parametrize(
    "mode,channel,dtype,momentum",
    [(Mode.AMSS_PLUS, False, torch.float32, 0.9), (Mode.AMSS, True, torch.float64, 0.0),
     (Mode.UNIFORM_UNBIASED, False, torch.float32, 0.0), (Mode.SCALE, True, torch.float32, 0.9)],
    ids=["amss_plus-element-fp32-momentum", "amss-channel-fp64", "uniform_unbiased-element-fp32", "scale-channel-fp32"],
)
def test_opcheck_masked_sgd_triton(mode, channel, dtype, momentum, monkeypatch):
    tk = _triton_module()
    monkeypatch.setattr(tk, "OP_BLOCK", 4096)  # one program instance per launch in the interpreter
    args = _sgd_args(dtype, mode, channel, momentum)
    torch.library.opcheck(torch.ops.masked_optim.masked_sgd_triton_.default, args)


def test_triton_op_is_the_triton_function():
    """The op and masked_sgd_triton_ (what kernel_for("triton") returns) give the same step."""
    tk = _triton_module()
    a = _sgd_args(torch.float32, Mode.AMSS_PLUS, True, 0.9, seed=3)
    b = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a)
    kept_op, scalars_op = torch.ops.masked_optim.masked_sgd_triton_(*a)
    kept_fn, scalars_fn = tk.masked_sgd_triton_(*b)
    assert int(kept_op) == int(kept_fn) and torch.equal(scalars_op, scalars_fn)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
