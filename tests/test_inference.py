"""Using a published model: the decoder on bytes as on paths, the inference input equal to the
evaluation stream's, every model URI form, `cxr predict`'s outputs, failures and exit code, the
fold ensemble's mean, and Grad-CAM's maps. The networks here have random weights (what is tested
is the plumbing); tests/test_learning.py checks Grad-CAM on a network that learned."""

from __future__ import annotations

import shutil

import keras
import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
import tensorflow as tf
from PIL import Image

from data_pipeline.columns import FAILURE_COLUMNS, PREDICT_COLUMNS
from data_pipeline.decode import DecodeError, decode_image, dicom_view_position, is_dicom
from data_pipeline.store import ImageStore, StoreSpec, build_serial
from data_pipeline.tfdata import eval_stream, network_input
from models.gradcam import LAYERS, gradcam, mass_inside
from models.inference import Classifier, decode_batch
from models.networks import build, without_optimizer
from models.serving import MEMBER_FILE, log_classifier
from orchestrator import cli
from orchestrator.serving.predict import image_files, model_folder, network_files
from tests.conftest import fixture_path

SIZE = 72
DICOM = "dicom/rsna_uao/008c19e8-a820-403a-930a-bc74a4053664.dcm"
PNG = "images/torchxrayvision"  # a folder: real PNGs


def publish(network: keras.Model, folder, name: str) -> str:
    """Log `network` as a run's published model; returns the run id."""
    file = folder / f"{name}-{MEMBER_FILE}"
    without_optimizer(network).save(file)
    with mlflow.start_run(run_name=name) as run:
        log_classifier("model", [str(file)])
    return run.info.run_id


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Two random Xceptions at 72x72 published as runs' models, the first registered (version 1,
    alias `champion`), and their ensemble, as `cxr run` logs them."""
    root = tmp_path_factory.mktemp("published")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("inference")
    networks = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        networks.append(build("xception", SIZE))
    runs = [publish(n, root, f"fold{i}") for i, n in enumerate(networks, start=1)]
    version = mlflow.register_model(f"runs:/{runs[0]}/model", "cxr-test-xception")
    mlflow.MlflowClient(uri).set_registered_model_alias(
        "cxr-test-xception", "champion", version.version
    )
    with mlflow.start_run(run_name="parent"):
        from orchestrator.serving.registry import member_file_uri

        ensemble = log_classifier("ensemble", [member_file_uri(r) for r in runs])
    yield {
        "root": root,
        "uri": uri,
        "runs": runs,
        "networks": networks,
        "ensemble": ensemble.model_uri,
    }
    mlflow.set_tracking_uri("")


def real_images(tmp_path):
    """A folder of real files: a DICOM, PNGs and a JPEG, one in a subfolder (searched
    recursively)."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(fixture_path(DICOM), folder / "sub" / "a.dcm")
    pngs = sorted(fixture_path(PNG).rglob("*.png"))[:2]
    jpeg = sorted(
        p for p in fixture_path("images").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")
    )[0]
    for path in [*pngs, jpeg]:
        shutil.copy(path, folder / path.name)
    return folder


def test_a_file_decodes_the_same_from_its_bytes_as_from_its_path():
    for relative in (DICOM, "dicom/torchxrayvision/Fake_MONOHR1.dcm"):
        path = fixture_path(relative)
        data = path.read_bytes()
        assert np.array_equal(decode_image(data), decode_image(path))
        assert is_dicom(data) and dicom_view_position(data) == dicom_view_position(path) != ""
    for path in sorted(fixture_path("images").rglob("*"))[:6]:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            assert np.array_equal(decode_image(path.read_bytes()), decode_image(path)), path
            assert not is_dicom(path.read_bytes())
    with pytest.raises(
        DecodeError,
        match=r"<bytes>: cannot decode image: neither a DICOM file nor a PNG or JPEG image",
    ):
        decode_image(b"not an image at all")


def test_the_inference_input_is_the_evaluation_streams(tmp_path, tiny_manifest):
    """`cxr predict` decodes, resizes and scales a file as the store and the test set's stream do:
    the same arrays, to the bit."""
    rows = tiny_manifest.groupby("source").head(3).reset_index(drop=True)
    store = ImageStore.open(build_serial(rows, tmp_path / "store", StoreSpec(image_size=SIZE)))
    streamed = next(iter(eval_stream(store, rows, len(rows))))[0].numpy()
    decoded = decode_batch(list(rows["path"]), SIZE)
    assert not decoded.failures
    assert np.array_equal(network_input(decoded.images).numpy(), streamed)


def test_every_model_uri_form_gives_the_same_predictions(published, tmp_path):
    images = decode_batch([fixture_path(DICOM)], SIZE).images
    expected = published["networks"][0].predict_on_batch(network_input(images))
    run = published["runs"][0]
    local = model_folder(f"runs:/{run}/model", tmp_path / "local")
    for uri in (
        "models:/cxr-test-xception/1",
        "models:/cxr-test-xception@champion",
        f"runs:/{run}/model",
        str(local),
    ):
        classifier = Classifier.load(
            network_files(model_folder(uri, tmp_path / uri.replace("/", "_")))
        )
        assert classifier.image_size == SIZE  # the network's own
        assert np.allclose(classifier.predict(images), expected, atol=1e-6), uri
    with pytest.raises(
        Exception, match=r"--model models:/cxr-test-nothing/1: not found in the tracking store"
    ):
        model_folder("models:/cxr-test-nothing/1", tmp_path / "none")
    with pytest.raises(
        Exception, match=r"--model nowhere: expected a local model folder or an MLflow URI"
    ):
        model_folder("nowhere")


def test_the_fold_ensemble_is_the_mean_of_its_networks(published, tmp_path):
    images = decode_batch([fixture_path(DICOM)], SIZE).images
    ensemble = Classifier.load(network_files(model_folder(published["ensemble"], tmp_path / "e")))
    assert len(ensemble.members) == 2
    means = np.mean(
        [n.predict_on_batch(network_input(images)) for n in published["networks"]], axis=0
    )
    assert np.allclose(ensemble.predict(images), means, atol=1e-6)


def test_cxr_predict_writes_predictions_failures_and_overlays(published, tmp_path, capsys):
    folder = real_images(tmp_path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    listing = tmp_path / "list.csv"  # a CSV of paths, relative to its folder
    pd.DataFrame({"path": ["images/sub/a.dcm"]}).to_csv(listing, index=False)
    out, overlays = tmp_path / "out" / "preds.csv", tmp_path / "cams"
    with pytest.raises(SystemExit) as exited:
        cli.main(
            [
                "predict",
                "--model",
                f"runs:/{published['runs'][0]}/model",
                str(folder),
                str(listing),
                "--out",
                str(out),
                "--gradcam",
                str(overlays),
                "--batch",
                "2",
            ]
        )
    assert exited.value.code == 1  # one file failed
    preds = pd.read_csv(out, keep_default_na=False)
    assert tuple(preds.columns) == PREDICT_COLUMNS
    files = image_files([str(folder), str(listing)])
    assert len(files) == 6 and len(preds) == 5
    assert np.allclose(preds.iloc[:, 2:5].sum(axis=1), 1, atol=1e-5)
    dicoms = preds[preds["path"].str.endswith(".dcm")]
    assert len(dicoms) == 2 and set(dicoms["view"]) == {
        pydicom.dcmread(fixture_path(DICOM)).ViewPosition
    }
    assert set(preds.loc[~preds["path"].str.endswith(".dcm"), "view"]) == {""}
    failures = pd.read_csv(tmp_path / "out" / "preds.failures.csv")
    assert tuple(failures.columns) == FAILURE_COLUMNS and failures["path"].tolist() == [
        str(folder / "broken.png")
    ]
    assert failures["reason"][0] == "neither a DICOM file nor a PNG or JPEG image"
    pngs = sorted(overlays.glob("*.png"))
    assert len(pngs) == 4  # one per decoded file (the DICOM given twice has one name)
    assert all(Image.open(p).size[0] > 200 for p in pngs)
    assert "5 of 6 image(s) predicted (xception, 1 network(s), 72x72)" in capsys.readouterr().out


def test_no_dicom_header_but_the_view_reaches_an_output(published, tmp_path):
    ds = pydicom.dcmread(fixture_path(DICOM))
    private = {
        str(ds.get(k))
        for k in (
            "PatientName",
            "PatientID",
            "PatientAge",
            "PatientSex",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "StudyDate",
        )
        if str(ds.get(k) or "")
    }
    anonymous = (
        tmp_path / "x" / "image.dcm"
    )  # a name of its own: the RSNA file's name is its patient id
    anonymous.parent.mkdir()
    shutil.copy(fixture_path(DICOM), anonymous)
    out = tmp_path / "preds.csv"
    assert (
        cli.main(
            [
                "predict",
                "--model",
                f"runs:/{published['runs'][0]}/model",
                str(anonymous),
                "--out",
                str(out),
                "--gradcam",
                str(tmp_path / "cams"),
            ]
        )
        == 0
    )
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    cells = set(table.to_numpy().ravel()) | set(table.columns)
    assert not private & cells and not [v for v in private if len(v) > 3 and v in out.read_text()]
    for overlay in (
        tmp_path / "cams"
    ).iterdir():  # the PNG's text chunks (its pixels are a drawing)
        assert not [
            v for v in private if any(v in str(text) for text in Image.open(overlay).info.values())
        ]
    assert table["view"].tolist() == [str(ds.ViewPosition)]
    assert not (tmp_path / "preds.failures.csv").exists()


def test_gradcam_gives_each_backbone_and_their_combination_a_map():
    keras.utils.set_random_seed(0)
    model = build("concatenated", SIZE)
    images = decode_batch([fixture_path(DICOM)] * 2, SIZE).images
    maps = gradcam(model, images, np.array([0, 2]))
    assert set(maps) == set(LAYERS["concatenated"]) == {"xception", "resnet50v2", "combined"}
    for cam in (
        maps.values()
    ):  # each image's map peaks at 1, or is 0 where no location speaks for the class
        peaks = cam.reshape(2, -1).max(axis=1)
        assert (
            cam.shape == (2, SIZE, SIZE)
            and cam.min() >= 0
            and all(np.isclose(p, 1) or p == 0 for p in peaks)
        )
    assert any(cam.max() == 1 for cam in maps.values())
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:, : SIZE // 2] = True
    assert 0 <= mass_inside(maps["combined"][0], mask) <= 1


def test_gradcam_equals_its_closed_form_through_the_linear_head():
    """After the backbones, the concatenated network is linear up to its logits (1x1 convolution,
    flatten, dropout that inference skips, dense), so the gradient Grad-CAM averages has a closed
    form in the weights: d logit_c / d concat_conv[i,j,m] = W[(i,j,m), c], and for the backbones'
    features d logit_c / d x[i,j,k] = sum_m K[k,m] W[(i,j,m), c]. The maps built from it, without
    autodiff, must equal gradcam's."""
    keras.utils.set_random_seed(1)
    model = build("concatenated", SIZE)
    head = model.layers[-1].kernel
    # class 1 weighs every feature against class 0, so that wherever one map is cut to zero by the
    # ReLU the other is not: the comparison below is never between two blank maps
    head.assign(keras.ops.stack([head[:, 0], -head[:, 0], head[:, 2]], axis=1))
    images = decode_batch([fixture_path(DICOM)] * 2, SIZE).images
    classes = np.array([0, 1])
    maps = gradcam(model, images, classes)
    names = LAYERS["concatenated"]
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names.values()])
    features = dict(
        zip(
            names,
            (np.asarray(f, np.float64) for f in probe(network_input(images), training=False)),
            strict=False,
        )
    )
    side, mixer = features["combined"].shape[1], model.get_layer("concat_conv").kernel.numpy()[0, 0]
    head = (
        model.layers[-1].kernel.numpy().reshape(side, side, -1, 3)
    )  # Flatten's order: row, column, channel
    to_combined = head[..., classes].transpose(3, 0, 1, 2)  # (image, i, j, m)
    to_backbones = np.einsum("km,nijm->nijk", mixer, to_combined)
    width = features["xception"].shape[-1]
    gradients = {
        "combined": to_combined,
        "xception": to_backbones[..., :width],
        "resnet50v2": to_backbones[..., width:],
    }
    for name, gradient in gradients.items():
        weights = gradient.mean(axis=(1, 2), keepdims=True)
        cam = np.maximum((weights * features[name]).sum(axis=-1), 0)[..., None]
        cam = tf.image.resize(cam, (SIZE, SIZE), method="bilinear")[..., 0].numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1)
        expected = cam / np.where(peak > 0, peak, 1.0)[:, None, None]
        assert expected.max() == 1, name  # not two blank maps (see the head above)
        assert np.abs(maps[name] - expected).max() < 1e-4, name


def test_a_file_cxr_predict_refuses_is_listed_without_its_header_values(
    published, tmp_path, capsys
):
    """A DICOM whose patient fields are markers, its pixel data cut short, and a PNG bomb: both
    listed in preds.failures.csv with one of the decoder's fixed reasons, no marker on the
    console."""
    from data_pipeline import decode
    from data_pipeline.synth import PHI_MARKERS
    from tests.hostile_files import png_claiming

    ds = pydicom.dcmread(fixture_path(DICOM))
    for key, value in PHI_MARKERS.items():
        setattr(ds, key, value)
    ds.save_as(tmp_path / "marked.dcm")
    (tmp_path / "marked.dcm").write_bytes((tmp_path / "marked.dcm").read_bytes()[:-5000])
    (tmp_path / "bomb.png").write_bytes(png_claiming(13000, 13000, 1))
    out = tmp_path / "out" / "preds.csv"
    with pytest.raises(SystemExit) as exited:  # no file decoded
        cli.main(
            [
                "predict",
                "--model",
                f"runs:/{published['runs'][0]}/model",
                str(tmp_path / "marked.dcm"),
                str(tmp_path / "bomb.png"),
                "--out",
                str(out),
            ]
        )
    assert exited.value.code == 1
    failures = pd.read_csv(tmp_path / "out" / "preds.failures.csv")
    assert failures["path"].tolist() == [str(tmp_path / "marked.dcm"), str(tmp_path / "bomb.png")]
    assert failures["reason"][0] in (decode.BROKEN_PIXELS, decode.BROKEN_HEADER)
    assert (
        failures["reason"][1]
        == "the image declares 13000 x 13000 pixels, more than decode.max_pixels (40,000,000)"
    )
    shown = capsys.readouterr()
    written = (tmp_path / "out" / "preds.failures.csv").read_text() + shown.out + shown.err
    assert not [v for v in PHI_MARKERS.values() if v in written]


def test_cxr_evaluate_of_a_set_none_of_which_decodes_says_so_and_lists_them(
    published, tmp_path, caplog
):
    """A local model folder, a labelled folder whose only file is a truncated PNG: exit 2 naming
    the count and failures.csv, which holds the file, its reason and its label."""
    folder = model_folder(f"runs:/{published['runs'][0]}/model", tmp_path / "model")
    (tmp_path / "set" / "normal").mkdir(parents=True)
    png = sorted(fixture_path(PNG).rglob("*.png"))[0].read_bytes()
    (tmp_path / "set" / "normal" / "cut.png").write_bytes(png[:300])
    code = cli.main(
        [
            "evaluate",
            "--model",
            str(folder),
            "--data",
            str(tmp_path / "set"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "none of its 1 image file(s) decoded" in caplog.text
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert failures[["path", "label"]].values.tolist() == [
        [str(tmp_path / "set" / "normal" / "cut.png"), "normal"]
    ]
    assert failures["reason"].iloc[0] == "the image data is truncated or corrupt"
