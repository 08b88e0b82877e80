"""seqcls: Hydra-composed fine-tuning of Hugging Face models for sequence classification."""

from omegaconf import OmegaConf

from seqcls.config import register_configs
from seqcls.models import package_dir

__version__ = "0.1.0"

OmegaConf.register_new_resolver("seqcls.package_dir", package_dir, replace=True)
register_configs()
