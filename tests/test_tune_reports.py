"""The runs' epochs reach Ray Tune as they train (orchestrator.cluster.reports): `run_grid` on a
local Ray, the run trained in its trial (Ray Train's local mode), returns what Tune holds, one
report per epoch and the test metrics last, the same as the run's history.csv and its MLflow run.
The Train-worker path is checked on tests/test_orchestration.py's 2-node cluster, a restarted
trial on tests/test_paper_local.py's killed worker, both with `assert_tune_matches`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis, ResultGrid

from data_pipeline.columns import EPOCH_METRICS
from orchestrator.config import load_config, resolved
from orchestrator.paths import RunPaths
from orchestrator.tracking.names import TEST_ACCURACY, TEST_AUC
from orchestrator.tracking.records import RunRecords
from orchestrator.training.job import RunJob
from tests.conftest import PAPER_SHRINK, ROOT, local_ray
from tests.ray_clusters import short_temp_dir


def tune_results(ray_results: Path, experiment: str):
    """What Tune holds of a finished `cxr run`: its histories and test metrics, read back from the
    grid's results folder (under the workdir's `ray`) as a ResultGrid; no Ray needed to read it."""
    from orchestrator.cluster.reports import histories

    return histories(ResultGrid(ExperimentAnalysis(str(ray_results / f"{experiment}-grid"))))


def assert_tune_matches(
    histories: dict[str, pd.DataFrame],
    tests: dict[str, dict],
    workdir: Path,
    uri: str,
    runs: list[str],
) -> None:
    """Each run's Tune history is its history.csv, row for row, and its MLflow metric history;
    its last report holds the test metrics its MLflow run holds."""
    assert sorted(histories) == sorted(runs) and sorted(tests) == sorted(runs), (
        sorted(histories),
        sorted(tests),
    )
    client = MlflowClient(uri)
    for name in runs:
        paths = RunPaths(workdir / "runs" / name)
        tuned, written = histories[name], pd.read_csv(paths.history)
        fold, network = name.removeprefix("fold").split("-")
        assert (tuned["fold"] == int(fold)).all() and (tuned["network"] == network).all(), name
        assert (
            tuned["training_iteration"].tolist()
            == tuned["step"].tolist()
            == list(range(1, len(written) + 1))
        )
        assert tuned["phase"].tolist() == written["phase"].tolist(), name
        run_id = RunRecords(paths).read_mlflow_run()
        for key in EPOCH_METRICS:
            column = tuned[key] if key in tuned else pd.Series(math.nan, index=tuned.index)
            assert column.tolist() == pytest.approx(written[key].tolist(), rel=1e-9, nan_ok=True), (
                name,
                key,
            )
            logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            assert logged == pytest.approx(
                {
                    int(s): v
                    for s, v in zip(tuned["step"], column, strict=False)
                    if not math.isnan(v)
                },
                rel=1e-6,
            ), (name, key)
        metrics = client.get_run(run_id).data.metrics
        assert tests[name] == pytest.approx(
            {k: metrics[k] for k in (TEST_ACCURACY, TEST_AUC) if k in metrics}
        ), name
        assert TEST_ACCURACY in tests[name], name


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """configs/paper.yaml shrunk to one run (fold 1, Xception) of 3 epochs, validated at the
    second only, through `run_grid` in this process on a local Ray of its own. The run fails once
    after its first epoch's report (execution.fail_at), before any checkpoint: Tune restarts the
    trial, which trains and reports that epoch again."""
    from orchestrator.cluster import grid
    from orchestrator.driver.data import prepare_inputs
    from orchestrator.tracking.experiment import check_tracking, parent_run

    work = tmp_path_factory.mktemp("tune") / "work"
    overrides = [a.removeprefix("--set=") for a in PAPER_SHRINK] + [
        f"workdir={work}",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        "cluster.gpus_per_run=0",
        "train.epochs=3",
        "train.validation_freq=2",
        "execution.fail_at=fold1-xception:1",
    ]
    config = resolved(load_config(ROOT / "configs" / "paper.yaml", overrides))
    check_tracking(config.tracking_target, config.paths.mlruns)
    temp = short_temp_dir()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(
                "RAY_TMPDIR", temp
            )  # the local Ray's own temp folder, beside any other Ray here
            with local_ray():
                prepare_inputs(config)
                parent = parent_run(config.tracking_target, config.paths, config.splits.protocol)
                outcome = grid.run_grid(
                    [RunJob.of(config, 1, "xception")],
                    config.paths,
                    config.cluster,
                    config.cache,
                    config.experiment_name,
                    parent,
                )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return {"outcome": outcome, "config": config}


def test_run_grid_returns_each_epoch_and_the_test_metrics_that_tune_holds(tiny_grid):
    outcome, config = tiny_grid["outcome"], tiny_grid["config"]
    assert outcome.runs == {"fold1-xception": "done"}
    history = outcome.histories["fold1-xception"]
    assert history["step"].tolist() == [1, 2, 3]
    assert history["val_accuracy"].notna().tolist() == [
        False,
        True,
        False,
    ]  # validated at the second only
    assert_tune_matches(
        outcome.histories,
        outcome.test_metrics,
        config.paths.root,
        config.tracking_uri,
        ["fold1-xception"],
    )
    # the same as the grid's results folder holds (what the other modules' checks read)
    histories, tests = tune_results(config.paths.ray_results, config.experiment_name)
    assert histories["fold1-xception"].equals(history) and tests == outcome.test_metrics
    # Tune's own record: the first epoch from both attempts, the last step again with the test
    # metrics
    (result,) = ResultGrid(
        ExperimentAnalysis(str(config.paths.ray_results / f"{config.experiment_name}-grid"))
    )
    assert result.metrics_dataframe["step"].tolist() == [1, 1, 2, 3, 3]
    assert result.metrics[TEST_ACCURACY] == outcome.test_metrics["fold1-xception"][TEST_ACCURACY]
