"""`python3 -m evaluation ...` = `evaluation/evaluate.sh ...`."""

import sys

from .evaluate.cli import main

sys.exit(main())
