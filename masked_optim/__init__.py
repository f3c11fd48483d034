"""masked_optim: balanced multimodal learning by masked, importance-sampled SGD (AMSS / AMSS+)."""

from .backends import BackendUnavailable
from .functional import masked_gradient, masked_sgd
from .fusion import ConcatFusion, FusionOutput, modality_param_groups, slice_logits
from .models import MultimodalNet, build_model
from .modulation import OGMGE, ModulationStats
from .optim import MaskedMultiModalSGD, ModalityStats, StepStats
from .relearn import DiagnoseRelearn, Diagnosis
from .significance import ModalSignificance, SignificanceStats
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "MaskedMultiModalSGD",
    "ModalSignificance",
    "SignificanceStats",
    "StepStats",
    "ModalityStats",
    "modality_param_groups",
    "ConcatFusion",
    "FusionOutput",
    "slice_logits",
    "masked_sgd",
    "masked_gradient",
    "BackendUnavailable",
    "OGMGE",
    "DiagnoseRelearn",
    "Diagnosis",
    "ModulationStats",
    "MultimodalNet",
    "build_model",
    "TrainConfig",
    "train",
    "__version__",
]
