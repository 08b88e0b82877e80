"""Per-task metrics against small cases checked by hand."""

import numpy as np
import pytest

from seqcls.metrics import compute_metrics, main_metric, metric_names, per_class_report


def onehot_logits(preds, k=2):
    out = np.zeros((len(preds), k), np.float32)
    out[np.arange(len(preds)), preds] = 1.0
    return out


def test_mrpc_reports_accuracy_and_f1():
    # labels 1 1 0 0, preds 1 0 0 1: TP=1 FP=1 FN=1 → precision 1/2, recall 1/2, F1 1/2; accuracy 2/4.
    m = compute_metrics("mrpc", 2, onehot_logits([1, 0, 0, 1]), np.array([1, 1, 0, 0]))
    assert m == pytest.approx({"accuracy": 0.5, "f1": 0.5})


def test_cola_reports_matthews_correlation():
    # perfect agreement → MCC 1; inverted → -1.
    y = np.array([0, 1, 1, 0])
    assert compute_metrics("cola", 2, onehot_logits([0, 1, 1, 0]), y)["mcc"] == pytest.approx(1.0)
    assert compute_metrics("cola", 2, onehot_logits([1, 0, 0, 1]), y)["mcc"] == pytest.approx(-1.0)


def test_stsb_reports_pearson_and_spearman():
    # preds = 2*labels + 1 is a perfect linear and rank relation; a reversed order gives -1.
    y = np.array([0.0, 1.0, 2.5, 4.0])
    m = compute_metrics("stsb", 1, (2 * y + 1)[:, None], y)
    assert m["pearson"] == pytest.approx(1.0) and m["spearmanr"] == pytest.approx(1.0)
    assert compute_metrics("stsb", 1, (-y)[:, None], y)["spearmanr"] == pytest.approx(-1.0)


def test_multiclass_adds_macro_f1():
    # classes 0,1,2; preds right for 0 and 1, class 2 predicted as 0.
    m = compute_metrics("mnli", 3, onehot_logits([0, 1, 0], 3), np.array([0, 1, 2]))
    # per-class F1: c0 = 2/3 (P 1/2, R 1), c1 = 1, c2 = 0 → macro 5/9
    assert m["accuracy"] == pytest.approx(2 / 3) and m["macro_f1"] == pytest.approx(5 / 9)


def test_main_metric_follows_glue_conventions():
    assert [main_metric(t, n) for t, n in [("cola", 2), ("stsb", 1), ("mrpc", 2), ("sst2", 2), ("mnli", 3)]] == \
        ["mcc", "pearson", "f1", "accuracy", "accuracy"]


@pytest.mark.parametrize("task,num_labels", [("mrpc", 2), ("qqp", 2), ("cola", 2), ("stsb", 1), ("regression", 1),
                                             ("mnli", 3), ("sst2", 2), ("classification", 5)])
def test_metric_names_are_what_validation_reports(task, num_labels):
    logits = np.random.default_rng(0).normal(size=(6, num_labels)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1]) if num_labels > 1 else np.linspace(0, 5, 6)
    assert metric_names(task, num_labels) == [*compute_metrics(task, num_labels, logits, labels), "loss"]
    assert main_metric(task, num_labels) in metric_names(task, num_labels)


def test_per_class_report_and_confusion_matrix():
    # true 0 0 1 2 2, predicted 0 1 1 2 0: class 0 P 1/2 R 1/2; class 1 P 1/2 R 1; class 2 P 1 R 1/2
    r = per_class_report("mnli", 3, onehot_logits([0, 1, 1, 2, 0], 3), np.array([0, 0, 1, 2, 2]), ["a", "b", "c"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert r["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert r["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert r["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    # multi-label: each label on its own, no confusion matrix
    m = per_class_report("multi_label", 2, np.array([[1.0, -1.0], [1.0, 1.0]]), np.array([[1, 1], [0, 1]]), ["x", "y"])
    assert m == {"per_class": {"x": pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}),
                               "y": pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})}}
    assert per_class_report("stsb", 1, np.zeros((2, 1)), np.zeros(2), ["score"]) == {}
