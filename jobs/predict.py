"""Ray Job entrypoint for prediction: ``python jobs/predict.py --checkpoint URI --dataset URI --output URI``.

Submitted with ``wsss submit predict ...`` (or ``ray job submit -- python jobs/predict.py ...``).
"""

import sys

from wsss_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
