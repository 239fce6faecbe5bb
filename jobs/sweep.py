"""Ray Job entrypoint for sweeps: ``python jobs/sweep.py --config FILE [key=value ...]``.

Submitted with ``wsss submit sweep ...``; it runs on the cluster's head node and connects to that
cluster. Stopping the job (SIGTERM) saves the Tune state: resubmitting resumes the sweep.
"""

import sys

from wsss_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
