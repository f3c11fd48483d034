"""The library is importable with torch alone; the experiment harness is a separate subpackage."""

import subprocess
import sys
import warnings

import pytest

BLOCKED = ("numpy", "matplotlib")


def test_import_and_step_without_numpy_or_matplotlib():
    """`import masked_optim` and a masked step work with numpy and matplotlib unimportable
    (``sys.modules[name] = None`` makes every import of them raise ModuleNotFoundError), and none
    of the harness is imported on the way."""
    code = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
import torch
import masked_optim
from masked_optim import MaskedMultiModalSGD, ModalSignificance, modality_param_groups
a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
opt = MaskedMultiModalSGD(modality_param_groups({{"a": a, "b": b}}), lr=0.1, mask="amss+")
(a(torch.ones(2, 4)).sum() + b(torch.ones(2, 4)).sum()).backward()
before = a.weight.detach().clone()
opt.step(rates={{"a": 0.5}})
assert not torch.equal(before, a.weight), "the step changed nothing"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None)
assert not loaded, loaded
harness = sorted(m for m in sys.modules if m.startswith("masked_optim.experiments"))
assert not harness, harness
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_blocking_is_effective():
    """The block above can fail: the harness needs numpy, so importing it under the block raises."""
    code = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
import masked_optim.experiments.data
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


@pytest.mark.parametrize("name", ["train", "TrainConfig", "OGMGE", "DiagnoseRelearn", "MultimodalNet", "build_model"])
def test_moved_names_still_resolve_with_a_warning(name):
    import masked_optim
    import masked_optim.experiments as experiments

    with pytest.warns(DeprecationWarning, match=f"masked_optim.experiments.{name}"):
        obj = getattr(masked_optim, name)
    assert obj is getattr(experiments, name)


def test_unknown_attribute_is_an_attribute_error():
    import masked_optim

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
            masked_optim.nonexistent  # noqa: B018
