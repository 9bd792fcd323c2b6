"""`python -m scaletrain ...` (what torchrun runs on every rank)."""

import sys

from scaletrain.cli import main

sys.exit(main())
