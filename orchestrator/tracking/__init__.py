"""The MLflow side: calls that survive a busy store, the training runs, and the parent run."""
