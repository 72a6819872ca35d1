"""`python3 -m evaluation ...` = `evaluation/evaluate.sh ...`."""

import sys

from .cli import main

sys.exit(main())
