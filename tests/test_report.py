"""seqcls.report on a fabricated sweep dir: rows, statuses, best run, written files (no Slurm, no training)."""

import csv
import json
import pickle

import yaml

from seqcls.report import best_run, collect, main, parse_overrides, swept_fields


def fake_run(sweep, num, overrides, *, best=None, final=None, error=None, steps_logged=None, job_id=None,
             metric="accuracy"):
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"hydra": {"job": {"id": job_id or f"100_{num}"},
                       "launcher": {"submitit_folder": "${hydra.sweep.dir}/.submitit/%j"}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if best is not None:
        (run / "results.json").write_text(json.dumps({
            "steps": 40, "wall_time_s": 12.5, "preempted": False, "final": {"accuracy": final, "loss": 0.3},
            "best": {"metric": metric, "value": best, "step": 30,
                     **({} if metric == "accuracy" else {"greater_is_better": metric != "loss"})}}))
    if error is not None:
        (run / "error.txt").write_text(error + "\n\nTraceback (most recent call last):\n  ...\n")
    if steps_logged is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n"
                                                   for s in range(4, steps_logged + 1, 4)))
    return run


def fabricated_sweep(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    common = ["dataset=glue_mrpc", "peft=lora"]
    fake_run(sweep, 0, common + ["optimizer.lr=1e-4", "peft.dim=8"], best=0.71, final=0.70)
    fake_run(sweep, 1, common + ["optimizer.lr=3e-4", "peft.dim=8"], best=0.84, final=0.83)
    fake_run(sweep, 2, common + ["optimizer.lr=1e-4", "peft.dim=16"],
             error="ConfigError: optimizer.lr must be > 0, got -1.0")
    fake_run(sweep, 3, common + ["optimizer.lr=3e-4", "peft.dim=16"], steps_logged=12)
    # Job 10 died outside seqcls.train (e.g. could not unpickle): only submitit's result pickle says so.
    fake_run(sweep, 10, common + ["optimizer.lr=1e-3", "peft.dim=16"], job_id="100_10")
    folder = sweep / ".submitit" / "100_10"
    folder.mkdir(parents=True)
    with open(folder / "100_10_0_result.pkl", "wb") as f:
        pickle.dump(("error", "Traceback (most recent call last):\n  ...\nMemoryError: out of memory\n"), f)
    # Jobs 11 and 12 left no trace but Slurm's lines in their logs: 11 was requeued (runs again), 12 cancelled.
    for num, line in ((11, "*** JOB 111 ON vm CANCELLED AT 2026-01-01T10:01:00 DUE TO JOB REQUEUE ***"),
                      (12, "*** JOB 112 ON vm CANCELLED AT 2026-01-01T10:02:00 ***")):
        fake_run(sweep, num, common + ["optimizer.lr=1e-3", "peft.dim=32"], job_id=f"100_{num}")
        (sweep / ".submitit" / f"100_{num}").mkdir()
        (sweep / ".submitit" / f"100_{num}" / f"100_{num}_0_log.err").write_text(f"slurmstepd-vm: error: {line}\n")
    return sweep


def test_overrides_keep_their_key_without_plus_and_their_value_after_the_first_equals():
    assert parse_overrides(["+a.b=1", "x=y=z", "~c="]) == {"a.b": "1", "x": "y=z", "c": ""}


def test_rows_have_status_metrics_and_errors_and_swept_fields_exclude_common_overrides(tmp_path):
    rows = collect(fabricated_sweep(tmp_path))
    assert [r.job for r in rows] == ["0", "1", "2", "3", "10", "11", "12"]  # numeric order, not 0, 1, 10, 2
    assert [r.status for r in rows] == ["ok", "ok", "failed", "running", "failed", "running", "failed"]
    assert rows[1].best == 0.84 and rows[1].final == 0.83 and rows[1].best_step == 30 and rows[1].steps == 40
    assert rows[2].error == "ConfigError: optimizer.lr must be > 0, got -1.0"
    assert rows[3].steps == 12 and rows[3].error == ""
    assert rows[4].error == "MemoryError: out of memory"
    assert rows[6].error == "slurmstepd-vm: error: *** JOB 112 ON vm CANCELLED AT 2026-01-01T10:02:00 ***"
    assert swept_fields(rows) == ["optimizer.lr", "peft.dim"]


def test_report_writes_markdown_csv_and_png_and_names_the_best_run(tmp_path, capsys):
    sweep = fabricated_sweep(tmp_path)
    main([str(sweep)])
    printed = capsys.readouterr().out
    md = (sweep / "report.md").read_text()
    assert md in printed
    assert "7 runs: 2 ok, 3 failed, 2 running" in md
    assert "Best run: job 1, accuracy=0.8400 at step 30: `optimizer.lr=3e-4` `peft.dim=8`" in md
    assert "Common overrides: `dataset=glue_mrpc` `peft=lora`" in md
    assert "| 2 | failed | 1e-4 | 16 |" in md and "optimizer.lr must be > 0" in md
    with open(sweep / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "running", "failed", "running", "failed"]
    assert table[1]["best accuracy"] == "0.8400" and table[1]["optimizer.lr"] == "3e-4"
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_that_succeeds_after_an_earlier_failure_in_the_same_dir_is_ok(tmp_path):
    sweep = tmp_path / "s"
    run = fake_run(sweep, 0, ["optimizer.lr=1e-4"], error="RuntimeError: first attempt")
    import os
    os.utime(run / "error.txt", (1, 1))  # older than the results written next
    (run / "results.json").write_text(json.dumps({"steps": 4, "wall_time_s": 1.0, "final": {"accuracy": 0.5},
                                                  "best": {"metric": "accuracy", "value": 0.5, "step": 4}}))
    assert [r.status for r in collect(sweep)] == ["ok"]


def test_the_best_run_of_a_loss_sweep_is_the_lowest(tmp_path):
    sweep = tmp_path / "sweep"
    for num, value in enumerate([0.52, 0.31, 0.47]):
        fake_run(sweep, num, [f"optimizer.lr={num}e-4"], best=value, final=value, metric="loss")
    assert best_run(collect(sweep)).job == "1"
    # results.json from before greater_is_better was written: higher is better
    assert best_run(collect(fabricated_sweep(tmp_path))).job == "1"
