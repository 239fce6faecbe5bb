"""Ray Job entrypoint for training: ``python jobs/train.py <recipe> --config FILE [key=value ...]``.

Submitted with ``wsss submit train [--recipe toco] ...`` (or ``ray job submit -- python jobs/train.py
segmenter ...``); it runs on the cluster's head node, connects to that cluster and starts the Ray
Train workers there.
"""

import sys

from wsss_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
