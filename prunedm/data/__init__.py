"""Datasets that ship with installed packages, so that everything runs offline, and images with their
conditioning."""

from prunedm.data.conditioned import ConditionedImages
from prunedm.data.digits import DigitsDataset

__all__ = ["ConditionedImages", "DigitsDataset"]
