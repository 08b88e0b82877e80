"""Per-task validation metrics, following the GLUE conventions (maths from scikit-learn / scipy)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef, precision_recall_fscore_support

_F1_TASKS = {"mrpc", "qqp"}


def main_metric(task: str, num_labels: int) -> str:
    """The metric that picks the best checkpoint by default (higher is better)."""
    if num_labels == 1 or task in ("stsb", "regression"):
        return "pearson"
    if task == "multi_label":
        return "micro_f1"
    if task == "cola":
        return "mcc"
    if task in _F1_TASKS:
        return "f1"
    return "accuracy"


def metric_names(task: str, num_labels: int) -> list[str]:
    """The names compute_metrics returns for the task, and the validation loss: what
    ``checkpoint.best_metric`` may name."""
    if num_labels == 1 or task in ("stsb", "regression"):
        names = ["pearson", "spearmanr"]
    elif task == "multi_label":
        names = ["accuracy", "micro_f1", "macro_f1"]
    else:
        names = ["accuracy"] + ["f1"] * (task in _F1_TASKS) + ["mcc"] * (task == "cola") + ["macro_f1"] * (num_labels > 2)
    return names + ["loss"]


def greater_is_better(name: str) -> bool:
    """Whether a higher value of the validation metric ``name`` is better (every metric but the loss)."""
    return name != "loss"


def predictions(task: str, logits: np.ndarray) -> np.ndarray:
    """A classifier's predictions from its logits: the argmax class, or for multi_label a 0/1 row (a label
    where its logit > 0, i.e. probability > 0.5)."""
    return (logits > 0).astype(np.int64) if task == "multi_label" else logits.argmax(-1)


def compute_metrics(task: str, num_labels: int, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one split from the model's logits ([N, num_labels]) and the true labels ([N]; for
    multi_label [N, num_labels] of 0/1, the accuracy then being the share of examples whose every label is
    right)."""
    if num_labels == 1 or task in ("stsb", "regression"):
        preds = logits.reshape(-1).astype(np.float64)
        labels = labels.astype(np.float64)
        if len(preds) < 2 or np.std(preds) == 0 or np.std(labels) == 0:
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    if task == "multi_label":  # labels [N, num_labels] of 0/1
        preds, labels = predictions(task, logits), labels.astype(np.int64)
        return {"accuracy": float(np.mean(np.all(preds == labels, axis=1))) if len(labels) else 0.0,
                "micro_f1": float(f1_score(labels, preds, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0))}
    preds = predictions(task, logits)
    out = {"accuracy": float(accuracy_score(labels, preds))}
    if task in _F1_TASKS:
        out["f1"] = float(f1_score(labels, preds, zero_division=0))
    if task == "cola":
        out["mcc"] = float(matthews_corrcoef(labels, preds))
    if num_labels > 2:
        out["macro_f1"] = float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                         zero_division=0))
    return out


def per_class_report(task: str, num_labels: int, logits: np.ndarray, labels: np.ndarray,
                     names: list[str]) -> dict:
    """Precision, recall, F1 and support of each class (each label, for multi_label), keyed by name, and for
    single-label classification the confusion matrix (rows: true class, columns: predicted, in ``names``'
    order). Empty for a regression."""
    if num_labels == 1 or task in ("stsb", "regression"):
        return {}
    multi = task == "multi_label"
    preds, labels = predictions(task, logits), labels.astype(np.int64)
    index = None if multi else list(range(num_labels))
    p, r, f, support = precision_recall_fscore_support(labels, preds, labels=index, average=None, zero_division=0)
    out = {"per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                "support": int(support[i])} for i, name in enumerate(names)}}
    if not multi:
        out["confusion_matrix"] = confusion_matrix(labels, preds, labels=index).tolist()
    return out
