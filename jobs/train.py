"""Ray Job entrypoint for training the segmenter: ``python jobs/train.py --config FILE [key=value ...]``.

Submitted with ``wsss submit train ...`` (or ``ray job submit -- python jobs/train.py ...``); it runs
on the cluster's head node, connects to that cluster and starts the Ray Train workers there.
"""

import sys

from wsss_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "segmenter", *sys.argv[1:]]))
