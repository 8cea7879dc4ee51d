"""transferlab: train, fine-tune, evaluate and ensemble image classifiers; write the report."""

import time

STARTED = time.time()  # before torch is imported: `auto`'s budget counts the start-up too

from .api import Model, ensemble, finetune, load, soup, train  # noqa: E402
from .config import UserError  # noqa: E402  (every mistake the API refuses, in the CLI's words)

__version__ = "0.1.0"
__all__ = ["Model", "UserError", "ensemble", "finetune", "load", "soup", "train"]
