"""The one tolerance table, per dtype, for comparisons that cannot be exact."""

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def assert_close(actual, expected, dtype=None):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def assert_close_normwise(actual, expected, dtype=None):
    """Elementwise within the table, with the absolute part scaled by the tensor's largest magnitude.

    For results of sums with cancellation (a momentum buffer ``mu * b + (1 - tau) * d``), a fused
    multiply-add and a separate multiply and add differ by an ulp of the *terms*, not of the result,
    so the error is bounded relative to the tensor's scale (as in LAPACK's normwise tests).
    """
    dtype = dtype or expected.dtype
    tol = TOLERANCES[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)
