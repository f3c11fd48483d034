"""The experiment harness: datasets, models, one training loop for every method, the comparison
CLI, metrics and the baselines (OGM-GE, Diagnosing & Re-learning).

None of it is needed to use the optimizer: ``import masked_optim`` imports torch alone, and this
subpackage is imported only when asked for (``masked_optim.experiments``, the ``masked-optim``
command). The datasets need the ``data`` extra (numpy, matplotlib)::

    from masked_optim.experiments import TrainConfig, train, OGMGE, DiagnoseRelearn, MultimodalNet, AttentionFusionNet
"""

from .models import AttentionFusionNet, MultimodalNet, build_model
from .modulation import OGMGE, ModulationStats
from .relearn import DiagnoseRelearn, Diagnosis
from .training import TrainConfig, train

__all__ = [
    "OGMGE",
    "ModulationStats",
    "DiagnoseRelearn",
    "Diagnosis",
    "MultimodalNet",
    "AttentionFusionNet",
    "build_model",
    "TrainConfig",
    "train",
]
