"""Orchestration: the `cxr` command line, configs, training runs, Ray, MLflow and the report.

Only this package knows about Ray; `data_pipeline` and `models` never import it.
"""
