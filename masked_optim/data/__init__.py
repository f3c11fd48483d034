"""Datasets. Each loader returns per-modality tensors split into train / validation / test."""

from .synthetic import SETTINGS, MultimodalSplits, modality_competition

__all__ = ["SETTINGS", "MultimodalSplits", "modality_competition"]
