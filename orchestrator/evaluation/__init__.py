"""The numbers and pictures of finished runs: metrics with intervals, pooling, results by source
dataset, figures, and the source audit."""
