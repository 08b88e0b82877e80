"""Hydra's submitit launchers, with what a training job of several tasks needs.

Named by conf/hydra/launcher/submitit_{slurm,local}.yaml (``_target_``).

hydra-submitit-launcher submits one job per sweep point; every task (rank) of a job unpickles the
launcher and runs the whole Hydra job, so without care every rank writes ``.hydra/`` and the job
log into the same run dir. These subclasses add 1 and 2 and rely on 3:

1. ranks other than 0 run with ``hydra.output_subdir=null`` and ``hydra/job_logging=none``:
   rank 0 alone writes the run dir (seqcls' own files are rank-0-only already);
2. ``tasks_per_node`` must equal ``gpus_per_node``: one task per GPU, each task one rank, no
   torchrun inside the job (tasks are ranks of one run, never sweep points); srun gets
   ``--kill-on-bad-exit=1``, so a rank that crashes does not leave the others hanging; and the
   sweep waits for every job even when one dies without a result (``collect_returns``);
3. requeueing works as submitit designed it: submitit installs its
   time-out/preemption handler (USR2) before the job runs; the trainer takes the signal over, saves
   a checkpoint at the next step boundary and hands the signal back to that handler
   (``seqcls.trainer.StopSignal.forward_or_exit``), which calls the launcher's ``checkpoint`` (the plugin's:
   resubmit ``__call__`` with the same arguments) and requeues the job. Same job number, same
   sweep dir: the requeued job runs in the same run dir, where ``restore_from=latest`` resumes.

Torch's rendezvous (MASTER_ADDR/PORT) comes from the Slurm environment in
``seqcls.distributed.set_rendezvous_env``, so a plain ``srun python -m seqcls.train`` works too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Overrides for ranks other than 0: no .hydra/ copy of the config, no log file handler.
QUIET_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=none")


def check_one_task_per_gpu(params: dict[str, Any]) -> None:
    gpus, tasks = params.get("gpus_per_node"), params.get("tasks_per_node", 1)
    if gpus and tasks != gpus:
        raise ValueError(f"hydra.launcher.tasks_per_node={tasks} but gpus_per_node={gpus}: seqcls runs one task "
                         f"(rank) per GPU; set tasks_per_node={gpus}")


def run_task(call: Callable[..., Any], sweep_overrides: list[str], *args: Any) -> Any:
    """Run one task of a submitit job through the plugin's ``__call__`` (Hydra's run_job)."""
    import submitit

    if submitit.JobEnvironment().global_rank != 0:
        sweep_overrides = [*sweep_overrides, *QUIET_RANK_OVERRIDES]  # a new list: checkpoint() resubmits the original
    return call(sweep_overrides, *args)


def collect_returns(jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
    """Rank 0's JobReturn of every job, waiting for all of them. A job that died without one (killed,
    out of memory, node failure, time limit) becomes a failed JobReturn instead of an exception that
    would stop the wait at the first such job and leave the others unwatched."""
    returns = []
    for job, overrides in zip(jobs, job_overrides):
        error = job.exception()  # waits for the job
        if error is None:
            returns.append(job.results()[0])
        else:
            log.error("job %s (%s) died: %s", job.job_id, " ".join(filter_overrides(overrides)),
                      str(error).strip().splitlines()[0])
            returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error))
    return returns


def submit_and_wait(launcher: plugin.BaseSubmititLauncher, job_overrides: Sequence[Sequence[str]],
                    initial_job_idx: int) -> list[JobReturn]:
    """The plugin's ``launch`` (hydra-submitit-launcher 1.2.0), waiting through collect_returns."""
    import submitit

    assert launcher.config is not None
    cluster, params = launcher._EXECUTOR, launcher.params
    init_keys = {"submitit_folder", "max_num_timeout"}
    executor = submitit.AutoExecutor(cluster=cluster, folder=params["submitit_folder"],
                                     **{f"{cluster}_{k}": v for k, v in params.items() if k == "max_num_timeout"})
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base_keys else f"{cluster}_{k}": v for k, v in params.items()
                                  if k not in init_keys})
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    log.info(f"Submitit '{cluster}' sweep output dir : {sweep_dir}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    jobs = executor.map_array(launcher, *zip(*job_params))
    return collect_returns(jobs, job_overrides)


class SlurmLauncher(plugin.SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        check_one_task_per_gpu(params)
        super().__init__(**params)
        # A rank that dies ends the job: the others would wait in their next collective until the
        # process-group timeout, and the sweep with them.
        self.params["srun_args"] = ["--kill-on-bad-exit=1", *(self.params.get("srun_args") or [])]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return submit_and_wait(self, job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):  # type: ignore[override]
        return run_task(super().__call__, sweep_overrides, job_dir_key, job_num, job_id, singleton_state)


class LocalLauncher(plugin.LocalLauncher):
    def __init__(self, **params: Any) -> None:
        check_one_task_per_gpu(params)
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return submit_and_wait(self, job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):  # type: ignore[override]
        import submitit

        # Local tasks are not Slurm tasks: give them torchrun's variables (rank, world size, rendezvous).
        if submitit.JobEnvironment().num_tasks > 1 and "RANK" not in os.environ:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return run_task(super().__call__, sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
