"""dataset.task=multi_label: any number of labels an example, from the files through training, validation,
seqcls.evaluate, seqcls.predict and an exported model in a transformers pipeline."""

import csv
import json
import random

import numpy as np
import pytest
import torch

from seqcls.data import DataError, encode_multi_labels
from seqcls.evaluate import evaluate_run
from seqcls.export import export_run
from seqcls.metrics import compute_metrics
from seqcls.predict import Predictor, predict_file
from seqcls.train import run
from seqcls.trainer import class_weights, loss_sum
from tests.conftest import TINY, compose_cfg

LABELS = ["praise", "speed", "price"]
WORDS = {"praise": ["great", "excellent", "lovely"], "speed": ["fast", "quick", "rapid"],
         "price": ["cheap", "costly", "pricey"]}
FILLER = ["the", "phone", "was", "really", "a", "it", "quite", "device", "seems", "overall"]


def write_multi_label(folder, n_train=384, n_val=64, seed=0):
    """Each label independently present (its word in the text) with probability 1/2; train.jsonl holds lists of
    names, dev.csv the names joined by ',' (empty: none)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n):
        out = []
        for _ in range(n):
            present = [name for name in LABELS if rng.random() < 0.5]
            words = rng.sample(FILLER, 4) + [rng.choice(WORDS[name]) for name in present]
            rng.shuffle(words)
            out.append((" ".join(words), present))
        return out
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "tags": tags}) + "\n" for t, tags in rows(n_train))
    with open(folder / "dev.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "tags"])
        w.writerows((t, ",".join(tags)) for t, tags in rows(n_val))
    return folder


def overrides(data, run_dir):
    return TINY + ["dataset=files", "dataset.task=multi_label", "dataset.num_labels=3",
                   f"dataset.labels=[{','.join(LABELS)}]", "dataset.label_field=tags",
                   f"dataset.train_file={data}/train.jsonl", f"dataset.validation_file={data}/dev.csv",
                   "dataset.max_length=32", f"run_dir={run_dir}", "optimizer.lr=3e-3",
                   "step_scheduler.global_batch_size=16", "step_scheduler.local_batch_size=16",
                   "step_scheduler.num_epochs=8", "step_scheduler.val_every_steps=24",
                   # three words to find: 2 layers of width 32 learn it too slowly
                   "model.config_overrides.hidden_size=64", "model.config_overrides.num_attention_heads=4",
                   "model.config_overrides.intermediate_size=128"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = write_multi_label(tmp_path_factory.mktemp("ml") / "data")
    run_dir = data.parent / "run"
    results = run(compose_cfg(overrides(data, run_dir)))
    return data, run_dir, results


def test_label_sets_from_lists_joined_names_and_indices():
    assert encode_multi_labels([["speed", "praise"], "price, speed", "", 2, [0]], num_labels=3, labels=LABELS,
                               where="w") == [[1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert encode_multi_labels(["0|2"], num_labels=3, labels=None, where="w", separator="|") == [[1, 0, 1]]
    with pytest.raises(DataError, match=r"row 1 has label 'colour'; a label is one of dataset.labels="):
        encode_multi_labels(["praise", "praise,colour"], num_labels=3, labels=LABELS, where="w")
    with pytest.raises(DataError, match=r"row 0 has label 3; a label is an index in 0..2"):
        encode_multi_labels([[3]], num_labels=3, labels=None, where="w")


def test_metrics_loss_and_balanced_weights_of_label_sets():
    labels = np.array([[1, 0], [1, 1], [0, 0]])
    logits = np.array([[2.0, -1.0], [0.5, -0.5], [-3.0, 1.0]])  # predicted: {0}, {0}, {1}
    # exact match 1 of 3; micro: TP 2, FP 1, FN 1 -> F1 2/3; per label F1 1 and 0 -> macro 1/2
    assert compute_metrics("multi_label", 2, logits, labels) == pytest.approx(
        {"accuracy": 1 / 3, "micro_f1": 2 / 3, "macro_f1": 0.5})
    t, y = torch.tensor(logits), torch.tensor(labels, dtype=torch.float32)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(t.float(), y)  # mean over examples x labels
    assert loss_sum(t, y, 2, multi_label=True).item() / 3 == pytest.approx(expected.item(), rel=1e-6)
    # balanced: negatives / positives of each label (2/1 for label 0... here 1 negative, 2 positives: 0.5; 2/1: 2)
    assert class_weights("balanced", labels.tolist(), 2, multi_label=True) == [0.5, 2.0]


def test_a_multi_label_run_learns_and_evaluate_predict_and_a_pipeline_agree(trained, tmp_path):
    data, run_dir, results = trained
    # Predicting every label for every text scores micro-F1 0.62 here; a trained model near 0.9.
    assert results["best"]["metric"] == "micro_f1" and results["final"]["micro_f1"] >= 0.85
    assert set(results["final"]) >= {"accuracy", "micro_f1", "macro_f1", "loss"}
    # seqcls.evaluate on the same checkpoint and split: the run's own validation numbers
    ev = evaluate_run(run_dir, split="validation", checkpoint="latest", device="cpu")
    final = results["final"]
    for key in ("accuracy", "micro_f1", "macro_f1", "loss"):
        assert ev[key] == pytest.approx(final[key], abs=1e-6), key
    assert list(ev["per_class"]) == LABELS and "confusion_matrix" not in ev
    assert np.mean([ev["per_class"][name]["f1"] for name in LABELS]) == pytest.approx(ev["macro_f1"], abs=1e-9)
    # seqcls.predict: a label set a row; in csv joined by the separator, in JSON lines a list
    predictor = Predictor.from_run(run_dir, checkpoint="latest", device="cpu")
    assert predictor.fieldnames() == ["labels", *(f"prob_{name}" for name in LABELS)]
    predict_file(predictor, data / "dev.csv", tmp_path / "preds.csv")
    predict_file(predictor, data / "dev.csv", tmp_path / "preds.jsonl")
    with open(tmp_path / "preds.csv", newline="") as f:
        as_csv = list(csv.DictReader(f))
    as_json = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in as_csv] == [",".join(r["labels"]) for r in as_json]
    with open(data / "dev.csv", newline="") as f:
        truth = [row["tags"] for row in csv.DictReader(f)]
    exact = np.mean([set(filter(None, t.split(","))) == set(r["labels"]) for t, r in zip(truth, as_json)])
    assert exact == pytest.approx(final["accuracy"], abs=1e-9)
    sizes = {len(r["labels"]) for r in as_json}
    assert max(sizes) >= 2 and len(sizes) >= 2  # sets of several labels, and of different sizes
    # The exported model is a multi-label classifier to transformers: its pipeline applies a sigmoid.
    from transformers import pipeline
    export_run(run_dir, tmp_path / "exported", checkpoint="latest")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    texts = [r["text"] for r in csv.DictReader(open(data / "dev.csv", newline=""))][:8]
    theirs = pipeline("text-classification", model=str(tmp_path / "exported"), device="cpu", top_k=None)(texts)
    ours = predictor([texts])
    for t, o in zip(theirs, ours):
        assert {d["label"]: d["score"] for d in t} == pytest.approx(
            {name: o[f"prob_{name}"] for name in LABELS}, abs=1e-5)


def test_multi_label_mistakes_are_one_line_errors(tmp_path):
    from omegaconf import OmegaConf
    from seqcls.config import ConfigError
    with pytest.raises(ConfigError, match="needs dataset.num_labels >= 2"):
        OmegaConf.to_object(compose_cfg(["dataset=files", "dataset.task=multi_label", "dataset.num_labels=1",
                                         "dataset.train_file=a", "dataset.validation_file=b"]))
    with pytest.raises(ConfigError, match="label_smoothing applies to single-label"):
        OmegaConf.to_object(compose_cfg(["dataset=files", "dataset.task=multi_label", "loss.label_smoothing=0.1",
                                         "dataset.train_file=a", "dataset.validation_file=b"]))


def test_predict_threshold_picks_the_labels_above_it(trained, capsys):
    from seqcls import predict
    _, run_dir, _ = trained
    args = [f"run_dir={run_dir}", "text=a quick phone it was lovely", "checkpoint=latest", "device=cpu"]
    predict.main(args)
    row = json.loads(capsys.readouterr().out)
    probs = sorted(row[f"prob_{name}"] for name in LABELS)
    threshold = (probs[0] + probs[1]) / 2  # between the two least likely labels: two labels above it
    predict.main(args + [f"threshold={threshold}"])
    above = json.loads(capsys.readouterr().out)["labels"]
    assert above == [name for name in LABELS if row[f"prob_{name}"] > threshold] and len(above) == 2


def test_the_run_sets_its_own_problem_type_over_a_pretrained_classifiers(tmp_path):
    """Fine-tuning a multi-label (or regression) classifier as a single-label one: the saved config, which
    predict and transformers' pipelines read, must say single-label."""
    from transformers import AutoTokenizer
    from seqcls.models import from_config, from_pretrained
    from seqcls.runs import load_classifier
    tok = AutoTokenizer.from_pretrained(compose_cfg(TINY).model.tokenizer_name_or_path)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    for multi_label, num_labels in ((True, 3), (False, 1)):
        base = from_config("bert", num_labels=num_labels, multi_label=multi_label, tokenizer=tok, config_overrides=small)
        base.save_pretrained(tmp_path / "base")
        tuned = from_pretrained(str(tmp_path / "base"), num_labels=2, labels=["neg", "pos"])
        assert tuned.config.problem_type == "single_label_classification"
        tuned.save_pretrained(tmp_path / "tuned")
        tok.save_pretrained(tmp_path / "tuned")
        model, _ = load_classifier(tmp_path / "tuned", torch.device("cpu"))
        predictor = Predictor(model, tok, ["neg", "pos"], ["text"], 32, torch.device("cpu"))
        assert not predictor.multi_label and predictor.fieldnames() == ["label", "prob_neg", "prob_pos"]


def test_checkpoints_written_before_the_multi_label_fingerprint_resume_by_their_models_problem_type(tmp_path):
    from seqcls.config import ConfigError
    data = write_multi_label(tmp_path / "data", n_train=32, n_val=8)
    (tmp_path / "three.csv").write_text("text,tags\n" + "".join(f"t{i},{i % 3}\n" for i in range(32)))
    single = ["dataset.task=classification", f"dataset.train_file={tmp_path / 'three.csv'}",
              f"dataset.validation_file={tmp_path / 'three.csv'}"]

    def train(run_dir, steps, extra=()):
        return run(compose_cfg(overrides(data, run_dir) + list(extra) + [f"step_scheduler.max_steps={steps}"]))

    def drop_key(run_dir):  # what a checkpoint written before the key holds
        state = run_dir / "checkpoints" / "step_00000002" / "trainer_state.json"
        meta = json.loads(state.read_text())
        del meta["fingerprint"]["multi_label"]
        state.write_text(json.dumps(meta))
    train(tmp_path / "ml", 2)
    drop_key(tmp_path / "ml")
    assert train(tmp_path / "ml", 4)["steps"] == 4  # resumed: its model's config says multi-label
    train(tmp_path / "single", 2, single)
    drop_key(tmp_path / "single")
    with pytest.raises(ConfigError, match="multi_label: checkpoint False vs config True"):
        train(tmp_path / "single", 4, single[1:])  # the same files, now as multi-label
