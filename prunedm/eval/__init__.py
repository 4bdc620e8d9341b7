"""Evaluation: the digits classifier (FID features, sample accuracy); FID and sampling as they land."""

from prunedm.eval.classifier import DigitsClassifier, accuracy, train_classifier

__all__ = ["DigitsClassifier", "accuracy", "train_classifier"]
