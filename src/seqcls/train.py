"""Entry point: ``python -m seqcls.train [overrides]``. Composes the config and calls ``run``."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import seqcls  # noqa: F401  (registers the schema and resolvers)
from seqcls.env import launcher_rank
from seqcls.errors import ConfigError, DataError, NonFiniteLossError

log = logging.getLogger("seqcls")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# Mistakes a user can make: one line on stderr, exit code 2, no traceback (HYDRA_FULL_ERROR=1 shows it).
USER_ERRORS = (ConfigError, DataError, NonFiniteLossError, OmegaConfBaseException)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("run_dir is not set; pass run_dir=DIR")


def setup_logging(is_writer: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_writer else logging.ERROR,
                        format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not is_writer:  # the same Python warnings would print once per rank; rank 0 shows them
        warnings.simplefilter("ignore")
    import transformers
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; our log says what loaded
    # torchdata calls a deprecated torch API on every loader; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".set_vital. is deprecated")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run from a composed config; returns results.json's content."""
    # Heavy imports (torch, transformers, datasets) only when there is a run: `--cfg job` stays fast.
    from seqcls.build import build_trainer
    from seqcls.distributed import shutdown_distributed
    from seqcls.loggers import plot_curves
    from seqcls.trainer import StopSignal

    OmegaConf.to_object(cfg)  # runs the schema checks (__post_init__) on the composed values
    check_sweep_direction(cfg)
    run_dir = resolve_run_dir(cfg)
    setup_logging(launcher_rank() == 0)
    trainer = build_trainer(cfg, run_dir)  # resumes from the run dir's latest checkpoint if there is one
    run_dir = trainer.run_dir
    if trainer.finished and (run_dir / "results.json").exists():
        shutdown_distributed(trainer.dist)
        log.info("the run in %s is already complete; its results stay as they are (pass a new run_dir "
                 "to train again)", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    if trainer.dist.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():  # a resumed run keeps the config it started with
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    trainer.stop_signal = StopSignal()
    try:
        results = trainer.fit()
    finally:
        trainer.stop_signal.restore()
        trainer.metrics_log.close()
        shutdown_distributed(trainer.dist)
    if trainer.dist.is_writer:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    if results["preempted"]:
        log.warning("stopped by signal at step %d after saving a checkpoint; re-run the same command to resume",
                    results["steps"])
        trainer.stop_signal.forward_or_exit()
    from seqcls import gemm
    if gemm.ENABLED:
        log.info(gemm.summary())
    if trainer.dist.is_writer:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        final = results["final"] or {}
        log.info("done: %d steps%s in %.1f s; final validation %s; best %s=%.4f at step %s", results["steps"],
                 " (stopped early)" if results["early_stopped"] else "", results["wall_time_s"], " ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float)),
                 results["best"]["metric"], float("nan") if results["best"]["value"] is None else results["best"]["value"],
                 results["best"]["step"])
    return results


def record_failure(cfg: DictConfig, error: Exception) -> None:
    """In a sweep, rank 0 writes <run_dir>/error.txt (the error, then its traceback): seqcls.report
    lists it. A single run only prints: a mistyped re-run must not write into an existing run dir."""
    if launcher_rank() != 0 or not in_sweep():
        return
    try:
        run_dir = resolve_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}")
    except Exception:  # no run dir to write to: the error still reaches the caller
        pass


def check_sweep_direction(cfg: DictConfig) -> None:
    """An optimising sweeper that takes a ``direction`` (Optuna's; its own default is minimize) and points it
    against checkpoint.best_metric, the value each job returns, would pick the worst runs: maximising a loss,
    or minimising an accuracy. Sweepers without that setting are not checked."""
    if not in_sweep():
        return
    from hydra.core.hydra_config import HydraConfig
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction")
    if direction is None:
        return
    from seqcls.metrics import greater_is_better, main_metric
    metric = cfg.checkpoint.best_metric or main_metric(cfg.dataset.task, cfg.dataset.num_labels)
    want = "maximize" if greater_is_better(metric) else "minimize"
    if want not in str(direction).lower():
        raise ConfigError(f"the sweeper's direction is {direction} but each job returns its best {metric}, where "
                          f"{'higher' if want == 'maximize' else 'lower'} is better; add hydra.sweeper.direction={want}")


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the best validation value of the main metric: what a --multirun sweeper optimises."""
    _HeldStderr.release()  # the config composed: from here on stderr is the run's
    try:
        results = run(cfg)
    except Exception as e:
        record_failure(cfg, e)
        # In a sweep the error goes to Hydra, which marks this point failed and lets the others finish.
        if isinstance(e, USER_ERRORS) and not in_sweep() and os.environ.get("HYDRA_FULL_ERROR") != "1":
            msg = str(e).strip().splitlines()[0] if isinstance(e, OmegaConfBaseException) else str(e)
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        raise
    if launcher_rank() == 0:  # a re-run that succeeds in the same run dir is no longer failed
        (resolve_run_dir(cfg) / "error.txt").unlink(missing_ok=True)
    best = results["best"]["value"]
    return float(best) if best is not None else None


class _HeldStderr:
    """While Hydra composes the config, stderr is held back; if composition fails (unknown key or
    option, wrong type), Hydra's several-line report is cut to two lines: the problem and the fix."""

    active: "_HeldStderr | None" = None

    def __init__(self):
        self.buffer, self.real = io.StringIO(), sys.stderr

    @classmethod
    def release(cls) -> None:
        held = cls.active
        if held is not None and sys.stderr is held.buffer:
            sys.stderr = held.real
            held.real.write(held.buffer.getvalue())
        cls.active = None


_NOISE = ("full_key:", "reference_type", "object_type", "Config search path", "provider=",
          "Set the environment variable HYDRA_FULL_ERROR", "To append to your config")


def condense_hydra_error(text: str) -> str:
    """Hydra's composition error as two lines: what is wrong, and what is valid or where to look."""
    problem, options, in_options = [], [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(_NOISE):
            in_options = False
            continue
        if stripped.startswith("Available options in"):
            in_options = True
            continue
        if in_options and line[:1] in ("\t", " "):
            options.append(stripped)
            continue
        in_options = False
        problem.append(stripped.rstrip("."))
    fix = (f"valid options: {', '.join(options)}" if options else
           "fix the override; `python -m seqcls.train --cfg job` prints every key with its value")
    return f"error: {'; '.join(problem)}\n{fix}\n"


def cli() -> None:
    """`python -m seqcls.train`: Hydra's entry point with short composition errors."""
    passthrough = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info", "-sc", "--shell-completion")
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or any(a.split("=")[0] in passthrough for a in sys.argv[1:]):
        main()
        return
    held = _HeldStderr.active = _HeldStderr()
    sys.stderr = held.buffer
    try:
        main()
    except SystemExit as e:
        if _HeldStderr.active is held and e.code not in (0, None):  # failed before the run started
            sys.stderr = held.real
            _HeldStderr.active = None
            held.real.write(condense_hydra_error(held.buffer.getvalue()))
            raise SystemExit(2) from None
        raise
    finally:
        _HeldStderr.release()


if __name__ == "__main__":
    cli()
