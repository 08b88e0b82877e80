"""seqcls' submitit launchers for Hydra (conf/hydra/launcher/submitit_{slurm,local}.yaml).

Hydra instantiates launchers only from the ``hydra_plugins`` namespace package, so they live here.
"""
