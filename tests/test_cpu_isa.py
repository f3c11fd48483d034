"""Every hand-written CPU path of the C++ kernels, on one machine (csrc/cpu/masked_sgd_cpu.cpp).

The library picks the best path the CPU supports (AVX-512 intrinsics for Philox and the stage-1
pass, AVX2 intrinsics for the stage-1 pass, or portable loops) when it loads;
``MASKED_OPTIM_CPU_ISA=avx2|generic`` lowers it. Each path must give the results of the reference
(docs/algorithm.md §2.3-§2.6, §4): the kernel-parity tests of tests/test_backends.py run again in a
fresh process per path (the choice is made when the library loads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from masked_optim.backends import BackendUnavailable, _cpp_lib
from tolerances import TOLERANCES

ROOT = Path(__file__).resolve().parent.parent


def _require_cpp():
    if not _cpp_lib.available():
        if os.environ.get("MASKED_OPTIM_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the C++ extension is required here but unavailable: {_cpp_lib.unavailable_reason()}")
        pytest.skip(f"cpp unavailable: {_cpp_lib.unavailable_reason()}")


def _supported() -> list[str]:
    """The paths this CPU can run, best first (the one the library picked, and every lower one)."""
    best = _cpp_lib.build_info()["cpu_isa"]
    return list(_cpp_lib.ISA_CHOICES[_cpp_lib.ISA_CHOICES.index(best):])


def _run(code: str, isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{_cpp_lib.ISA_ENV: isa})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("isa", _cpp_lib.ISA_CHOICES)
def test_the_environment_lowers_the_path_and_build_info_reports_it(isa):
    _require_cpp()
    if isa not in _supported():
        pytest.skip(f"this CPU cannot run the {isa} path (best: {_supported()[0]})")
    proc = _run("from masked_optim.backends import _cpp_lib; print(_cpp_lib.build_info()['cpu_isa'])", isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


def test_an_invalid_path_is_refused_with_the_allowed_values():
    _require_cpp()
    code = (
        "from masked_optim.backends import _cpp_lib\n"
        "import torch\n"
        "from masked_optim import MaskedMultiModalSGD\n"
        "print(_cpp_lib.available())\n"
        "print(_cpp_lib.unavailable_reason())\n"
        "try:\n"
        "    MaskedMultiModalSGD([torch.zeros(2, requires_grad=True)], backend='cpp')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = _run(code, "sse9")
    assert proc.returncode == 0, proc.stderr
    available, reason, error = proc.stdout.strip().splitlines()
    assert available == "False"
    assert "MASKED_OPTIM_CPU_ISA='sse9'" in reason and "avx512" in reason and "generic" in reason
    assert error.startswith(BackendUnavailable.__name__) and "MASKED_OPTIM_CPU_ISA='sse9'" in error


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_kernel_parity_on_every_lower_path(isa):
    """The cpp kernel-parity tests (fp32, every mode and granularity; the other dtypes take the
    portable stage-1 pass on every path) and the stage-1 tests
    whose gradients defeat its sampled guess, in a process that runs the lower path."""
    _require_cpp()
    if isa not in _supported():
        pytest.skip(f"this CPU cannot run the {isa} path (best: {_supported()[0]})")
    env = dict(os.environ, **{_cpp_lib.ISA_ENV: isa})
    select = "cpp and float32 or sampled_guess or tensor_scalars_is_the_fused_stage_one"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_backends.py", "-q", "-p", "no:cacheprovider", "-k", select],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_optimizer_step_is_the_same_on_every_path(tmp_path):
    """One MaskedMultiModalSGD step per path, same key: the same kept counts and parameters (the
    paths sum in different orders, so the scalars may differ by rounding: parameters within float32
    tolerance; kept counts equal unless a uniform falls within that rounding of its q)."""
    _require_cpp()
    code = (
        "import torch\n"
        "from masked_optim import MaskedMultiModalSGD\n"
        "torch.manual_seed(0)\n"
        "p = torch.randn(300_000, requires_grad=True); p.grad = torch.randn(300_000) * torch.rand(300_000) ** 4\n"
        "opt = MaskedMultiModalSGD([{'params': [p], 'modality': 'm'}], lr=0.1, momentum=0.9, mask='amss+', backend='cpp')\n"
        "opt.step(rates={'m': 0.3})\n"
        "print(opt.last_step_stats()['m'].kept_units)\n"
        "torch.save(p.detach(), 'ISA_OUT')\n"
    )
    outs = {}
    for isa in _supported():
        path = tmp_path / f"{isa}.pt"
        proc = _run(code.replace("ISA_OUT", str(path)), isa)
        assert proc.returncode == 0, proc.stderr
        outs[isa] = (int(proc.stdout.strip()), torch.load(path))
    assert len(outs) >= 2 or _supported() == ["generic"]
    (k0, p0), *rest = outs.values()
    for k, p in rest:
        assert abs(k - k0) <= 2, outs.keys()
        torch.testing.assert_close(p, p0, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("low", _cpp_lib.PHILOX_LOW_CHOICES)
def test_both_philox_products_draw_the_reference_uniforms(low):
    """The AVX-512 Philox forms the low words of its products by vpmulld or by a shuffle of the
    products it forms anyway (csrc/cpu/masked_sgd_cpu.cpp, picked by CPU vendor): each must give the
    reference's uniforms (docs/algorithm.md §4), through philox_uniform_ and through the fused step."""
    _require_cpp()
    if "avx512" not in _supported():
        pytest.skip("this CPU has no AVX-512 path")
    code = (
        "import torch\n"
        "from masked_optim.backends import _cpp_lib\n"
        "from masked_optim.rng import philox_uniform\n"
        "from masked_optim.functional import masked_sgd\n"
        "print(_cpp_lib.build_info()['philox_low'])\n"
        "for key in (0, 1, 2**32 + 5, 2**63 - 1):\n"
        "    for n in (4, 4097, 278011):\n"
        "        out = torch.empty(n)\n"
        "        torch.ops.masked_optim.philox_uniform_(out, key)\n"
        "        assert torch.equal(out, philox_uniform(key, n)), (key, n)\n"
        "g = torch.randn(70_000)\n"
        "p, ref = torch.zeros(70_000), torch.zeros(70_000)\n"
        "k = torch.ops.masked_optim.masked_sgd_(p, g, torch.empty(0), None, torch.tensor([0.0, 0.3]), 99, 0.3, 0.5, 4, 1,\n"
        "                                       False, 1.0, 0.0, 0.0, 0.0, False, False, False)[0]\n"
        "kept = masked_sgd([ref], [g], [None], [99], lr=1.0, mask='uniform', rate=0.3)\n"
        "assert torch.equal(p, ref) and int(k) == int(kept[0]), (int(k), kept)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, **{_cpp_lib.PHILOX_LOW_ENV: low}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [low, "ok"]


def test_an_invalid_philox_choice_is_refused_with_the_allowed_values():
    _require_cpp()
    code = "from masked_optim.backends import _cpp_lib\nprint(_cpp_lib.available(), _cpp_lib.unavailable_reason())\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, **{_cpp_lib.PHILOX_LOW_ENV: "vpmul"}))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False invalid MASKED_OPTIM_PHILOX_LOW='vpmul'") and "shuffle" in proc.stdout


def test_the_prefetch_distance_changes_no_result(tmp_path):
    """MASKED_OPTIM_PREFETCH sets the software prefetch distance of the streaming passes (by CPU
    vendor when unset; build_info reports it): the same step with none and with a long one."""
    _require_cpp()
    code = (
        "import torch\n"
        "from masked_optim import MaskedMultiModalSGD\n"
        "from masked_optim.backends import _cpp_lib\n"
        "torch.manual_seed(0)\n"
        "ps = [torch.randn(n, requires_grad=True) for n in (300_000, 70_001, 5)]\n"
        "for p in ps: p.grad = torch.randn(p.shape) * torch.rand(p.shape) ** 4\n"
        "outs = []\n"
        "for mask in ('amss+', 'uniform', 'scale'):\n"
        "    opt = MaskedMultiModalSGD([{'params': ps, 'modality': 'm'}], lr=0.1, momentum=0.9, mask=mask, backend='cpp')\n"
        "    opt.step(rates={'m': 0.3}); opt.step(rates={'m': 0.3})\n"
        "    outs.append(opt.last_step_stats()['m'].kept_units)\n"
        "print(_cpp_lib.build_info()['prefetch'], outs)\n"
        "torch.save([p.detach() for p in ps], 'OUT')\n"
    )
    results = {}
    for bytes_ in ("0", "65536"):
        path = tmp_path / f"{bytes_}.pt"
        proc = subprocess.run([sys.executable, "-c", code.replace("OUT", str(path))], capture_output=True, text=True,
                              cwd=ROOT, timeout=600, env=dict(os.environ, **{_cpp_lib.PREFETCH_ENV: bytes_}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        reported, kept = proc.stdout.split(" ", 1)
        assert reported == bytes_
        results[bytes_] = (kept, torch.load(path))
    assert results["0"][0] == results["65536"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["0"][1], results["65536"][1]))


@pytest.mark.parametrize("bad", ["-5", "lots", str((1 << 20) + 1)])
def test_an_invalid_prefetch_distance_is_refused(bad):
    _require_cpp()
    code = "from masked_optim.backends import _cpp_lib\nprint(_cpp_lib.available(), _cpp_lib.unavailable_reason())\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, **{_cpp_lib.PREFETCH_ENV: bad}))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"False invalid MASKED_OPTIM_PREFETCH={bad!r}") and "bytes" in proc.stdout
