"""Raw chest X-ray datasets -> manifest -> splits -> image store -> tf.data.

Nothing in this package imports `orchestrator`: data flows one way.
"""
