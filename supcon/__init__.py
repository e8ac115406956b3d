"""Supervised-contrastive (SupCon) pretraining: data, model, loss, schedule, checkpoints, training loop."""

__version__ = "0.1.0"
