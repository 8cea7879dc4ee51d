"""transferlab: train, fine-tune, evaluate and ensemble image classifiers; write the report."""

__version__ = "0.1.0"
