"""Entry point: ``python -m seqcls.train [overrides]``. Composes the config and calls ``run``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import seqcls  # noqa: F401  (registers the schema and resolvers)
from seqcls.config import ConfigError
from seqcls.data import DataError
from seqcls.trainer import NonFiniteLossError

log = logging.getLogger("seqcls")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
USER_ERRORS = (ConfigError, DataError, NonFiniteLossError)


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
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one run from a composed config; returns results.json's content."""
    from seqcls.build import build_trainer

    OmegaConf.to_object(cfg)  # runs the schema checks (__post_init__) on the composed values
    run_dir = resolve_run_dir(cfg)
    setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0)
    trainer = build_trainer(cfg, run_dir)
    if trainer.dist.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    results = trainer.fit()
    if trainer.dist.is_writer:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        final = results["final"] or {}
        log.info("done: %d steps in %.1f s; final validation %s; best %s=%.4f at step %s", results["steps"],
                 results["wall_time_s"], " ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float)),
                 results["best"]["metric"], results["best"]["value"] or float("nan"), results["best"]["step"])
    return results


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    best = results["best"]["value"]
    return float(best) if best is not None else None


if __name__ == "__main__":
    main()
