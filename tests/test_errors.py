"""Every user mistake: non-zero exit, one or two lines naming the problem and the fix, no
traceback, and nothing in an existing run dir overwritten."""

import json
import re
import sys

import pytest

from seqcls.train import cli
from tests.conftest import TINY, write_synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data files with assorted defects, and a finished run to make mistakes next to."""
    root = tmp_path_factory.mktemp("errors")
    good = write_synthetic(root / "good", n_train=64, n_val=16)
    bad = root / "bad"
    bad.mkdir()
    (bad / "labels_out_of_range.csv").write_text("text,label\na,0\nb,1\nc,7\n")
    (bad / "string_labels.csv").write_text("text,label\na,pos\nb,neg\n")
    (bad / "one_class.csv").write_text("text,label\n" + "".join(f"t{i},1\n" for i in range(40)))
    (bad / "empty.csv").write_text("text,label\n")
    (bad / "latin1.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    (bad / "malformed.tsv").write_text("text\tlabel\nok\t1\nno label here\n")
    (bad / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": broken}\n')
    (bad / "three_classes.csv").write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(40)))
    (bad / "headerless.csv").write_text("hello,1\nbye,0\n")
    (bad / "notes.txt.xlsx").write_text("x")
    (bad / "a_folder.csv").mkdir()
    (bad / "tag_lists.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": [0, 1] if i % 2 else [0]}) + "\n"
                                                 for i in range(40)))
    (bad / "mixed_tags.jsonl").write_text('{"text": "a", "label": [0, 1]}\n{"text": "b", "label": "1"}\n')
    run_dir = root / "existing_run"
    rc, _ = invoke(files(good, run_dir) + ["step_scheduler.max_steps=2"])
    assert rc == 0
    return {"good": good, "bad": bad, "run": run_dir, "root": root}


def files(data, run_dir, train=None, val=None):
    return TINY + ["dataset=files", f"dataset.train_file={train or data / 'train.csv'}",
                   f"dataset.validation_file={val or data / 'dev.csv'}", f"run_dir={run_dir}",
                   "step_scheduler.global_batch_size=8", "step_scheduler.local_batch_size=8", "dataset.max_length=16"]


def invoke(args):
    """Run the real CLI entry point in this process; returns (exit code, stderr)."""
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    argv, sys.argv = sys.argv, ["seqcls.train", *args]
    try:
        with redirect_stderr(err):
            cli()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return code, err.getvalue()


B = "{bad}"
CASES = [
    # (name, extra overrides (later ones win), text the message must hold)
    ("unknown_key", ["step_scheduler.warmup=3"], "warmup"),
    ("unknown_group_option", ["model=gpt9"], "minilm_l6"),
    ("wrong_type", ["step_scheduler.local_batch_size=eight"], "local_batch_size"),
    ("not_divisible", ["step_scheduler.global_batch_size=12"], "not divisible"),
    ("lr_zero", ["optimizer.lr=0"], "optimizer.lr must be > 0"),
    ("lr_negative", ["optimizer.lr=-0.1"], "optimizer.lr must be > 0"),
    ("negative_steps", ["step_scheduler.max_steps=-3"], "max_steps must be > 0"),
    ("negative_epochs", ["step_scheduler.num_epochs=-1"], "num_epochs must be > 0"),
    ("tp_size", ["distributed.tp_size=2"], "tp_size=1"),
    ("cp_size", ["distributed.cp_size=2"], "cp_size=1"),
    ("bad_decay", ["lr_scheduler.decay=step"], "linear, cosine or constant"),
    ("bad_precision", ["precision=fp8"], "precision must be auto, bf16, fp16 or fp32"),
    ("no_gpu", ["device=cuda"], "device=cpu"),
    ("three_text_fields", ["dataset.text_fields=[a,b,c]"], "one or two"),
    ("label_out_of_range", [f"dataset.train_file={B}/labels_out_of_range.csv"], "row 2 has label 7, outside 0..1"),
    ("num_labels_disagree", [f"dataset.train_file={B}/three_classes.csv"], "outside 0..1"),
    ("string_labels_no_list", [f"dataset.train_file={B}/string_labels.csv"], "set dataset.labels"),
    ("missing_text_column", ["dataset.text_fields=[review]"], "columns are ['text', 'label']"),
    ("missing_label_column", ["dataset.label_field=stars"], "set dataset.label_field"),
    ("empty_split", [f"dataset.train_file={B}/empty.csv"], "split is empty"),
    ("missing_file", [f"dataset.train_file={B}/nope.csv"], "data file not found"),
    ("folder_not_file", [f"dataset.train_file={B}/a_folder.csv"], "data file not found"),
    ("not_utf8", [f"dataset.train_file={B}/latin1.csv"], "not UTF-8"),
    ("malformed_tsv", [f"dataset.train_file={B}/malformed.tsv"], "malformed.tsv:3: malformed row"),
    ("bad_jsonl", [f"dataset.train_file={B}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    ("unknown_file_type", [f"dataset.train_file={B}/notes.txt.xlsx"], "unknown file type"),
    ("single_class", [f"dataset.train_file={B}/one_class.csv"], "at least two classes"),
    ("max_length_too_long", ["dataset.max_length=5000"], "lower dataset.max_length"),
    ("model_path_missing", ["model=minilm_l6", "model.pretrained_model_name_or_path=/no/such/model"], "does not exist"),
    ("model_num_labels", ["model.num_labels=5"], "leave model.num_labels"),
    ("attn_implementation", ["model.attn_implementation=fastest"], "model.attn_implementation=fastest cannot be used"),
    ("lora_glob_matches_nothing", ["peft=lora", "peft.target_modules=[*.qkv_proj]"], "*.qkv_proj"),
    ("lora_no_targets", ["peft=lora", "peft.target_modules=[]"], "peft.target_modules is empty"),
    ("target_not_allowed", ["optimizer._target_=os.system"], "allowed_target_prefixes"),
    ("batch_bigger_than_data", ["step_scheduler.global_batch_size=1024", "step_scheduler.local_batch_size=1024"],
     "fewer than one global batch"),
    ("files_split_unknown", ["dataset.validation_splits=[dev]"], "not 'dev'"),
    ("files_missing_value", ["dataset.validation_file=???"], "validation_file"),
    ("resume_nothing_there", ["checkpoint.restore_from={root}/nothing"], "no checkpoint there"),
    ("keep_last_zero", ["checkpoint.keep_last_k=0"], "keep_last_k must be"),
    ("class_weights_count", ["loss.class_weights=[1,2,3]"], "3 weights for dataset.num_labels=2"),
    ("labels_count", ["dataset.labels=[a,b,c]"], "dataset.labels has 3 names for dataset.num_labels=2"),
    ("task_unknown", ["dataset.task=multilabel"], "use one of classification, multi_label"),
    ("list_labels_single_label", [f"dataset.train_file={B}/tag_lists.jsonl"], "set dataset.task=multi_label"),
    ("mixed_label_kinds", [f"dataset.train_file={B}/mixed_tags.jsonl"], "column 'label' holds a str in row 1 but a list before it"),
    ("balanced_label_everywhere", ["dataset.task=multi_label", f"dataset.train_file={B}/tag_lists.jsonl",
                                   "loss.class_weights=balanced"], "label 0 is positive in every training example"),
    ("fp16_fsdp2_explicit", ["precision=fp16", "distributed=fsdp2"], "precision=fp16 is not built for distributed=fsdp2"),
    ("class_weights_word", ["loss.class_weights=heavy"], "loss.class_weights must be null, balanced"),
    ("balanced_missing_class", ["loss.class_weights=balanced", "dataset.num_labels=3"], "class 2 has no training example"),
    ("label_smoothing_one", ["loss.label_smoothing=1.0"], "label_smoothing must be in [0, 1)"),
    ("best_metric_unknown", ["checkpoint.best_metric=acc"], "use one of accuracy, loss"),
    ("early_stopping_without_validations", ["step_scheduler.early_stopping_patience=2"], "set step_scheduler.val_every_steps"),
    ("early_stopping_patience_zero", ["step_scheduler.early_stopping_patience=0", "step_scheduler.val_every_steps=2"],
     "early_stopping_patience must be > 0"),
    ("fsdp2_mesh_too_big", ["distributed=fsdp2", "distributed.dp_size=4"], "dp_size"),
    ("hub_dataset_offline", ["dataset=glue_rte"], "dataset.data_dir"),
]


@pytest.mark.parametrize("name,extra,needle", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_gets_one_clear_line_and_leaves_the_existing_run_alone(world, name, extra, needle):
    run_dir = world["run"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    extra = [e.replace(B, str(world["bad"])).replace("{root}", str(world["root"])) for e in extra]
    if name == "hub_dataset_offline":
        args = TINY + extra + [f"run_dir={run_dir}"]
    else:
        args = files(world["good"], run_dir) + extra
    code, err = invoke(args)
    assert code not in (0, None), err
    # Progress log lines may come first (the error can surface after the model is built).
    lines = [l for l in err.strip().splitlines() if l.strip() and not re.match(r"\[\d\d:\d\d:\d\d (INFO|WARNING)\]", l)]
    assert "Traceback" not in err
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("error: ") and code == 2
    assert needle in err, err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p in before}
    assert after == before


def test_checkpoint_of_another_model_in_the_run_dir_is_refused(world):
    code, err = invoke(files(world["good"], world["run"]) + ["model=tiny_roberta"])
    assert code == 2 and "comes from another setup" in err and "Traceback" not in err


def test_a_single_label_checkpoint_is_not_resumed_as_multi_label(world):
    code, err = invoke(files(world["good"], world["run"]) + ["dataset.task=multi_label"])
    assert code == 2 and "multi_label: checkpoint False vs config True" in err and "Traceback" not in err


def test_restarting_over_an_existing_run_is_refused(world):
    code, err = invoke(files(world["good"], world["run"]) + ["checkpoint.restore_from=none"])
    assert code == 2 and "already holds checkpoints" in err


def test_hydra_full_error_shows_the_traceback(world, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(Exception, match="optimizer.lr must be > 0"):
        invoke(files(world["good"], world["root"] / "x") + ["optimizer.lr=0"])


def test_messy_text_trains_without_error(tmp_path):
    """Long texts, empty strings, unicode and control characters."""
    data = tmp_path / "messy"
    data.mkdir()
    rows = ['"' + "word " * 3000 + '",1', '"",0', '"naïve café 日本語 😀",1', '"tab\there\x07bell\x1b[0m",0',
            '"  ",1', '"line\nbreak",0', '"\u200bzero width",1', '"مرحبا",0'] * 4
    for name in ("train", "dev"):
        (data / f"{name}.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    code, err = invoke(files(data, tmp_path / "run") + ["step_scheduler.max_steps=3"])
    assert code == 0, err
