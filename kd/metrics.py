"""Evaluation numbers as pure functions of labels, predictions and probabilities.

Every function accepts numpy arrays or CPU torch tensors and returns plain Python or numpy values,
so the results go straight into JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

ECE_BINS = 15


def as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def accuracy(labels, predictions) -> float:
    """Fraction of predictions equal to the labels."""
    labels, predictions = as_numpy(labels), as_numpy(predictions)
    if labels.shape != predictions.shape or labels.size == 0:
        raise ValueError(f"need two non-empty arrays of one shape, got {labels.shape} and {predictions.shape}")
    return float((labels == predictions).mean())


def agreement(predictions_a, predictions_b) -> float:
    """Top-1 agreement: the fraction of samples where two models predict the same class."""
    return accuracy(predictions_a, predictions_b)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Counts, shape (C, C): row = true class, column = predicted class; absent classes give zero rows."""
    return _sk_confusion_matrix(as_numpy(labels), as_numpy(predictions), labels=np.arange(num_classes))


def normalize_rows(matrix) -> np.ndarray:
    """Each row divided by its sum (a confusion matrix becomes per-class recall); empty rows stay 0."""
    matrix = as_numpy(matrix).astype(float)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def classification_scores(labels, predictions, class_names: Sequence[str]) -> dict:
    """Per-class precision, recall, F1 and support, plus their unweighted (macro) means.

    A class that is never predicted has precision 0 rather than a warning and NaN.
    """
    precision, recall, f1, support = precision_recall_fscore_support(
        as_numpy(labels), as_numpy(predictions), labels=np.arange(len(class_names)), zero_division=0)
    per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for name, p, r, f, s in zip(class_names, precision, recall, f1, support)}
    macro = {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}
    return {"per_class": per_class, "macro": macro}


def expected_calibration_error(probabilities, labels, num_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |acc(b) - conf(b)| * n_b / N over equal-width confidence bins (Guo et al., 2017).

    The confidence of a sample is its largest class probability; bin b holds the confidences in
    ((b - 1) / num_bins, b / num_bins].
    """
    probabilities, labels = as_numpy(probabilities), as_numpy(labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += abs(correct[members].mean() - confidence[members].mean()) * members.mean()
    return float(ece)
