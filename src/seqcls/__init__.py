"""seqcls: Hydra-composed fine-tuning of Hugging Face models for sequence classification."""

from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from seqcls.config import register_configs
from seqcls.env import launcher_rank, package_dir

__version__ = "0.1.0"

OmegaConf.register_new_resolver("seqcls.package_dir", package_dir, replace=True)


def _hydra_subdir(output_dir: str) -> str | None:
    """Where Hydra records this invocation's config: .hydra/ on the first run in a dir, a new
    .hydra-<time> folder on later ones (a resume, a mistyped re-run), so none is overwritten;
    nothing on ranks other than the launcher's rank 0."""
    if launcher_rank() != 0:
        return None
    if not (Path(output_dir) / ".hydra").exists():
        return ".hydra"
    return f".hydra-{datetime.now():%Y%m%d-%H%M%S-%f}"


OmegaConf.register_new_resolver("seqcls.hydra_subdir", _hydra_subdir, replace=True)
# The first value that is set: conf/train.yaml makes an explicit run_dir Hydra's output dir too.
OmegaConf.register_new_resolver("seqcls.first", lambda *values: next((v for v in values if v), None), replace=True)
register_configs()
