"""The names the runs leave in MLflow: tags, metrics, artifacts and the Model Registry's models,
aliases and version tags. The trainer, the driver, the report and the registry ask here."""

from __future__ import annotations

# ---------------------------------------------------------------- metrics and artifacts

TEST_ACCURACY, TEST_AUC = "test_accuracy", "test_auc"  # a run's, on its fold's test set
MODEL_ARTIFACT = "model"  # a run's published model (models.serving), its registry version's source
MODEL_CARD = "MODEL_CARD.md"  # a registered version's card, in its run's artifacts
REPORT_ARTIFACTS = (
    "report"  # the report's folder among a parent run's artifacts (and a run's curves)
)


def ensemble_artifact(network: str) -> str:
    """Where the parent run of `cxr run` holds `network`'s fold ensemble."""
    return f"ensemble-{network}"


# ---------------------------------------------------------------- the Model Registry

# registry version tags (with FOLD, NETWORK, FINGERPRINT, SPLIT_HASH and the test metrics)
RUN_ID, MEMBER_RUNS, FOLDS, MEMBERS_MEAN = "run_id", "member_runs", "folds", "members_mean_"
ENSEMBLE_ALIAS = "ensemble"  # the newest version of a fold ensemble: models:/<ensemble>@ensemble


def registered_model_name(config_name: str, network: str) -> str:
    """The registered model whose versions are a config's runs of `network`, one per fold."""
    return f"cxr-{config_name or 'default'}-{network}"


def ensemble_model_name(config_name: str, network: str) -> str:
    """The registered fold ensemble of a config's `network`."""
    return f"{registered_model_name(config_name, network)}-ensemble"


def fold_alias(fold: int) -> str:
    """The alias of fold `fold`'s newest version of a network's model: models:/<name>@fold3."""
    return f"fold{fold}"


# ---------------------------------------------------------------- tags

FOLD, NETWORK, PROTOCOL, VALIDATION = "fold", "network", "protocol", "validation"
SPLIT_HASH, SELECTION_ON_TEST_POOL = "split_hash", "selection_on_test_pool"
FINGERPRINT, STORE_KEY = "cxr.fingerprint", "cxr.store_key"
ROLE, EXPERIMENT_ROLE = "cxr.role", "experiment"  # the parent run of a `cxr run`
STALE = "cxr.stale"  # on a run moved aside by --restart-stale
EPOCHS_REDONE = "cxr.epochs_redone"  # epochs trained twice: the checkpoint after them did not load
MODEL_URI = "cxr.model_uri"  # a finished run's published model (also in its done.json)
WORKDIR = "cxr.workdir"  # on the parent run: the workdir whose runs it holds
PARENT_RUN = "mlflow.parentRunId"
SOURCE_NAME = "mlflow.source.name"
# where a run ran (orchestrator.cluster.devices measures them)
NODE_IP, NODE_ID, RAY_GPU_IDS, TF_GPUS = "cxr.node_ip", "cxr.node_id", "cxr.gpu_ids", "cxr.tf_gpus"
CUDA_BUILD, CUDNN_BUILD = "cxr.tf_cuda_version", "cxr.tf_cudnn_version"
NODE_CPUS, NODE_MEMORY_GB = "cxr.node_cpus", "cxr.node_memory_gb"  # the machine a run trained on
WORKER_PID = "cxr.worker_pid"  # the process of the run's latest attempt on that node
RESUMED_FROM = "cxr.resumed_from"  # the epoch of the checkpoint the latest attempt resumed from
# an external validation's run (`cxr evaluate`), beside the model it evaluated
EVALUATION_ROLE = "evaluation"
EVALUATED_MODEL, EVALUATION_DATA = "cxr.evaluated_model", "cxr.evaluation_data"
# `cxr tune`'s parent and trials
TUNE_ROLE, TRIAL_ROLE, STOPPED_EARLY = "tune", "tune-trial", "cxr.stopped_early"
