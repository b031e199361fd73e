"""Checkpoint files (`formats`: read, check and write; never builds a model) and the three public
ways to get a model (`build`: `create_model`, `sparsify`, `load`)."""
