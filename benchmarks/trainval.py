"""What the training benchmarks share: the trainval yardstick and a local Ray of 2 CPUs."""

from __future__ import annotations

import os
import sys

DATA = "../shared/benchmarks/synthshapes/trainval"


def start_ray() -> bool:
    """A local Ray (2 CPUs, quiet), or False with the reason printed when the yardstick is absent."""
    if not os.path.isdir(DATA):
        print(f"{DATA} is not here: run from the repo root with ../shared present", file=sys.stderr)
        return False
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False, logging_level="ERROR")
    return True
