"""seqcls: Hydra-composed fine-tuning of Hugging Face models for sequence classification."""

from omegaconf import OmegaConf

from seqcls.config import register_configs
from seqcls.distributed import launcher_rank
from seqcls.models import package_dir

__version__ = "0.1.0"

OmegaConf.register_new_resolver("seqcls.package_dir", package_dir, replace=True)
# The value on the launcher's rank 0, null on the others (conf/train.yaml: Hydra's .hydra copy).
OmegaConf.register_new_resolver("seqcls.rank_zero_only", lambda value: value if launcher_rank() == 0 else None,
                                replace=True)
register_configs()
