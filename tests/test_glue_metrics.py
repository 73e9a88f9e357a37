"""GLUE metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from melora.lab.finetune.glue_metrics import PRIMARY_METRIC, glue_metrics, logits_to_predictions

PREDS = [1, 0, 1, 1]
LABELS = [1, 0, 0, 1]  # TP=2, TN=1, FP=1, FN=0


def test_accuracy_tasks():
    for task in ("rte", "sst2", "qnli", "mnli", "wnli"):
        assert glue_metrics(task, PREDS, LABELS) == {"accuracy": 0.75}


def test_mrpc_and_qqp_accuracy_and_f1():
    # precision 2/3, recall 1 -> F1 = 2 * (2/3) / (5/3) = 0.8
    for task in ("mrpc", "qqp"):
        metrics = glue_metrics(task, PREDS, LABELS)
        assert metrics["accuracy"] == pytest.approx(0.75)
        assert metrics["f1"] == pytest.approx(0.8)


def test_cola_matthews():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(3*2*2*1)
    assert glue_metrics("cola", PREDS, LABELS) == {"mcc": pytest.approx(2 / math.sqrt(12))}


def test_stsb_pearson_and_spearman():
    # x = 1,2,3, y = 1,2,4: cov-sum 3, |dx| = sqrt 2, |dy| = sqrt(42)/3 -> 9 / sqrt(84)
    metrics = glue_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert metrics["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert metrics["spearman"] == pytest.approx(1.0)
    # ranks 1,2,3 vs 1,3,2: 1 - 6 * 2 / (3 * 8) = 0.5
    assert glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])["spearman"] == pytest.approx(0.5)


def test_primary_metric_is_reported():
    for task, metric in PRIMARY_METRIC.items():
        preds = [1.0, 2.0, 3.0, 4.0] if task == "stsb" else PREDS
        assert metric in glue_metrics(task, preds, LABELS)


def test_logits_to_predictions():
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert logits_to_predictions("rte", logits).tolist() == [1, 0]
    assert logits_to_predictions("stsb", np.array([[0.5], [4.2]])).tolist() == [0.5, 4.2]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown GLUE task 'boolq'"):
        glue_metrics("boolq", PREDS, LABELS)
    with pytest.raises(ValueError, match="predictions have 3 items but labels have 4"):
        glue_metrics("rte", [1, 0, 1], LABELS)
