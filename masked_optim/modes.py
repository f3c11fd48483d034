"""The kernel mode codes, stated once for Python (docs/algorithm.md §2.5).

Every fused kernel (C++ CPU, CUDA, Triton) takes the masked-gradient rule as one small integer.
The C++ kernels read the same values from ``csrc/masked_sgd_math.h`` (``enum Mode``); the
optimizer, the Triton kernels, the fake (meta) kernels and the tests use :class:`Mode`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Optional

__all__ = ["Mode"]


class Mode(IntEnum):
    """How a kernel turns the gradient ``g`` of a unit into the masked gradient ``g~``.

    ``q`` is the unit's inclusion probability, ``M`` its Bernoulli(q) keep bit, ``rho`` the rate.
    """

    DENSE = 0  #: ``g~ = g`` (masking off: exactly torch.optim.SGD)
    UNIFORM = 1  #: ``q = rho``, ``g~ = M g``
    UNIFORM_UNBIASED = 2  #: ``q = rho``, ``g~ = M g / rho``
    AMSS = 3  #: importance-sampled ``q``, ``g~ = M g`` (biased)
    AMSS_PLUS = 4  #: importance-sampled ``q``, ``g~ = M g / q`` (unbiased)
    SCALE = 5  #: ``g~ = rho g``: no sampling, no random numbers

    @classmethod
    def of(cls, mask: str, unbiased: Optional[bool] = None) -> "Mode":
        """The mode of an optimizer's ``mask`` / ``unbiased`` options (``unbiased=None``: the mask's own)."""
        if mask == "none":
            return cls.DENSE
        if mask == "uniform":
            return cls.UNIFORM_UNBIASED if unbiased else cls.UNIFORM
        if mask == "amss" and not unbiased:
            return cls.AMSS
        if mask == "amss+" and unbiased in (None, True):
            return cls.AMSS_PLUS
        if mask == "scale" and not unbiased:
            return cls.SCALE
        raise ValueError(
            f"Invalid mask={mask!r} with unbiased={unbiased!r}; allowed: 'none', 'uniform' (unbiased None, "
            "False or True), 'amss' / 'scale' (unbiased None or False), 'amss+' (unbiased None or True)"
        )

    @property
    def mask(self) -> str:
        """The optimizer's ``mask`` option for this mode."""
        return _MASKS[self]

    @property
    def unbiased(self) -> bool:
        """Whether kept units are divided by their inclusion probability."""
        return self in (Mode.UNIFORM_UNBIASED, Mode.AMSS_PLUS)

    @property
    def sampled(self) -> bool:
        """Whether the mode draws random numbers (every mode but DENSE and SCALE)."""
        return self not in (Mode.DENSE, Mode.SCALE)

    @property
    def importance(self) -> bool:
        """Whether ``q`` depends on the gradient (AMSS, AMSS+): only these have a stage 1."""
        return self in (Mode.AMSS, Mode.AMSS_PLUS)


_MASKS = {
    Mode.DENSE: "none",
    Mode.UNIFORM: "uniform",
    Mode.UNIFORM_UNBIASED: "uniform",
    Mode.AMSS: "amss",
    Mode.AMSS_PLUS: "amss+",
    Mode.SCALE: "scale",
}
