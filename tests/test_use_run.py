"""Using what a run produced: seqcls.evaluate / predict / export on tiny trained runs, and the files
every run writes beside metrics.jsonl (TensorBoard events, curves.png). Each run trains once per module."""

import csv
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from seqcls import evaluate, export, predict
from seqcls.data import read_table
from seqcls.evaluate import evaluate_run
from seqcls.export import export_run
from seqcls.predict import Predictor, predict_file
from seqcls.train import run
from tests.conftest import SHARED_DATA, TINY, compose_cfg, synthetic_overrides, write_synthetic

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    """Full fine-tuning that learns the task (accuracy 1.0 by step 40); BEST is saved at a validation step."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run(compose_cfg(synthetic_overrides(data_dir, run_dir) + [
        f"dataset.labels=[{','.join(LABELS)}]", "optimizer.lr=3e-3", "step_scheduler.num_epochs=3",
        "step_scheduler.val_every_steps=8", "step_scheduler.ckpt_every_steps=8", "checkpoint.keep_last_k=1"]))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run(compose_cfg(synthetic_overrides(data_dir, run_dir) + [
        "peft=lora", "peft.target_modules=[*.query,*.value]", "peft.dropout=0.0", "optimizer.lr=2e-2",
        "step_scheduler.num_epochs=3"]))
    return run_dir


@pytest.fixture(scope="module")
def mrpc_run(tmp_path_factory):
    if not (SHARED_DATA / "mrpc" / "test.tsv").is_file():
        pytest.skip("needs GLUE MRPC's TSV files in ../shared/data/mrpc")
    run_dir = tmp_path_factory.mktemp("mrpc") / "run"
    run(compose_cfg(TINY + [
        "dataset=glue_mrpc", f"dataset.data_dir={SHARED_DATA / 'mrpc'}", "dataset.limit_train_samples=64",
        "dataset.max_length=64", f"run_dir={run_dir}", "step_scheduler.max_steps=4",
        "step_scheduler.global_batch_size=16", "step_scheduler.local_batch_size=16"]))
    return run_dir


def rows_of(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- files every run writes
def test_tensorboard_events_hold_the_train_and_validation_scalars_of_metrics_jsonl(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(full_run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "validation/accuracy", "validation/loss"} <= set(
        events.Tags()["scalars"])
    for tag, split, key in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                            ("validation/accuracy", "validation", "accuracy")):
        logged = [(r["step"], r[key]) for r in rows_of(full_run, split)]
        assert [(e.step, pytest.approx(e.value, rel=1e-6, abs=1e-9)) for e in events.Scalars(tag)] == logged


def test_run_ends_with_a_png_of_its_training_and_validation_curves(full_run, lora_run):
    for run_dir in (full_run, lora_run):
        assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracker_logger_without_its_package_fails_at_build_with_a_one_line_fix(monkeypatch, tmp_path):
    from seqcls import loggers
    from seqcls.config import ConfigError
    cfgs = {backend: compose_cfg([f"logger={backend}"]) for backend in ("none", "wandb", "mlflow")}
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)  # neither package installed
    for backend in ("wandb", "mlflow"):
        with pytest.raises(ConfigError, match=f"pip install {backend}, or leave logger=none"):
            loggers.build_loggers(cfgs[backend], run_dir=tmp_path, is_writer=True)
    assert [type(x).__name__ for x in loggers.build_loggers(cfgs["none"], run_dir=tmp_path, is_writer=True)] \
        == ["TensorBoardLogger"]


def test_tracker_logger_gets_every_row_as_tagged_scalars_at_its_step(monkeypatch, tmp_path):
    # A stand-in for the wandb package: what the logger calls, recorded.
    calls = []
    fake_run = types.SimpleNamespace(log=lambda data, step: calls.append(("log", data, step)),
                                     finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: "abc123"),
                                 init=lambda **kw: calls.append(("init", kw)) or fake_run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from seqcls import loggers
    cfg = compose_cfg(["logger=wandb"])
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: object())
    _, tracker = loggers.build_loggers(cfg, run_dir=tmp_path, is_writer=True)
    tracker.log({"step": 4, "epoch": 0, "split": "train", "loss": 0.5, "lr": 1e-3})
    tracker.log({"step": 4, "epoch": 0, "split": "validation", "name": "validation", "accuracy": 0.75})
    tracker.close()
    assert calls[0][1]["id"] == "abc123" and calls[0][1]["project"] == "seqcls" and calls[0][1]["name"] == tmp_path.name
    assert calls[1:] == [("log", {"train/epoch": 0.0, "train/loss": 0.5, "train/lr": 1e-3}, 4),
                         ("log", {"validation/epoch": 0.0, "validation/accuracy": 0.75}, 4), ("finish",)]
    assert (tmp_path / "wandb_run_id").read_text().strip() == "abc123"  # a resumed run logs into the same W&B run


# ---------------------------------------------------------------------- evaluate
def test_evaluate_best_checkpoint_reproduces_its_validation_metrics_and_runs_any_split(full_run, data_dir, tmp_path):
    results = json.loads((full_run / "results.json").read_text())
    val = evaluate_run(full_run, split="validation", device="cpu")
    assert val["step"] == results["best"]["step"]
    assert val["accuracy"] == results["best"]["metrics"]["accuracy"]
    assert val["loss"] == pytest.approx(results["best"]["metrics"]["loss"], rel=1e-5)
    matrix = val["confusion_matrix"]  # rows: true class; its diagonal is what accuracy counts
    assert sum(map(sum, matrix)) == val["num_examples"]
    assert sum(matrix[i][i] for i in range(2)) / val["num_examples"] == pytest.approx(val["accuracy"])
    assert [val["per_class"][name]["support"] for name in LABELS] == [sum(row) for row in matrix]
    test = evaluate_run(full_run, split="test", checkpoint="latest", device="cpu")
    assert test["num_examples"] == 64 and test["step"] == results["steps"]
    assert json.loads((full_run / "eval_test.json").read_text()) == test
    other = write_synthetic(tmp_path / "other", n_train=0, n_val=40, seed=7)
    assert evaluate_run(full_run, split="test", overrides=[f"dataset.test_file={other}/test.csv"],
                        device="cpu")["num_examples"] == 40


def test_evaluate_on_the_real_mrpc_test_file_scores_all_1725_pairs_with_accuracy_and_f1(mrpc_run, capsys):
    evaluate.main([f"run_dir={mrpc_run}", "split=test", "device=cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_examples"] == 1725 and {"accuracy", "f1", "loss"} <= set(printed)
    assert json.loads((mrpc_run / "eval_test.json").read_text()) == printed
    # predict on the same raw file (its GLUE column names) agrees with evaluate's accuracy
    out = mrpc_run / "test_preds.csv"
    predict.main([f"run_dir={mrpc_run}", f"input={SHARED_DATA / 'mrpc' / 'test.tsv'}", f"output={out}",
                  "text_fields=[#1 String,#2 String]", "device=cpu"])
    preds = read_csv(out)
    gold = read_table(SHARED_DATA / "mrpc" / "test.tsv")["Quality"]
    names = ["not_equivalent", "equivalent"]
    assert len(preds) == 1725
    assert sum(names[int(g)] == p["label"] for g, p in zip(gold, preds)) / 1725 == pytest.approx(printed["accuracy"])


@pytest.mark.parametrize("command", [evaluate, predict, export])
def test_bad_or_missing_argument_prints_the_usage_line_and_exits_2(command, capsys):
    for argv in (["run_dir=x", "no_such_key=1"], ["split=test"], ["run_dir"]):
        with pytest.raises(SystemExit) as exit_info:
            command.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: python -m seqcls.{command.__name__.split('.')[-1]} run_dir=DIR")
        assert "error: " in err


def test_checkpoint_argument_picks_best_latest_a_step_or_a_path_and_names_what_exists(full_run):
    from seqcls.config import ConfigError
    from seqcls.runs import find_checkpoint, load_run_config
    cfg = load_run_config(full_run)
    best = (full_run / "checkpoints" / (full_run / "checkpoints" / "BEST").read_text().strip())
    assert find_checkpoint(full_run, cfg, "best") == best
    assert find_checkpoint(full_run, cfg, "latest").name == "step_00000048"
    assert find_checkpoint(full_run, cfg, "48") == find_checkpoint(full_run, cfg, str(full_run / "checkpoints"))
    with pytest.raises(ConfigError, match="step_00000003 does not exist; this run keeps"):
        find_checkpoint(full_run, cfg, "step_3")


# ---------------------------------------------------------------------- predict
def test_predict_streams_a_file_larger_than_one_chunk_writing_each_chunk_before_reading_the_next(
        full_run, data_dir, tmp_path, monkeypatch):
    big = tmp_path / "big.jsonl"
    texts = read_table(data_dir / "train.csv")["text"][:100]
    big.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "preds.jsonl"
    written_when_read = []
    real_iter = predict.iter_records

    def spy(path, *, chunk_size):
        for chunk in real_iter(path, chunk_size=chunk_size):
            partial = out.with_name(out.name + ".partial")
            written_when_read.append(len(partial.read_text().splitlines()))
            yield chunk

    monkeypatch.setattr(predict, "iter_records", spy)
    predictor = Predictor.from_run(full_run, device="cpu")
    assert predict_file(predictor, big, out, chunk_size=32, batch_size=8) == 100
    assert written_when_read == [0, 32, 64, 96]  # 4 chunks, each written before the next was read
    assert not out.with_name(out.name + ".partial").exists()
    streamed = [json.loads(line) for line in out.read_text().splitlines()]
    whole = predictor([texts])  # one pass over all rows gives the same predictions, in input order
    assert [r["label"] for r in streamed] == [r["label"] for r in whole]
    for s, w in zip(streamed, whole):
        assert s == pytest.approx(w, abs=1e-6)


def test_predict_from_the_command_line_text_prints_a_json_row(full_run, capsys):
    predict.main([f"run_dir={full_run}", "text=the movie was great: really", "device=cpu"])
    row = json.loads(capsys.readouterr().out)
    assert row["label"] == "positive" and row["prob_positive"] > 0.5
    assert row["prob_negative"] + row["prob_positive"] == pytest.approx(1.0, abs=1e-6)


def test_predict_threshold_on_a_single_label_run_is_a_one_line_error(full_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([f"run_dir={full_run}", "text=great", "threshold=0.3", "device=cpu"])
    assert exit_info.value.code == 2
    assert "threshold= applies to multi-label runs" in capsys.readouterr().err


# ---------------------------------------------------------------------- export
def pipeline_agrees_with_predict(model_dir, run_dir, data_dir, tmp_path):
    from transformers import pipeline
    out = tmp_path / "preds.csv"
    predict_file(Predictor.from_run(run_dir, device="cpu"), data_dir / "test.csv", out)
    ours = read_csv(out)
    texts = read_table(data_dir / "test.csv")["text"]
    theirs = pipeline("text-classification", model=str(model_dir), device="cpu")(texts, truncation=True)
    assert [t["label"] for t in theirs] == [o["label"] for o in ours]
    for t, o in zip(theirs, ours):
        assert t["score"] == pytest.approx(float(o[f"prob_{o['label']}"]), abs=1e-5)
    return [float(o[f"prob_{o['label']}"]) for o in ours]


def test_exported_full_run_loads_in_a_transformers_pipeline_that_predicts_as_seqcls_predict(
        full_run, data_dir, tmp_path):
    written = export_run(full_run, tmp_path / "exported")
    assert written == {"model": tmp_path / "exported"}
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    pipeline_agrees_with_predict(tmp_path / "exported", full_run, data_dir, tmp_path)
    labels = [r["label"] for r in read_csv(tmp_path / "preds.csv")]
    assert set(labels) == set(LABELS)  # a learned model: the comparison sees both classes


def test_exported_lora_run_gives_a_merged_model_for_pipeline_and_a_peft_adapter_that_rebuilds_it(
        lora_run, data_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out = tmp_path / "exported"
    export.main([f"run_dir={lora_run}", f"out={out}", "merged=true"])
    assert not any(".lora_" in k for k in load_file(out / "model.safetensors"))  # LoRA folded into the weights
    probs = pipeline_agrees_with_predict(out, lora_run, data_dir, tmp_path)
    assert max(probs) - min(probs) > 1e-3  # far wider than the tolerance: the comparison tells inputs apart

    # The adapter on the base weights (merged minus scale * B @ A) gives the merged model's logits.
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    base_sd = merged.state_dict()
    for key, lora_a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_b = tensors[key.replace("lora_A", "lora_B")]
            base_sd[f"{name}.weight"] = base_sd[f"{name}.weight"] - scale * lora_b @ lora_a
    base = AutoModelForSequenceClassification.from_pretrained(out)
    base.load_state_dict(base_sd)
    adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    batch = AutoTokenizer.from_pretrained(out / "adapter")(read_table(data_dir / "test.csv")["text"][:8],
                                                            padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=0)

    side_by_side = export_run(lora_run, tmp_path / "unmerged", merged=False)
    assert side_by_side == {"model": tmp_path / "unmerged" / "merged", "adapter": tmp_path / "unmerged" / "adapter"}
    assert sorted(p.name for p in (tmp_path / "unmerged").iterdir()) == ["adapter", "merged"]


def test_export_refuses_a_folder_that_is_not_empty(full_run, tmp_path):
    from seqcls.config import ConfigError
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_run(full_run, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
