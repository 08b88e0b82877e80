"""Every config option composes, the schema rejects wrong keys/types/values, the CLI prints the config."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from seqcls.config import ConfigError
from tests.conftest import REPO, compose_cfg

GROUPS = ["model", "dataset", "peft", "distributed", "optimizer", "lr_scheduler", "logger"]


def options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_passes_schema_checks(group, option):
    overrides = [f"{group}={option}"]
    if option == "files":
        overrides += ["dataset.train_file=a.csv", "dataset.validation_file=b.csv"]
    cfg = compose_cfg(overrides)
    OmegaConf.to_object(cfg)  # runs __post_init__ checks on every block
    assert OmegaConf.select(cfg, group) is not None
    if group == "model":
        assert cfg.model.num_labels == cfg.dataset.num_labels
        assert cfg.model.pretrained_model_name_or_path or cfg.model.model_type


def test_defaults_mirror_the_seed_recipe():
    cfg = compose_cfg([])
    assert cfg.model.pretrained_model_name_or_path == "FacebookAI/roberta-large"
    assert cfg.dataset.task == "mrpc" and cfg.peft.enabled and list(cfg.peft.target_modules) == ["*.query", "*.value"]
    assert cfg.dataloader._target_ == "torchdata.stateful_dataloader.StatefulDataLoader"
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer._partial_


def test_minilm_resolves_to_the_installed_package_folder():
    cfg = compose_cfg(["model=minilm_l6"])
    path = Path(cfg.model.pretrained_model_name_or_path)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def test_glue_tasks_have_their_label_spaces():
    assert compose_cfg(["dataset=glue_stsb"]).dataset.num_labels == 1
    mnli = compose_cfg(["dataset=glue_mnli"]).dataset
    assert mnli.num_labels == 3 and list(mnli.validation_splits) == ["validation_matched", "validation_mismatched"]


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_cfg(["step_scheduler.no_such_key=3"])


def test_wrong_type_is_rejected_with_the_key_name():
    with pytest.raises(ConfigCompositionException, match="local_batch_size"):
        compose_cfg(["step_scheduler.local_batch_size=many"])


@pytest.mark.parametrize("override,needle", [
    ("optimizer.lr=0", "optimizer.lr"), ("optimizer.lr=-1e-3", "optimizer.lr"),
    ("step_scheduler.max_steps=-5", "step_scheduler.max_steps"),
    ("distributed.tp_size=2", "tp_size"), ("distributed.cp_size=2", "cp_size"),
    ("lr_scheduler.warmup_ratio=1.5", "warmup_ratio"), ("dataset.max_length=0", "max_length"),
    ("compile.scope=layers", "compile.scope must be model or blocks"),
    ("compile.varlen_kernel=fast", "compile.varlen_kernel must be auto, flash, efficient or short"),
    ("compile.dropout_masks=cuda", "compile.dropout_masks must be auto, inductor, triton or triton_bits, got 'cuda'"),
    ("dataset=glue_stsb loss.label_smoothing=0.1", "apply to classification"),
    ("dataset=files dataset.task=regression", "set dataset.num_labels=1"),
    ("dataset=glue_stsb checkpoint.best_metric=f1", "use one of pearson, spearmanr, loss"),
    ("dataset=glue_cola checkpoint.best_metric=mcc step_scheduler.early_stopping_threshold=-1", "threshold must be >= 0"),
])
def test_impossible_values_fail_the_schema_checks(override, needle):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError, match=needle):
        OmegaConf.to_object(cfg)


def test_cli_prints_the_composed_job_config():
    out = subprocess.run([sys.executable, "-m", "seqcls.train", "--cfg", "job", "dataset=glue_sst2",
                          "model=minilm_l6", "optimizer.lr=1e-4"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.dataset.task == "sst2" and cfg.optimizer.lr == 1e-4


@pytest.mark.parametrize("direction,best_metric,fails", [
    ("maximize", "loss", True), ("minimize", "loss", False), ("minimize", "null", True), ("maximize", "null", False),
    ("[minimize]", "null", True)])
def test_a_sweep_that_points_away_from_the_best_metric_is_refused_before_training(tmp_path, direction, best_metric,
                                                                                  fails):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from seqcls.train import CONF_DIR, check_sweep_direction, run
    overrides = ["hydra/sweeper=optuna_lora", f"hydra.sweeper.direction={direction}",
                 f"checkpoint.best_metric={best_metric}", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with_hydra = compose(config_name="train", return_hydra_config=True, overrides=overrides)
        cfg = compose(config_name="train", overrides=overrides)  # what a job's main() is handed
    with_hydra.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(with_hydra)
    try:
        if fails:  # through run(): the check comes before anything is built
            with pytest.raises(ConfigError, match="add hydra.sweeper.direction="):
                run(cfg)
            assert not (tmp_path / "run").exists()
        else:
            check_sweep_direction(cfg)
    finally:
        HydraConfig.instance().cfg = None
