"""Per-task validation metrics, following the GLUE conventions (maths from scikit-learn / scipy)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_F1_TASKS = {"mrpc", "qqp"}


def main_metric(task: str, num_labels: int) -> str:
    """The metric that picks the best checkpoint by default (higher is better)."""
    if num_labels == 1 or task in ("stsb", "regression"):
        return "pearson"
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
    else:
        names = ["accuracy"] + ["f1"] * (task in _F1_TASKS) + ["mcc"] * (task == "cola") + ["macro_f1"] * (num_labels > 2)
    return names + ["loss"]


def greater_is_better(name: str) -> bool:
    """Whether a higher value of the validation metric ``name`` is better (every metric but the loss)."""
    return name != "loss"


def compute_metrics(task: str, num_labels: int, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one split from the model's logits ([N, num_labels]) and the true labels ([N])."""
    if num_labels == 1 or task in ("stsb", "regression"):
        preds = logits.reshape(-1).astype(np.float64)
        labels = labels.astype(np.float64)
        if len(preds) < 2 or np.std(preds) == 0 or np.std(labels) == 0:
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    preds = logits.argmax(-1)
    out = {"accuracy": float(accuracy_score(labels, preds))}
    if task in _F1_TASKS:
        out["f1"] = float(f1_score(labels, preds, zero_division=0))
    if task == "cola":
        out["mcc"] = float(matthews_corrcoef(labels, preds))
    if num_labels > 2:
        out["macro_f1"] = float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                         zero_division=0))
    return out
