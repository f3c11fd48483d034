"""Shape-only ("fake") kernels of the compiled ops, so they trace under torch.compile and meta."""

from __future__ import annotations

import torch


@torch.library.register_fake("masked_optim::philox_uniform_")
def _philox_uniform_fake(out: torch.Tensor, key: int) -> torch.Tensor:
    torch._check(out.dtype == torch.float32, lambda: f"philox_uniform_: out must be float32, got {out.dtype}")
    torch._check(out.is_contiguous(), lambda: "philox_uniform_: out must be contiguous")
    return out
