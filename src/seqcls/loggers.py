"""Where metrics rows go besides metrics.jsonl: TensorBoard (every run), W&B or MLflow (the ``logger``
group, off by default), and the curves plot written at the end of a run.

``trainer.MetricsLog.write`` hands each row to every logger here; rank 0 alone holds loggers. A row
is metrics.jsonl's: ``{"step", "epoch", "split", ["name"], <numbers>}``. Its numbers become scalars
tagged ``<name or split>/<key>`` (``train/loss``, ``train/lr``, ``validation/accuracy``,
``validation_matched/accuracy``) at the row's step. Each logger starts on its first row, so a run
that turns out to be complete already opens nothing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from seqcls.config import ConfigError

_NOT_SCALARS = ("step", "split", "name")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, tagged ``<name or split>/<key>``."""
    prefix = row.get("name") or row["split"]
    return {f"{prefix}/{k}": float(v) for k, v in row.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Event files under ``log_dir`` (torch.utils.tensorboard), flushed after every row."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer = Path(log_dir), None

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run redoes the rows after its checkpoint (build.set_aside_metrics): purge_step hides
            # the earlier process's events from this row's step on, as metrics.jsonl sets its rows aside.
            resumed = any(self.log_dir.glob("events.out.tfevents.*"))
            self.writer = SummaryWriter(str(self.log_dir), purge_step=row["step"] if resumed else None)
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])
        # Rows are rare (log and validation steps): flushing each keeps the file whole if the run dies.
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _run_id(path: Path, new_id) -> str:
    """The tracker's run id kept in the run dir, so a resumed run goes on logging into the same run."""
    if path.is_file():
        return path.read_text().strip()
    run_id = str(new_id())
    path.write_text(run_id + "\n")
    return run_id


class WandbLogger:
    def __init__(self, *, run_dir: Path, project: Optional[str], entity: Optional[str], run_name: str,
                 run_config: dict[str, Any]):
        self.run_dir, self.project, self.entity, self.run_name = run_dir, project, entity, run_name
        self.run_config, self.run = run_config, None

    def log(self, row: dict[str, Any]) -> None:
        import wandb
        if self.run is None:
            run_id = _run_id(self.run_dir / "wandb_run_id", wandb.util.generate_id)
            self.run = wandb.init(project=self.project, entity=self.entity, name=self.run_name, id=run_id,
                                  resume="allow", dir=str(self.run_dir), config=self.run_config)
        # W&B keeps steps increasing: rows a resumed run redoes at earlier steps are dropped there.
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MLflowLogger:
    def __init__(self, *, run_dir: Path, experiment: Optional[str], tracking_uri: Optional[str], run_name: str,
                 run_config: dict[str, Any]):
        self.run_dir, self.experiment, self.tracking_uri = run_dir, experiment, tracking_uri
        self.run_name, self.run_config, self.started = run_name, run_config, False

    def log(self, row: dict[str, Any]) -> None:
        import mlflow
        if not self.started:
            if self.tracking_uri:
                mlflow.set_tracking_uri(self.tracking_uri)
            if self.experiment:
                mlflow.set_experiment(self.experiment)
            id_file = self.run_dir / "mlflow_run_id"
            if id_file.is_file():
                mlflow.start_run(run_id=id_file.read_text().strip())
            else:
                run = mlflow.start_run(run_name=self.run_name)
                id_file.write_text(run.info.run_id + "\n")
                mlflow.log_dict(self.run_config, "config.json")
            self.started = True
        mlflow.log_metrics(scalars(row), step=row["step"])

    def close(self) -> None:
        if self.started:
            import mlflow
            mlflow.end_run()


def build_loggers(cfg: DictConfig, *, run_dir: Path, is_writer: bool) -> list:
    """TensorBoard plus the tracker the ``logger`` group names, for rank 0; nothing for the other ranks.

    Every rank checks that the tracker's package is installed, so that all of them stop together.
    The tracker records the run's whole config.
    """
    lcfg = cfg.logger
    if lcfg.backend != "none" and importlib.util.find_spec(lcfg.backend) is None:
        raise ConfigError(f"logger={lcfg.backend} needs the {lcfg.backend} package, which is not installed: "
                          f"pip install {lcfg.backend}, or leave logger=none")
    if not is_writer:
        return []
    run_dir = Path(run_dir)
    loggers: list = [TensorBoardLogger(run_dir / "tensorboard")]
    name = lcfg.run_name or run_dir.name
    run_config = OmegaConf.to_container(cfg, resolve=True) if lcfg.backend != "none" else {}
    if lcfg.backend == "wandb":
        loggers.append(WandbLogger(run_dir=run_dir, project=lcfg.project, entity=lcfg.entity, run_name=name,
                                   run_config=run_config))
    elif lcfg.backend == "mlflow":
        loggers.append(MLflowLogger(run_dir=run_dir, experiment=lcfg.project, tracking_uri=lcfg.tracking_uri,
                                    run_name=name, run_config=run_config))
    return loggers


def plot_curves(metrics_path: Path, out_png: Path) -> Optional[Path]:
    """Training and validation curves of metrics.jsonl as a PNG: loss (train and validation), the
    validation metrics, and the learning rate, against the optimizer step. None when there are no rows."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()] \
        if Path(metrics_path).is_file() else []
    if not rows:
        return None
    # The object-oriented API on the Agg canvas: no pyplot, so the caller's matplotlib backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in rows if r["split"] == "train"]
    val_names = list(dict.fromkeys(r.get("name", r["split"]) for r in rows if r["split"] == "validation"))
    fig = Figure(figsize=(15, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_val, ax_lr = fig.subplots(1, 3)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    for name in val_names:
        val = [r for r in rows if r["split"] == "validation" and r.get("name", r["split"]) == name]
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label=name)
        keys = [k for k, v in val[0].items() if k not in (*_NOT_SCALARS, "epoch", "loss", "num_examples")
                and isinstance(v, float)]
        for k in keys:
            ax_val.plot([r["step"] for r in val], [r[k] for r in val], marker="o",
                        label=k if len(val_names) == 1 else f"{name} {k}")
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    for ax, title in ((ax_loss, "loss"), (ax_val, "validation metrics"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    return out_png
