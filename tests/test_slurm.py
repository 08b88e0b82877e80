"""--multirun sweeps on a real Slurm cluster through submitit (marker ``slurm``), plus the fast checks
of the launcher configs and the Slurm rendezvous that need no cluster.

scripts/test.sh starts a local single-node Slurm (../shared/slurm) when it runs as root. Without
sbatch these tests skip, except in CI (CI=true), where a missing Slurm is a failure.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seqcls.distributed import first_slurm_host, set_rendezvous_env
from seqcls.report import collect
from seqcls.train import CONF_DIR
from tests.conftest import REPO, TINY, write_synthetic

SACCT_SHIM_DIR = "/var/spool/local-slurm/bin"  # start-local-slurm.sh's sacct stand-in (see ../shared/slurm)


# ----------------------------------------------------------------------------------- no cluster needed

def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_first_slurm_host_expands_the_first_bracket_group_of_a_node_list():
    assert first_slurm_host("vm") == "vm"
    assert first_slurm_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_slurm_host("a1,b[2-3]") == "a1"
    assert first_slurm_host("rack[1-2]-node[3,5]") == "rack1-node3"


def test_slurm_tasks_rendezvous_at_the_first_node_on_a_port_derived_from_the_job_id(monkeypatch):
    env = {"SLURM_JOB_NODELIST": "node[12-13]", "SLURM_JOB_ID": "123456"}
    monkeypatch.setattr(os, "environ", env)  # set_rendezvous_env writes os.environ: keep it off the real one
    set_rendezvous_env()
    assert env["MASTER_ADDR"] == "node12" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="4242")  # what the launcher or the user set wins
    set_rendezvous_env()
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "4242")


@pytest.mark.filterwarnings(r"ignore:\s+'hydra/launcher/submitit_")  # seqcls silences it outside pytest
def test_launcher_configs_compose_and_a_misspelt_launcher_field_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    for name in ("submitit_slurm", "submitit_local"):
        cfg = compose_with_hydra([f"hydra/launcher={name}"])
        assert cfg.hydra.launcher._target_ == f"hydra_plugins.seqcls_launcher.launcher.{name.split('_')[1].title()}Launcher"
    with pytest.raises(ConfigCompositionException, match="partiton"):
        compose_with_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=debug"])


def test_optuna_sweeper_config_maximises_over_lr_and_lora_dim_in_memory():
    cfg = compose_with_hydra(["hydra/sweeper=optuna_lora"])
    sweeper = cfg.hydra.sweeper
    assert str(sweeper.direction) in ("maximize", "Direction.maximize") and sweeper.storage is None
    assert set(sweeper.params) == {"optimizer.lr", "peft.dim"}


def test_tasks_per_node_other_than_gpus_per_node_is_refused():
    from hydra_plugins.seqcls_launcher.launcher import check_one_task_per_gpu
    check_one_task_per_gpu({"gpus_per_node": 4, "tasks_per_node": 4})
    check_one_task_per_gpu({"gpus_per_node": None, "tasks_per_node": 2})  # CPU: tasks are CPU ranks
    with pytest.raises(ValueError, match="set tasks_per_node=4"):
        check_one_task_per_gpu({"gpus_per_node": 4, "tasks_per_node": 1})


def test_a_job_that_died_without_a_result_is_a_failed_return_and_the_others_are_still_awaited():
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.seqcls_launcher.launcher import collect_returns
    from submitit.core.utils import UncompletedJobError

    class FakeJob:
        def __init__(self, job_id, error=None, value=None):
            self.job_id, self.error, self.value, self.waited = job_id, error, value, False

        def exception(self):
            self.waited = True
            return self.error

        def results(self):
            ret = JobReturn(status=JobStatus.COMPLETED)
            ret.return_value = self.value
            return [ret]

    jobs = [FakeJob("7_0", error=UncompletedJobError("Job 7_0 has not produced any output (state: CANCELLED)")),
            FakeJob("7_1", value=0.8)]
    returns = collect_returns(jobs, [["optimizer.lr=1"], ["optimizer.lr=2"]])
    assert all(j.waited for j in jobs)
    assert returns[0].status == JobStatus.FAILED and returns[0].overrides == ["optimizer.lr=1"]
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        returns[0].return_value
    assert returns[1].return_value == 0.8


# ------------------------------------------------------------------------------------ real Slurm

@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for sweep commands: sbatch reachable, sacct shim first on PATH."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the jobs' own, not ours
        env.pop(k, None)
    if os.path.isdir(SACCT_SHIM_DIR):
        env["PATH"] = f"{SACCT_SHIM_DIR}:{env['PATH']}"
    problem = None
    if shutil.which("sbatch", path=env["PATH"]) is None:
        problem = "sbatch is not on PATH (scripts/test.sh starts a local Slurm when run as root)"
    else:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20, env=env)
        if ping.returncode != 0 or "UP" not in ping.stdout:
            problem = f"no Slurm controller answers `scontrol ping`: {ping.stdout.strip()} {ping.stderr.strip()}"
    if problem:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true needs Slurm: {problem}")
        pytest.skip(f"needs Slurm: {problem}")
    return env


@pytest.fixture
def sweep_dir(tmp_path):
    """The sweep's output dir; on teardown any job the test left behind is cancelled."""
    d = tmp_path / "sweep"
    yield d
    ids = [p.name for p in (d / ".submitit").glob("*") if p.is_dir()] if (d / ".submitit").is_dir() else []
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


# One CPU per task (the test node has 2), tiny jobs, a short Slurm time limit.
LAUNCHER = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5"]


def train_overrides(data: Path, **changes) -> list[str]:
    values = {"optimizer.lr": 1e-3, "step_scheduler.max_steps": 8, "step_scheduler.global_batch_size": 16,
              "step_scheduler.local_batch_size": 16, "step_scheduler.log_every_steps": 4, **changes}
    return TINY + ["dataset=files", f"dataset.train_file={data}/train.csv", f"dataset.validation_file={data}/dev.csv",
                   "dataset.max_length=32", "checkpoint.save_consolidated=false", "device=cpu",
                   *(f"{k}={v}" for k, v in values.items())]


def start_sweep(env, sweep: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seqcls.train", "--multirun", *LAUNCHER, f"hydra.sweep.dir={sweep}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the sweep did not finish within {timeout:.0f} s:\n{out[-4000:]}")
    return proc.returncode, out


def job_returns(sweep: Path) -> dict[int, dict[int, object]]:
    """{job num: {task (rank): Hydra JobReturn}} from submitit's result pickles: what the sweeper got."""
    out: dict[int, dict[int, object]] = {}
    for pkl in sweep.glob(".submitit/*/*_result.pkl"):
        with open(pkl, "rb") as f:
            tag, value = pickle.load(f)
        assert tag == "success", f"{pkl}: {value}"
        task = int(re.search(r"_(\d+)_result\.pkl$", pkl.name).group(1))
        out.setdefault(int(value.hydra_cfg.hydra.job.num), {})[task] = value
    return out


@pytest.mark.slurm
def test_grid_of_three_points_runs_three_slurm_jobs_and_each_returns_its_best_validation_metric(
        slurm_env, sweep_dir, tmp_path):
    data = write_synthetic(tmp_path / "data", n_train=128, n_val=32)
    rc, out = finish(start_sweep(slurm_env, sweep_dir, train_overrides(data) + ["optimizer.lr=3e-4,1e-3,3e-3"]),
                     timeout=150)
    assert rc == 0, out[-4000:]
    returns = job_returns(sweep_dir)
    assert sorted(returns) == [0, 1, 2]
    rows = collect(sweep_dir)
    assert [r.status for r in rows] == ["ok"] * 3
    for r in rows:
        ret = returns[int(r.job)][0]
        assert isinstance(ret.return_value, float) and ret.return_value == r.best  # main's value is the sweep's
    assert [float(r.overrides["optimizer.lr"]) for r in rows] == [3e-4, 1e-3, 3e-3]
    assert len({ret[0].hydra_cfg.hydra.job.id for ret in returns.values()}) == 3  # three Slurm (array) jobs


@pytest.mark.slurm
@pytest.mark.dist
def test_two_task_job_trains_as_two_fsdp2_ranks_and_only_rank_0_writes_the_run_dir(slurm_env, sweep_dir, tmp_path):
    data = write_synthetic(tmp_path / "data", n_train=128, n_val=32)
    rc, out = finish(start_sweep(slurm_env, sweep_dir, train_overrides(data, **{
        "step_scheduler.local_batch_size": 8}) + ["hydra.launcher.tasks_per_node=2", "distributed=fsdp2"]),
        timeout=150)
    assert rc == 0, out[-4000:]
    tasks = job_returns(sweep_dir)[0]
    assert sorted(tasks) == [0, 1]  # both ranks ran the job ...
    assert tasks[0].return_value == tasks[1].return_value == collect(sweep_dir)[0].best  # ... as one run
    # Rank 1 ran Hydra's job without writing .hydra/ or opening the job log in the run dir.
    assert tasks[1].hydra_cfg.hydra.output_subdir is None
    assert tasks[1].hydra_cfg.hydra.job_logging.get("handlers") is None
    run_dir = sweep_dir / "0"
    assert [p.name for p in run_dir.glob(".hydra*")] == [".hydra"]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "results.json").is_file()
    rank0_err, rank1_err = (next(sweep_dir.glob(f".submitit/*/*_{t}_log.err")).read_text() for t in (0, 1))
    assert "validation" in rank0_err and "validation" not in rank1_err, rank1_err[-2000:]  # rank 1 logs errors only


def slurm_job_field(job_id: str, field: str, env) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=20, env=env)
    m = re.search(rf"\b{field}=(\S+)", shown.stdout)
    return m.group(1) if m else ""


@pytest.mark.slurm
def test_timed_out_job_is_requeued_into_its_run_dir_and_finishes_with_the_uninterrupted_metric(
        slurm_env, sweep_dir, tmp_path):
    """Job 0 gets submitit's time-out signal after its first checkpoint; job 1 (identical training:
    keep_last_k only changes pruning) runs through. Both must end with the same metrics."""
    data = write_synthetic(tmp_path / "data", n_train=256, n_val=32)
    proc = start_sweep(slurm_env, sweep_dir, train_overrides(data, **{
        "step_scheduler.max_steps": 96, "step_scheduler.ckpt_every_steps": 8,
        "step_scheduler.val_every_steps": 16}) + [
        "hydra.launcher.max_num_timeout=1",  # timeout_min <= 10: submitit takes any USR2 for a time-out
        "checkpoint.keep_last_k=2,3"])
    try:
        deadline = time.time() + 90
        while not (sweep_dir / "0" / "checkpoints" / "LATEST").is_file():
            assert time.time() < deadline and proc.poll() is None, "job 0 wrote no checkpoint"
            time.sleep(0.2)
        job_id = str(yaml.safe_load((sweep_dir / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=20, env=slurm_env)
    finally:
        rc, out = finish(proc, timeout=180)
    assert rc == 0, out[-4000:]
    assert slurm_job_field(job_id, "Restarts", slurm_env) == "1"
    log = next(sweep_dir.glob(f".submitit/{job_id}/{job_id}_0_log.out")).read_text()
    assert "Requeued job" in log
    err = next(sweep_dir.glob(f".submitit/{job_id}/{job_id}_0_log.err")).read_text()
    assert "resumed from" in err, err[-3000:]  # the signal came mid-run: the second start resumed
    assert [r.status for r in collect(sweep_dir)] == ["ok", "ok"]
    interrupted, uninterrupted = (json.loads((sweep_dir / n / "results.json").read_text()) for n in ("0", "1"))
    assert interrupted["steps"] == uninterrupted["steps"] == 96
    assert interrupted["final"] == uninterrupted["final"]  # the loss too, to the last bit
    assert interrupted["best"] == uninterrupted["best"]
    returns = job_returns(sweep_dir)
    assert returns[0][0].return_value == returns[1][0].return_value


@pytest.mark.slurm
def test_a_failing_point_does_not_stop_the_others_and_the_report_shows_its_error(slurm_env, sweep_dir, tmp_path):
    data = write_synthetic(tmp_path / "data", n_train=128, n_val=32)
    rc, out = finish(start_sweep(slurm_env, sweep_dir, train_overrides(data) + ["optimizer.lr=1e-3,-1"]), timeout=150)
    assert rc != 0 and "optimizer.lr must be > 0" in out  # Hydra reports the failed point after all have run
    ok, failed = collect(sweep_dir)
    assert ok.status == "ok" and ok.best is not None
    assert failed.status == "failed" and failed.error == "ConfigError: optimizer.lr must be > 0, got -1.0"
