"""Training: configuration, distributed set-up, the training step (``step.train_step``, shared by
the trainer, the experiments and the benchmarks), optimiser and schedule, checkpoints with exact
resume, evaluation and metrics. ``llama_mini.training.command`` is the entry point (``llama-mini
train``, and ``train.py`` at the repository root)."""
