"""The generic trainer (``trainer.train``), its objectives, optimiser, checkpoints and metrics."""
