"""Ray Job entrypoint for labeling: ``python jobs/label.py --config FILE [key=value ...]``.

Submitted with ``wsss submit label ...`` (or ``ray job submit -- python jobs/label.py ...``); it runs
on the cluster's head node and connects to that cluster.
"""

import sys

from wsss_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
