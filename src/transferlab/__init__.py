"""transferlab: train, fine-tune, evaluate and ensemble image classifiers; write the report."""

from .api import Model, ensemble, finetune, load, soup, train

__version__ = "0.1.0"
__all__ = ["Model", "ensemble", "finetune", "load", "soup", "train"]
