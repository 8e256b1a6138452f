"""The image store: built with real Ray tasks, identical to the decoder's output, memory-mapped,
idempotent, atomic, and explicit about images it cannot decode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from data_pipeline.store import (
    ImageStore,
    StoreBuilder,
    StoreError,
    StoreSpec,
    build_serial,
    decode_resized,
)
from orchestrator.cluster.store_build import build_store
from tests.conftest import TINY_PHASES


def test_store_holds_the_decoders_output_resized(tiny_store, tiny_manifest):
    assert tiny_store.images.shape == (len(tiny_manifest), 64, 64)
    rows = tiny_store.rows(tiny_manifest["image_id"])
    for i in range(0, len(tiny_manifest), 7):
        assert np.array_equal(
            tiny_store.images[rows[i]], decode_resized(tiny_manifest["path"].iloc[i], 64)
        )


def test_store_is_memory_mapped_and_read_only(tiny_store):
    assert isinstance(tiny_store.images, np.memmap)
    assert not tiny_store.images.flags.writeable


def test_rsna_views_come_from_the_dicom_header(tiny_store, tiny_manifest):
    rsna = tiny_manifest[tiny_manifest["source"] == "rsna"].head(5)
    index = tiny_store.index.set_index("image_id")
    for image_id, path in zip(rsna["image_id"], rsna["path"], strict=False):
        assert index.loc[image_id, "view"] == pydicom.dcmread(path).ViewPosition


def test_a_second_build_with_the_same_inputs_does_nothing(tiny_store, tiny_manifest):
    meta = tiny_store.root / "store.json"
    before = meta.stat().st_mtime_ns
    assert (
        build_store(
            tiny_manifest,
            tiny_store.root,
            StoreSpec(image_size=64, chunk_size=16),
            show_progress=False,
        )
        is False
    )
    assert meta.stat().st_mtime_ns == before


def test_changed_inputs_rebuild_the_store(ray_local, tiny_manifest, tmp_path):
    manifest = tiny_manifest.head(12).copy()
    copy = tmp_path / Path(manifest["path"].iloc[0]).name
    shutil.copy(manifest["path"].iloc[0], copy)
    manifest.loc[manifest.index[0], "path"] = str(copy)
    spec = StoreSpec(image_size=40)
    assert build_store(manifest, tmp_path / "store", spec, show_progress=False)
    assert not build_store(manifest, tmp_path / "store", spec, show_progress=False)
    assert build_store(
        manifest,
        tmp_path / "store",
        StoreSpec(image_size=40, exclude_failed=True),
        show_progress=False,
    )  # another failure policy
    flipped = np.asarray(Image.open(copy))[::-1]
    Image.fromarray(flipped).save(copy, format=Image.open(copy).format)  # the file is replaced
    assert build_store(manifest, tmp_path / "store", spec, show_progress=False)
    store = ImageStore.open(tmp_path / "store")
    assert np.array_equal(
        store.images[store.rows([manifest["image_id"].iloc[0]])[0]], decode_resized(str(copy), 40)
    )


def test_no_dicom_header_value_but_the_view_leaves(tiny_manifest, tmp_path, caplog):
    """Names, dates, ages and sex in the DICOM header never reach the store's files or the logs."""
    rsna = tiny_manifest[tiny_manifest["source"] == "rsna"].head(6).copy()
    secrets = {
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19450203",
        "PatientSex": "F",
        "PatientAge": "077Y",
        "StudyDate": "20190314",
        "InstitutionName": "Saint Example Hospital",
    }
    for i, path in zip(rsna.index, rsna["path"], strict=False):
        ds = pydicom.dcmread(path)
        for key, value in secrets.items():
            setattr(ds, key, value)
        target = tmp_path / Path(path).name
        ds.save_as(target)
        rsna.loc[i, "path"] = str(target)
    caplog.set_level("DEBUG")
    out = build_serial(rsna, tmp_path / "store", StoreSpec(image_size=32))
    written = " ".join(p.read_text() for p in out.iterdir() if p.suffix in (".csv", ".json"))
    for value in ("Doe", "Jane", "19450203", "077Y", "20190314", "Saint Example"):
        assert value not in written and value not in caplog.text
    assert set(ImageStore.open(out).index["view"]) <= {"PA", "AP"}


def test_an_interrupted_build_never_looks_complete(ray_local, tiny_manifest, tmp_path, monkeypatch):
    out = tmp_path / "store"
    tiny_manifest.to_csv(tmp_path / "manifest.csv", index=False)
    dies_mid_build = f"""
import os, pandas as pd
from data_pipeline.store import StoreBuilder, StoreSpec, decode_chunk
builder = StoreBuilder(
    {str(out)!r},
    pd.read_csv({str(tmp_path / "manifest.csv")!r}, dtype=str, keep_default_na=False),
    StoreSpec(image_size=48),
)
builder.start()
builder.add(decode_chunk(builder.chunks()[0], 48))
os._exit(9)  # killed mid-build: no clean-up runs
"""
    assert (
        subprocess.run(
            [sys.executable, "-c", dies_mid_build], cwd=Path(__file__).parents[1]
        ).returncode
        == 9
    )
    assert list(tmp_path.glob(".store.building-*"))  # its half-built folder
    with pytest.raises(StoreError, match="not a complete image store"):
        ImageStore.open(out)

    build_store(tiny_manifest, out, StoreSpec(image_size=48), show_progress=False)  # recovers
    assert ImageStore.open(out).image_size == 48
    assert not list(tmp_path.glob(".store.building-*"))  # the dead build's folder is gone

    calls = []

    def add_then_interrupt(self, result):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(StoreBuilder, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):  # a rebuild at another size, interrupted
        build_store(tiny_manifest, out, StoreSpec(image_size=56, chunk_size=8), show_progress=False)
    old = ImageStore.open(out)  # the previous complete store is untouched
    assert old.image_size == 48
    assert not list(tmp_path.glob(".store.building-*"))


@pytest.fixture
def broken_manifest(tiny_manifest, tmp_path) -> pd.DataFrame:
    """The tiny manifest with one truncated JPEG and one empty DICOM, copied out of the shared
    data."""
    manifest = tiny_manifest.copy()
    jpeg = manifest.index[manifest["path"].str.endswith((".jpg", ".jpeg"))][0]
    dicom = manifest.index[manifest["source"] == "rsna"][0]
    for i, make in ((jpeg, lambda b: b[: len(b) // 3]), (dicom, lambda b: b"")):
        target = tmp_path / Path(manifest.loc[i, "path"]).name
        target.write_bytes(make(Path(manifest.loc[i, "path"]).read_bytes()))
        manifest.loc[i, "path"] = str(target)
    return manifest


def test_undecodable_images_fail_the_build_with_file_and_reason(
    ray_local, broken_manifest, tmp_path
):
    out = tmp_path / "store"
    with pytest.raises(StoreError, match="2 image.*could not be decoded") as err:
        build_store(broken_manifest, out, StoreSpec(image_size=32), show_progress=False)
    assert "the file is empty" in str(err.value) and "--exclude-failed" in str(err.value)
    report = pd.read_csv(tmp_path / "store.failures.csv")
    assert len(report) == 2 and report["path"].str.startswith(str(tmp_path)).all()
    assert not out.exists()


def test_failed_images_are_excluded_only_with_the_flag(ray_local, broken_manifest, tmp_path):
    out = tmp_path / "store"
    build_store(
        broken_manifest, out, StoreSpec(image_size=32, exclude_failed=True), show_progress=False
    )
    store = ImageStore.open(out)
    assert len(store.failures) == 2 and len(store.index) == len(broken_manifest) - 2
    assert json.loads((out / "store.json").read_text())["failed"] == 2
    with pytest.raises(StoreError, match="not in the store"):
        store.rows(store.failures["image_id"])

    manifest_csv = tmp_path / "manifest.csv"
    broken_manifest.to_csv(manifest_csv, index=False)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "splits",
            "--manifest",
            str(manifest_csv),
            "--config",
            "configs/demo.yaml",
            "--store",
            str(out),
            "--out",
            str(tmp_path / "splits"),
            *TINY_PHASES,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert "leaving 2 image(s)" in done.stderr
    split_ids = pd.concat(pd.read_csv(p) for p in (tmp_path / "splits").rglob("fold*/*.csv"))[
        "image_id"
    ]
    assert not set(store.failures["image_id"]) & set(split_ids)


def test_cli_prepare_reports_progress_and_is_idempotent(tmp_path, synthetic_tiny, tiny_manifest):
    manifest_csv = tmp_path / "manifest.csv"
    tiny_manifest.to_csv(manifest_csv, index=False)
    args = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "prepare",
        "--manifest",
        str(manifest_csv),
        "--out",
        str(tmp_path / "store"),
        "--size",
        "40",
    ]
    first = subprocess.run(args, capture_output=True, text=True, check=True)
    assert "decoding to 40x40" in first.stdout + first.stderr and "written to" in first.stdout
    second = subprocess.run(args, capture_output=True, text=True, check=True)
    assert "up to date" in second.stdout
    shutil.rmtree(tmp_path / "store")


class WorkerKiller:
    """SIGKILLs this test's own Ray workers while they run `decode_chunk` (`once`, or every time),
    as the OOM killer or a lost node would: only processes with a file open in this process's
    local Ray session, never another test's."""

    def __init__(self, session: str, once: bool):
        import threading

        self.session, self.once, self.killed = session.rstrip("/") + "/", once, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        import os
        import signal

        while not self.stop.is_set() and not (self.once and self.killed):
            for entry in Path("/proc").glob("[0-9]*"):
                try:
                    if not (entry / "cmdline").read_bytes().startswith(b"ray::decode_chunk"):
                        continue
                    if any(
                        os.readlink(fd).startswith(self.session) for fd in (entry / "fd").iterdir()
                    ):
                        os.kill(int(entry.name), signal.SIGKILL)
                        self.killed.append(int(entry.name))
                        break
                except OSError:
                    continue
            self.stop.wait(0.01)


def test_a_decoding_task_lost_with_its_worker_is_sent_again_then_named(
    ray_local, tiny_manifest, tmp_path, caplog
):
    """A worker killed once: its chunk is decoded again and the store is whole. Killed every time:
    the stage fails after its retries with StageError naming the images and the cause, and
    nothing is left of the build."""
    from orchestrator.cluster.connection import StageError, local_session

    manifest = tiny_manifest.head(64)
    spec = StoreSpec(image_size=40, chunk_size=16)
    with WorkerKiller(local_session(), once=True) as killer:
        assert build_store(manifest, tmp_path / "once", spec, show_progress=False)
    assert (
        killer.killed
        and "was lost (WorkerCrashedError); sending it again (attempt 2 of 4)" in caplog.text
    )
    assert ImageStore.open(tmp_path / "once").images.shape == (64, 40, 40)

    with WorkerKiller(local_session(), once=False), pytest.raises(StageError) as failed:
        build_store(manifest, tmp_path / "always", spec, show_progress=False)
    assert "stage 'image store' failed: decoding images" in str(failed.value)
    assert "was lost 4 times, last: WorkerCrashedError" in str(failed.value)
    assert not any(tmp_path.glob("*always*")) and not any(tmp_path.glob(".always*"))
