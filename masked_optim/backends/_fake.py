"""Shape-only ("fake") kernels of the compiled ops, so they trace under torch.compile and meta."""

from __future__ import annotations

import torch


@torch.library.register_fake("masked_optim::philox_uniform_")
def _philox_uniform_fake(out: torch.Tensor, key: int) -> torch.Tensor:
    torch._check(out.dtype == torch.float32, lambda: f"philox_uniform_: out must be float32, got {out.dtype}")
    torch._check(out.is_contiguous(), lambda: "philox_uniform_: out must be contiguous")
    return out


@torch.library.register_fake("masked_optim::masked_sgd_")
def _masked_sgd_fake(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, mode, channel,
                     lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    torch._check(grad.shape == param.shape, lambda: f"masked_sgd_: grad shape {grad.shape} != param shape {param.shape}")
    torch._check(0 <= mode <= 5, lambda: f"masked_sgd_: mode must be in 0..5, got {mode}")
    acc = torch.float64 if param.dtype == torch.float64 else torch.float32
    return param.new_empty((), dtype=torch.int64), param.new_empty((2,), dtype=acc)


@torch.library.register_fake("masked_optim::tensor_scalars")
def _tensor_scalars_fake(grad, rate, smoothing, max_iter, mode, channel):
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    units = (grad.shape[0] if grad.dim() else 1) if channel and mode != 5 else 0  # scale (5) has no scores
    return grad.new_empty((2,), dtype=acc), grad.new_empty((units,), dtype=acc), grad.new_empty((), dtype=torch.float64)
