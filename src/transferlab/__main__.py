"""`python -m transferlab` (and `torchrun ... -m transferlab train ...`)."""

import sys

from .cli import console

sys.exit(console())
