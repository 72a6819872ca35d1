"""`python3 -m evaluation.study ...` = `evaluation/experiment.sh ...`: the low-data study's runner (run.py)."""

import sys

from .run import main

sys.exit(main())
