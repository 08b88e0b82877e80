"""Sweep report: ``python -m seqcls.report SWEEP_DIR`` (a --multirun output dir).

One row per run (each ``SWEEP_DIR/<job num>/`` holding ``.hydra/overrides.yaml``): its overrides, the best
and final validation metric (results.json), steps, wall time, and a status:

    ok       results.json is written (and the run was not preempted before its end)
    failed   error.txt (written by seqcls.train), or submitit recorded an error for the job, or its
             log shows Slurm ended it (scancel, time limit, node failure, out of memory)
    running  neither yet: still running, pending, stopped for a requeue, or killed without a trace

Writes SWEEP_DIR/report.md (also printed), report.csv and report.png (the best metric against each
swept field; failed and running runs are left out of the plot).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class RunRow:
    job: str
    status: str
    overrides: dict[str, str] = field(default_factory=dict)
    metric: Optional[str] = None
    best: Optional[float] = None
    best_step: Optional[int] = None
    greater_is_better: bool = True
    final: Optional[float] = None
    steps: Optional[int] = None
    wall_time_s: Optional[float] = None
    error: str = ""


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """'optimizer.lr=1e-4' -> {'optimizer.lr': '1e-4'}; '+a.b=1' keeps its key without the '+'."""
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _submitit_error(sweep_dir: Path, run_dir: Path) -> str:
    """The last line of submitit's traceback when the job died outside seqcls.train's reach."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return ""
    hydra_cfg = (yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra", {})
    job_id = str((hydra_cfg.get("job") or {}).get("id") or "")
    folder = str((hydra_cfg.get("launcher") or {}).get("submitit_folder") or "")
    if not job_id or not folder:
        return ""
    folder = Path(folder.replace("${hydra.sweep.dir}", str(sweep_dir)).replace("%j", job_id))
    result = folder / f"{job_id}_0_result.pkl"
    if not result.is_file():
        return _slurm_kill_reason(folder / f"{job_id}_0_log.err")
    try:
        with open(result, "rb") as f:
            tag, payload = pickle.load(f)
    except Exception:  # a success pickle of objects this process cannot import: not an error
        return ""
    if tag != "error":
        return ""
    lines = [ln for ln in str(payload).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "submitit: job failed"


# What slurmstepd or the kernel writes when a job ends for good without a Python error. Requeues
# ("DUE TO JOB REQUEUE", "DUE TO PREEMPTION") are left out: the job runs again.
_KILLED = re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT \S+( DUE TO (TIME LIMIT|NODE FAILURE))? \*\*\*"
                     r"|oom[-_]kill|Out Of Memory", re.IGNORECASE)


def _slurm_kill_reason(err_log: Path) -> str:
    if not err_log.is_file():
        return ""
    lines = [ln.strip() for ln in err_log.read_text(errors="replace").splitlines() if _KILLED.search(ln)]
    return lines[-1] if lines else ""


def _last_step(run_dir: Path) -> Optional[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    step = None
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", step)
        except json.JSONDecodeError:  # a line being written
            continue
    return step


def read_run(sweep_dir: Path, run_dir: Path) -> RunRow:
    row = RunRow(job=run_dir.name, status="running")
    row.overrides = parse_overrides(yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or [])
    results_path, error_path = run_dir / "results.json", run_dir / "error.txt"
    results = None
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        best, final = results.get("best") or {}, results.get("final") or {}
        row.metric, row.best, row.best_step = best.get("metric"), best.get("value"), best.get("step")
        row.greater_is_better = best.get("greater_is_better", True)
        row.final = final.get(row.metric) if row.metric else None
        row.steps, row.wall_time_s = results.get("steps"), results.get("wall_time_s")
    # An error.txt older than results.json is from an earlier attempt in the same dir.
    if error_path.is_file() and not (results is not None and results_path.stat().st_mtime > error_path.stat().st_mtime):
        row.status = "failed"
        row.error = (error_path.read_text().strip().splitlines() or ["failed (error.txt is empty)"])[0]
    elif results is not None and not results.get("preempted"):
        row.status = "ok"
    else:
        row.error = _submitit_error(sweep_dir, run_dir)
        row.status = "failed" if row.error else "running"
    if row.steps is None:
        row.steps = _last_step(run_dir)
    return row


def _job_key(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


def collect(sweep_dir: Path) -> list[RunRow]:
    runs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return [read_run(sweep_dir, p) for p in sorted(runs, key=lambda p: _job_key(p.name))]


def swept_fields(rows: list[RunRow]) -> list[str]:
    """Override keys whose value differs between runs (in first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.overrides if k not in keys]
    return [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1]


def best_run(rows: list[RunRow]) -> Optional[RunRow]:
    """The ok run with the best value of the metric (the lowest, for the loss)."""
    ok = [r for r in rows if r.status == "ok" and r.best is not None]
    return max(ok, key=lambda r: r.best if r.greater_is_better else -r.best) if ok else None


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def table(rows: list[RunRow], fields: list[str]) -> tuple[list[str], list[list[str]]]:
    metric = next((r.metric for r in rows if r.metric), "metric")
    header = ["job", "status", *fields, f"best {metric}", "best step", f"final {metric}", "steps", "wall time (s)",
              "error"]
    body = [[r.job, r.status, *(r.overrides.get(k, "") for k in fields), _fmt(r.best), _fmt(r.best_step),
             _fmt(r.final), _fmt(r.steps), "" if r.wall_time_s is None else f"{r.wall_time_s:.1f}", r.error]
            for r in rows]
    return header, body


def _short(v: str) -> str:
    """An override value for reading: optuna's 0.00012520653814999459 -> 0.0001252 (the CSV keeps it whole)."""
    x = _as_number(v)
    return f"{x:.4g}" if x is not None and len(v) > 8 else v


def markdown(sweep_dir: Path, rows: list[RunRow], fields: list[str]) -> str:
    header, body = table(rows, fields)
    body = [[*row[:2], *map(_short, row[2:2 + len(fields)]), *row[2 + len(fields):]] for row in body]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "running")}
    lines = [f"# Sweep {sweep_dir}", "",
             f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    common = {k: v for k, v in rows[0].overrides.items() if k not in fields} if rows else {}
    if common:
        lines += ["Common overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    best = best_run(rows)
    if best is not None:
        setting = " ".join(f"`{k}={_short(best.overrides.get(k, ''))}`" for k in fields) or "(no swept field)"
        lines += [f"Best run: job {best.job}, {best.metric}={best.best:.4f} at step {best.best_step}: {setting}", ""]
    lines += ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[RunRow], fields: list[str]) -> None:
    header, body = table(rows, fields)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)


def _as_number(v: str) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def plot(path: Path, rows: list[RunRow], fields: list[str]) -> None:
    """The best metric against each swept field; a numeric field spanning > 10x gets a log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "ok" and r.best is not None]
    fields = fields or ["job"]
    fig, axes = plt.subplots(1, len(fields), figsize=(4.5 * len(fields), 3.6), squeeze=False)
    metric = next((r.metric for r in rows if r.metric), "metric")
    for ax, name in zip(axes[0], fields):
        values = [r.job if name == "job" else r.overrides.get(name, "") for r in done]
        numbers = [_as_number(v) for v in values]
        if values and all(x is not None for x in numbers):
            ax.scatter(numbers, [r.best for r in done])
            if min(numbers) > 0 and max(numbers) / min(numbers) > 10:
                ax.set_xscale("log")
        else:
            cats = sorted(set(values))
            ax.scatter([cats.index(v) for v in values], [r.best for r in done])
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    failed = sum(r.status == "failed" for r in rows)
    fig.suptitle(f"{len(done)} finished runs" + (f" ({failed} failed, not shown)" if failed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(sweep_dir: Path) -> list[RunRow]:
    """Read the sweep, write report.md / report.csv / report.png into it, print the markdown."""
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"error: no runs under {sweep_dir} (expected <job num>/.hydra/overrides.yaml)")
    fields = swept_fields(rows)
    text = markdown(sweep_dir, rows, fields)
    (sweep_dir / "report.md").write_text(text)
    write_csv(sweep_dir / "report.csv", rows, fields)
    plot(sweep_dir / "report.png", rows, fields)
    print(text)
    print(f"wrote {sweep_dir / 'report.md'}, report.csv, report.png")
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqcls.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a --multirun output dir, e.g. outputs/multirun/<date>/<time>")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir} is not a directory")
    report(args.sweep_dir)


if __name__ == "__main__":
    main()
