"""masked_optim: balanced multimodal learning by masked, importance-sampled SGD and AdamW (AMSS / AMSS+).

The library needs torch alone: the optimizer, the modal-significance estimator, the functional
reference, the RNG, the fusion helpers and the backends. The experiment harness (datasets, models,
training loop, CLI, baselines) lives in :mod:`masked_optim.experiments`.
"""

from __future__ import annotations

import importlib
import warnings

from .adamw import MaskedMultiModalAdamW
from .backends import BackendUnavailable
from .balancer import Balancer
from .functional import masked_adamw, masked_gradient, masked_sgd
from .fusion import ConcatFusion, FusionOutput, modality_param_groups, slice_logits
from .modes import Mode
from .optim import MaskedMultiModalSGD, ModalityStats, StepStats
from .probes import ModalityProbes
from .significance import ModalSignificance, SignificanceStats

__version__ = "0.1.0"

__all__ = [
    "MaskedMultiModalSGD",
    "MaskedMultiModalAdamW",
    "Balancer",
    "ModalSignificance",
    "ModalityProbes",
    "SignificanceStats",
    "StepStats",
    "ModalityStats",
    "modality_param_groups",
    "ConcatFusion",
    "FusionOutput",
    "slice_logits",
    "masked_sgd",
    "masked_adamw",
    "masked_gradient",
    "Mode",
    "BackendUnavailable",
    "__version__",
]

# Names that lived here before the harness moved to masked_optim.experiments: still importable
# (lazily, so that `import masked_optim` never reaches numpy), with a warning naming the new path.
_MOVED = {
    "OGMGE": "masked_optim.experiments",
    "ModulationStats": "masked_optim.experiments",
    "DiagnoseRelearn": "masked_optim.experiments",
    "Diagnosis": "masked_optim.experiments",
    "MultimodalNet": "masked_optim.experiments",
    "build_model": "masked_optim.experiments",
    "TrainConfig": "masked_optim.experiments",
    "train": "masked_optim.experiments",
}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(
            f"masked_optim.{name} moved to {_MOVED[name]}.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'masked_optim' has no attribute {name!r}")
