"""Datasets that ship with installed packages, so that everything runs offline."""

from prunedm.data.digits import DigitsDataset

__all__ = ["DigitsDataset"]
