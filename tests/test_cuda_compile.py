"""The CUDA kernels of masked_sgd_ and masked_adamw_ compile with nvcc alone (no GPU, no CUDA build of torch needed).

csrc/cuda/masked_sgd_cuda.cu includes no torch header, so `nvcc -c` checks it for the
architectures the package targets. Each compile takes a few seconds (about 6-8 s on a 2-core box).
The torch binding (masked_sgd_cuda_binding.cpp) needs the CUDA build of torch's headers and is not
compiled here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "csrc" / "cuda" / "masked_sgd_cuda.cu"
NVCC = shutil.which("nvcc")
# The launchers masked_sgd_cuda_binding.cpp calls (declared in masked_sgd_cuda.h).
LAUNCHERS = ("launch_channel_scores", "launch_inclusion_scalars", "launch_fill_scalars", "launch_masked_sgd_update",
             "launch_masked_adamw_update")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels cannot be compiled here")


@pytest.mark.parametrize("arch", ["80", "90"], ids=["sm_80", "sm_90"])
def test_kernel_compiles(arch: str, tmp_path: Path) -> None:
    obj = tmp_path / f"masked_sgd_cuda_sm{arch}.o"
    cmd = [
        NVCC,
        "-c",
        "-std=c++17",
        "-O3",
        "-I",
        str(ROOT / "csrc"),
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        str(KERNEL),
        "-o",
        str(obj),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert obj.is_file() and obj.stat().st_size > 0, f"nvcc reported success but wrote no object file {obj}"
    nm = shutil.which("nm")
    if nm is not None:  # the binding's launchers are defined (the AdamW one included)
        symbols = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
        for launcher in LAUNCHERS:
            assert f"masked_optim::cuda::{launcher}(" in symbols, f"{launcher} is not defined in {obj}"
