"""GLUE metrics as GLUE defines them, and the metric that picks the best dev epoch.

CoLA: Matthews correlation (``mcc``). STS-B: Pearson and Spearman correlation. MRPC, QQP:
accuracy and F1 of the positive class. Every other task: accuracy. MNLI's matched and
mismatched dev sets are scored separately by the caller (one call per split).

Best-epoch selection uses :data:`PRIMARY_METRIC`: ``mcc`` for CoLA, ``pearson`` for STS-B and
``accuracy`` elsewhere, MRPC and QQP included, because the MELoRA and LoRA papers report
MRPC accuracy.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

PRIMARY_METRIC: dict[str, str] = {
    "cola": "mcc",
    "sst2": "accuracy",
    "mrpc": "accuracy",
    "stsb": "pearson",
    "qqp": "accuracy",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
    "wnli": "accuracy",
}


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score ``predictions`` against ``labels`` for GLUE ``task``.

    ``predictions``: (N,) class ids, or (N,) floats for STS-B; ``labels``: (N,) likewise.
    """
    if task not in PRIMARY_METRIC:
        raise ValueError(f"Unknown GLUE task {task!r}; choose one of {', '.join(PRIMARY_METRIC)}.")
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions have {predictions.shape[0]} items but labels have {labels.shape[0]}.")
    if task == "stsb":
        return {
            "pearson": float(pearsonr(predictions, labels)[0]),
            "spearman": float(spearmanr(predictions, labels)[0]),
        }
    if task == "cola":
        return {"mcc": float(matthews_corrcoef(labels, predictions))}
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(labels, predictions))
    return metrics


def logits_to_predictions(task: str, logits: np.ndarray) -> np.ndarray:
    """Model outputs -> predictions: (N, C) logits -> (N,) argmax; STS-B (N, 1) -> (N,) scores."""
    logits = np.asarray(logits)
    if task == "stsb":
        return logits.reshape(-1)
    return logits.argmax(axis=-1)


def trivial_baseline(task: str, train_labels: np.ndarray, dev_labels: np.ndarray) -> dict[str, float]:
    """The dev metrics of a model that ignores its input: always the training set's majority class.

    For STS-B a constant score has no correlation with anything: Pearson and Spearman are 0 by
    convention (scipy returns NaN for a constant input). CoLA's MCC is then 0, RTE's accuracy the
    dev share of the majority training class, MRPC's F1 that of predicting "paraphrase" everywhere.
    """
    if task == "stsb":
        return {"pearson": 0.0, "spearman": 0.0}
    values, counts = np.unique(np.asarray(train_labels).reshape(-1), return_counts=True)
    majority = values[np.argmax(counts)]
    dev_labels = np.asarray(dev_labels).reshape(-1)
    return glue_metrics(task, np.full_like(dev_labels, majority), dev_labels)
