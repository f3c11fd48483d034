"""The ``masked_optim`` ops, declared once and device-neutral, with their fake kernels beside them.

Each schema below is defined here (``torch.library.Library("masked_optim", "FRAGMENT")``) and
nowhere else; implementations register per device:

* ``masked_sgd_``, ``masked_adamw_``, ``tensor_scalars``, ``philox_uniform_``: the compiled extension
  ``masked_optim._C`` (``TORCH_LIBRARY_IMPL`` for CPU in csrc/cpu/masked_sgd_cpu.cpp, for CUDA in
  csrc/cuda/masked_sgd_cuda_binding.cpp). :mod:`._cpp_lib` imports this module before loading it.
  The extension itself only defines ``build_info`` (csrc/module.cpp), in a fragment of the namespace.
* ``masked_sgd_triton_``, ``masked_adamw_triton_``: the Triton kernels (:mod:`.triton_kernels`,
  registered for CUDA, and for CPU under ``TRITON_INTERPRET=1``), with the schemas of
  ``masked_sgd_`` and ``masked_adamw_`` (one string each, shared).

The fake ("meta") kernels give the output shapes without running anything, for ``torch.compile``
and meta tensors; tests/test_ops.py runs ``torch.library.opcheck`` on every op. Importing this
module needs torch alone (no extension, no triton); importing it twice is harmless (the module is
cached; a re-definition would be refused by the dispatcher).
"""

from __future__ import annotations

import torch

from ..modes import Mode

__all__ = ["NAMESPACE", "MASKED_SGD_ARGS", "MASKED_ADAMW_ARGS", "OPS", "LIB"]

NAMESPACE = "masked_optim"

# The kernel contract of one tensor's masked SGD step (masked_optim/backends/__init__.py): updates
# param and momentum_buffer in place, returns (kept units: int64 0-d, [alpha, beta] in the compute dtype).
# kernel_mode is a masked_optim.modes.Mode. It is not called `mode`: torch.compile functionalises a
# mutating op through the higher-order op auto_functionalized, whose dispatch-mode handler takes
# (mode, *args, **kwargs) and would receive `mode` twice ("got multiple values for argument 'mode'",
# torch 2.13; tests/test_ops.py runs that path). Callers pass it positionally, as the contract does.
MASKED_SGD_ARGS = (
    "(Tensor(a!) param, Tensor grad, Tensor(b!) momentum_buffer, Tensor? scores, Tensor? scalars, int key, "
    "float rate, float smoothing, int max_iter, int kernel_mode, bool channel, float lr, float momentum, "
    "float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step) -> (Tensor, Tensor)"
)

# The kernel contract of one tensor's masked (lazy) AdamW step, docs/algorithm.md §2.8: updates param,
# exp_avg, exp_avg_sq and (amsgrad) max_exp_avg_sq in place for the kept units only; `step` is the
# tensor's step count after this step's increment (the caller increments the state's step tensor);
# max_exp_avg_sq is an empty tensor without amsgrad. kernel_mode is 1..4 (uniform, uniform unbiased,
# amss, amss+): the dense and scale steps are torch.optim.AdamW's own. Returns what masked_sgd_ returns.
MASKED_ADAMW_ARGS = (
    "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) max_exp_avg_sq, "
    "Tensor? scores, Tensor? scalars, int key, float rate, float smoothing, int max_iter, int kernel_mode, "
    "bool channel, float lr, float beta1, float beta2, float eps, float weight_decay, float step, bool amsgrad, "
    "bool maximize) -> (Tensor, Tensor)"
)

# name -> schema (without the name); the compiled and Triton implementations register against these.
OPS = {
    # Fills `out` in place and returns nothing: torch.compile cannot functionalise a custom op whose
    # output aliases an input (`-> Tensor(a!)`).
    "philox_uniform_": "(Tensor(a!) out, int key) -> ()",
    "masked_sgd_": MASKED_SGD_ARGS,
    # Stage 1 of masked_sgd_ alone: ([alpha, beta], unit scores or empty, sum of g^2 as float64).
    "tensor_scalars": "(Tensor grad, float rate, float smoothing, int max_iter, int mode, bool channel) "
    "-> (Tensor, Tensor, Tensor)",
    # The multi-tensor forms (CPU; one call per param group): tensor_scalars of every gradient, as
    # ([n, 2] float64 [alpha, beta] per tensor, the scores of each, [n] float64 sums of g^2), and
    # masked_sgd_ of every tensor with shared hyper-parameters, returning the [n] int64 kept counts.
    "tensor_scalars_multi": "(Tensor[] grads, float rate, float smoothing, int max_iter, int mode, bool channel) "
    "-> (Tensor, Tensor[], Tensor)",
    "masked_sgd_multi_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] scores, "
    "Tensor? scalars, int[] keys, float rate, float smoothing, int max_iter, int kernel_mode, bool channel, float lr, "
    "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool[] first_steps) -> Tensor",
    "masked_sgd_triton_": MASKED_SGD_ARGS,
    "masked_adamw_": MASKED_ADAMW_ARGS,
    "masked_adamw_triton_": MASKED_ADAMW_ARGS,
}

LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive here: its registrations die with it
for _name, _schema in OPS.items():
    LIB.define(_name + _schema)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ fake kernels
@torch.library.register_fake(f"{NAMESPACE}::philox_uniform_", lib=LIB)
def _philox_uniform_fake(out: torch.Tensor, key: int) -> None:
    torch._check(out.dtype == torch.float32, lambda: f"philox_uniform_: out must be float32, got {out.dtype}")
    torch._check(out.is_contiguous(), lambda: "philox_uniform_: out must be contiguous")


def _masked_sgd_fake(param, grad, momentum_buffer, scores, scalars, key, rate, smoothing, max_iter, kernel_mode,
                     channel, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    torch._check(grad.shape == param.shape, lambda: f"masked_sgd_: grad shape {grad.shape} != param shape {param.shape}")
    torch._check(Mode.DENSE <= kernel_mode <= Mode.SCALE,
                 lambda: f"masked_sgd_: kernel_mode must be in 0..5, got {kernel_mode}")
    return param.new_empty((), dtype=torch.int64), param.new_empty((2,), dtype=_acc_dtype(param.dtype))


torch.library.register_fake(f"{NAMESPACE}::masked_sgd_", _masked_sgd_fake, lib=LIB)
torch.library.register_fake(f"{NAMESPACE}::masked_sgd_triton_", _masked_sgd_fake, lib=LIB)


def _masked_adamw_fake(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scores, scalars, key, rate, smoothing,
                       max_iter, kernel_mode, channel, lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize):
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        torch._check(t.shape == param.shape, lambda: f"masked_adamw_: {name} shape {t.shape} != param shape {param.shape}")
    torch._check(Mode.UNIFORM <= kernel_mode <= Mode.AMSS_PLUS,
                 lambda: f"masked_adamw_: kernel_mode must be in 1..4, got {kernel_mode}")
    return param.new_empty((), dtype=torch.int64), param.new_empty((2,), dtype=_acc_dtype(param.dtype))


torch.library.register_fake(f"{NAMESPACE}::masked_adamw_", _masked_adamw_fake, lib=LIB)
torch.library.register_fake(f"{NAMESPACE}::masked_adamw_triton_", _masked_adamw_fake, lib=LIB)


@torch.library.register_fake(f"{NAMESPACE}::tensor_scalars", lib=LIB)
def _tensor_scalars_fake(grad, rate, smoothing, max_iter, mode, channel):
    torch._check(Mode.UNIFORM <= mode <= Mode.SCALE, lambda: f"tensor_scalars: mode must be in 1..5, got {mode}")
    acc = _acc_dtype(grad.dtype)
    # Unit scores are returned for sampled steps (rate < 1, not scale) of channel granularity with more
    # than one element per slice (one element per slice is element granularity: no scores).
    per_slice = channel and grad.dim() > 0 and grad.shape[0] > 0 and grad.numel() // grad.shape[0] != 1
    units = grad.shape[0] if per_slice and mode != Mode.SCALE and rate < 1.0 else 0
    return grad.new_empty((2,), dtype=acc), grad.new_empty((units,), dtype=acc), grad.new_empty((), dtype=torch.float64)


def _per_slice(grad, channel: bool) -> bool:
    return channel and grad.dim() > 0 and grad.shape[0] > 0 and grad.numel() // grad.shape[0] != 1


@torch.library.register_fake(f"{NAMESPACE}::tensor_scalars_multi", lib=LIB)
def _tensor_scalars_multi_fake(grads, rate, smoothing, max_iter, mode, channel):
    torch._check(Mode.UNIFORM <= mode <= Mode.SCALE, lambda: f"tensor_scalars_multi: mode must be in 1..5, got {mode}")
    scores = []
    for g in grads:
        units = g.shape[0] if _per_slice(g, channel) and mode != Mode.SCALE and rate < 1.0 else 0
        scores.append(g.new_empty((units,), dtype=_acc_dtype(g.dtype)))
    n, new = len(grads), (grads[0].new_empty if grads else torch.empty)
    return new((n, 2), dtype=torch.float64), scores, new((n,), dtype=torch.float64)


@torch.library.register_fake(f"{NAMESPACE}::masked_sgd_multi_", lib=LIB)
def _masked_sgd_multi_fake(params, grads, momentum_buffers, scores, scalars, keys, rate, smoothing, max_iter,
                           kernel_mode, channel, lr, momentum, dampening, weight_decay, nesterov, maximize, first_steps):
    n = len(params)
    for name, seq in (("grads", grads), ("momentum_buffers", momentum_buffers), ("scores", scores), ("keys", keys),
                      ("first_steps", first_steps)):
        torch._check(len(seq) == n, lambda: f"masked_sgd_multi_: {name} must have one entry per param ({n}), got {len(seq)}")
    for p, g in zip(params, grads):
        torch._check(g.shape == p.shape, lambda: f"masked_sgd_multi_: grad shape {g.shape} != param shape {p.shape}")
    torch._check(Mode.DENSE <= kernel_mode <= Mode.SCALE,
                 lambda: f"masked_sgd_multi_: kernel_mode must be in 0..5, got {kernel_mode}")
    return (params[0].new_empty if params else torch.empty)((n,), dtype=torch.int64)
