"""torchrun entry of tests/test_distributed.py: several runs of seqcls.train's CLI in one launch.

Starting the ranks (importing torch, transformers, ...) costs far more on 2 cores than a tiny run,
so the 2-rank runs share one launch and one gloo group: argv[1] is a JSON list of override lists,
each run as `python -m seqcls.train <overrides>` would run it.
"""

import datetime
import json
import sys

import torch.distributed as dist

from seqcls import train

if __name__ == "__main__":
    runs = json.loads(sys.argv[1])
    # A collective that one rank misses fails within a minute instead of hanging the test suite.
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=1))
    for overrides in runs:
        sys.argv = [sys.argv[0], *overrides]
        train.main()
    dist.destroy_process_group()
