"""It learns: one run of the real trainer (graph mode, the paper's augmentations, precise batch
norm, checkpoint selection on the validation set) on the demo's synthetic data beats the
always-normal baseline by far on its held-out test patients, and its model does not predict a
constant, as short runs did when inference used Keras' moving batch-norm statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_pipeline.schema import CLASSES

PROBABILITIES = [f"p_{c}" for c in CLASSES]


def test_one_run_reaches_90_percent_on_held_out_patients(learned_run):
    predictions = pd.read_csv(learned_run.run_dir / "predictions.csv")
    accuracy = (predictions["label"] == predictions["pred"]).mean()
    baseline = (predictions["label"] == "normal").mean()
    print(f"test accuracy {accuracy:.3f} on {len(predictions)} images (always normal: {baseline:.3f}); "
          f"trained in {learned_run.seconds:.0f} s")
    assert accuracy >= 0.90
    covid = predictions[predictions["label"] == "COVID-19"]
    assert (covid["pred"] == "COVID-19").mean() >= 0.8


def test_the_selected_model_does_not_predict_a_constant(learned_run):
    predictions = pd.read_csv(learned_run.run_dir / "predictions.csv")
    spread = predictions[PROBABILITIES].to_numpy().std(axis=0)
    assert spread.min() > 0.1, spread  # a constant output has a spread of about 0 (0.0001 measured)
    assert set(predictions["pred"]) == set(CLASSES)


def test_the_learning_is_in_mlflow_with_its_datasets(learned_run):
    import mlflow

    from orchestrator.tracking import EXPERIMENT_KIND, MODEL_TRAINING

    config = learned_run.config
    client = mlflow.tracking.MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING  # the UI's training view
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["test_accuracy"] >= 0.90
    inputs = {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
              for d in run.inputs.dataset_inputs}
    assert inputs == {*((f"fold1/phase{n}", "training") for n in range(1, 9)),
                      ("fold1/val", "validation"), ("fold1/test", "testing")}
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {run.data.tags["split_hash"][:16]}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == list(range(1, 17))  # every epoch once, across the 8 phases
    assert np.isfinite([m.value for m in client.get_metric_history(run.info.run_id, "loss")]).all()
