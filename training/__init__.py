"""Training SAEs on language-model activations (Lightning + MLflow)."""
