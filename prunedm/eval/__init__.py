"""Evaluation: the digits classifier (FID features, sample accuracy), FID through clean-fid, sampling."""

from prunedm.eval.classifier import DigitsClassifier, accuracy, train_classifier
from prunedm.eval.fid import classifier_statistics, compute_fid, evaluate_samples

__all__ = [
    "DigitsClassifier",
    "accuracy",
    "classifier_statistics",
    "compute_fid",
    "evaluate_samples",
    "train_classifier",
]
