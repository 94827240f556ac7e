"""Training: configuration, distributed set-up, optimiser and schedule, checkpoints with exact
resume, evaluation and metrics. ``train.py`` at the repository root is the entry point."""
