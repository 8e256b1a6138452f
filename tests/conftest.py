"""Shared test helpers: where the real public fixtures are, and tiny raw trees built per test."""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The real public files sit beside the project (../shared/fixtures); CXR_FIXTURES overrides.
FIXTURES = Path(os.environ.get("CXR_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def fixture_path(relative: str) -> Path:
    """Path of a real fixture file, or skip the test (with the reason) where it is absent."""
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(
            f"real fixture {relative} not found under {FIXTURES} (set CXR_FIXTURES to its folder)"
        )
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# `cxr` arguments for the demo config on the tiny synthetic data: the demo's phases hold more
# images than the tiny data has
TINY_PHASES = ["--set", "splits.phase_normal=8", "--set", "splits.phase_pneumonia=6"]


# `cxr` arguments that shrink configs/paper.yaml to the tiny synthetic data and a few steps, for the
# orchestration tests: only sizes and steps change, plus what this machine cannot do as the paper
# did (its datasets and ImageNet weights are not here; no GPU: its GPUs are logical, or none).
# 1 phase of 1 step, eager Keras (2 steps cost less than tracing them) and Keras' own batch-norm
# averages (no statistics to recompute) keep the suite short; phases, graph mode, precise batch
# norm and learning are tested in test_trainer.py, test_batchnorm.py and test_learning.py.
# The one phase takes most of the tiny data's RSNA images (70 of 80 normal, 52 of 60 pneumonia),
# so that each fold's test set holds 26 images, one evaluation batch: the steps cap training anyway.
PAPER_SHRINK = [
    f"--set={item}"
    for item in (
        "data.synthetic=tiny",
        "model.weights=none",
        "store.image_size=72",
        "splits.phases=1",
        "splits.test_covid=6",
        "splits.test_covid_pneumonia=2",
        "splits.phase_normal=70",
        "splits.phase_pneumonia=52",
        "splits.s_test_normal=5",
        "splits.s_test_pneumonia=5",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "execution.eval_batch_size=64",
        "checkpoint.log=none",
        "train.batch_size={xception: 4, resnet50v2: 4, concatenated: 4}",
        "train.batchnorm_batches=1",
        "execution.run_eagerly=true",
        "train.batchnorm=moving",
        # runs of a minute restart from scratch rather than write checkpoints (test_trainer
        # resumes them)
        "checkpoint.min_seconds=600",
    )
]


# `make test` runs the suite on two pytest workers, one file at a time each (pytest-xdist's
# loadfile): a Ray run keeps both cores busy, a test training in its own process about one. The
# files with the longest fixtures go first, so that no worker starts one while the other idles
# at the end. Within a file the order is as written.
LONGEST_FIRST = (
    "test_paper_local.py",
    "test_faults.py",
    "test_orchestration.py",
    "test_object_storage.py",
    "test_shutdown.py",
    "test_learning.py",
    "test_tune.py",
    "test_trainer.py",
    "test_synth.py",
    "test_tune_reports.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(
        key=lambda item: rank.get(item.path.name, len(rank))
    )  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def synthetic_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic lookalike datasets (seed 0), written once per test session."""
    from data_pipeline.synth import write_synthetic

    out = tmp_path_factory.mktemp("synthetic-tiny")
    write_synthetic(out, scale="tiny", seed=0)
    return out


def placeholder_tree(root: Path) -> tuple[Path, Path]:
    """The real label CSVs with empty placeholder image files (the manifest opens no image)."""
    import pandas as pd

    covid, rsna = root / "covid", root / "rsna"
    (covid / "images").mkdir(parents=True)
    (rsna / "stage_2_train_images").mkdir(parents=True)
    (covid / "metadata.csv").symlink_to(fixture_path("covid/metadata-2020-04-08.csv"))
    for name in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"):
        (rsna / name).symlink_to(fixture_path(f"rsna/{name}"))
    meta = pd.read_csv(covid / "metadata.csv", dtype=str, keep_default_na=False)
    for name in meta.loc[meta["folder"] == "images", "filename"]:
        (covid / "images" / name).touch()
    labels = pd.read_csv(rsna / "stage_2_train_labels.csv", dtype=str)
    for pid in labels["patientId"].unique():
        (rsna / "stage_2_train_images" / f"{pid}.dcm").touch()
    return covid, rsna


@pytest.fixture(scope="session")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return placeholder_tree(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="session")
def real_manifest(real_tree):
    """The manifest of the paper's data (2020-04-08 metadata + RSNA CSVs, placeholder images)."""
    from data_pipeline.manifest import build_manifest

    return build_manifest(*real_tree).manifest


@pytest.fixture(scope="session")
def tiny_manifest(synthetic_tiny):
    from data_pipeline.manifest import build_manifest

    return build_manifest(
        synthetic_tiny / "covid-chestxray-dataset",
        synthetic_tiny / "rsna-pneumonia-detection-challenge",
    ).manifest


@contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray (2 CPUs, no dashboard) for what runs inside, unless one is up already. Its
    processes cost about 8% of a core while idle, so none is kept for the rest of the session."""
    import ray

    from orchestrator.cluster.connection import connect

    if ray.is_initialized():
        yield
        return
    connect(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the tests of one module (tests/test_store.py)."""
    with local_ray():
        yield


@pytest.fixture(scope="session")
def tiny_store(tiny_manifest, tmp_path_factory):
    """The tiny synthetic dataset decoded into a 64x64 store with real Ray tasks (a Ray of its
    own, ended once the store is written)."""
    from data_pipeline.store import ImageStore, StoreSpec
    from orchestrator.cluster.store_build import build_store

    out = tmp_path_factory.mktemp("store") / "store"
    with local_ray():
        assert build_store(
            tiny_manifest, out, StoreSpec(image_size=64, chunk_size=16), show_progress=False
        )
    return ImageStore.open(out)


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    """One run of the single-run trainer that learns: Xception, fold 1, the demo's data, splits
    and settings (72x72, the demo's milder augmentations, random weights, 8 phases x 1 epoch,
    precise batch norm, best-on-validation selection) at learning rate 3e-4: the demo's 6e-4
    serves resnet50v2, and leaves xception's single fold more sensitive to the process's numerics
    (78% to 100% on fold 1 across thread counts and instruction sets). Trained once per session
    (about two minutes); every test that needs a trained model uses it."""
    import time
    from types import SimpleNamespace

    from data_pipeline.manifest import build_manifest
    from data_pipeline.splits import make_splits, write_splits
    from data_pipeline.store import build_serial
    from data_pipeline.synth import COVID_DIR, RSNA_DIR, write_synthetic
    from orchestrator.config import load_config
    from orchestrator.training.job import RunJob
    from orchestrator.training.train import train_and_evaluate

    root = tmp_path_factory.mktemp("learned")
    config = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"workdir={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", "train.learning_rate=3e-4"],
    )
    write_synthetic(config.paths.data, config.data.synthetic, config.data.synthetic_seed)
    manifest = build_manifest(config.paths.data / COVID_DIR, config.paths.data / RSNA_DIR).manifest
    build_serial(manifest, config.paths.store, config.store)
    write_splits(make_splits(manifest, config.splits), config.paths.splits)
    start = time.monotonic()
    run_dir = train_and_evaluate(RunJob.of(config, 1, "xception"))
    return SimpleNamespace(config=config, run_dir=run_dir, seconds=time.monotonic() - start)
