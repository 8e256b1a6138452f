"""The image store: every manifest image decoded once, resized, in one uint8 array on disk.

Layout of a store folder:
  images.npy    (N, size, size) uint8, opened memory-mapped: every run on a node shares the
                page cache instead of holding its own copy
  index.csv     row, image_id, source, view (RSNA views come from the DICOM header here)
  failures.csv  image_id, path, reason for images that could not be decoded (only when allowed)
  store.json    size, count and the key of the inputs; written last, so its presence means the
                store is complete

Building is split so that any executor can run it: `decode_chunk` is a pure function (the
orchestrator fans it out as Ray tasks); `StoreBuilder` writes results into a hidden folder and
renames it into place when everything is in. This module knows nothing about Ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data_pipeline.decode import (
    DEFAULT,
    DecodeError,
    DecodeSpec,
    Source,
    decode_image,
    dicom_view_position,
    is_dicom,
)
from data_pipeline.files import new_build_dir, replace_dir, sha256_bytes
from data_pipeline.schema import DataError

log = logging.getLogger(__name__)
STORE_VERSION = (
    2  # bump when decoding or resizing changes: old stores then rebuild (2: float32, bounded)
)
STORE_META = "store.json"  # written last: a store holding it is complete (also on object storage)


@dataclass(frozen=True)
class StoreSpec:
    image_size: int = 300  # the paper's 300x300
    exclude_failed: bool = False  # leave undecodable images out (reported) instead of failing
    chunk_size: int = 32  # images per decoding task

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(
                f"store.image_size: expected at least 32 pixels, received {self.image_size}."
            )
        if self.chunk_size < 1:
            raise ValueError(f"store.chunk_size: expected at least 1, received {self.chunk_size}.")


class StoreError(DataError):
    """The store could not be built or read; the message says which images or files and why."""


def decode_resized(source: Source, size: int, limits: DecodeSpec = DEFAULT) -> np.ndarray:
    """Decode (a path, or a file's bytes) with the readers' decoder, then resize to size x size
    (the paper squashes, it does not pad: aspect ratio is not kept). Pillow's bilinear filter
    widens with the reduction factor, so large radiographs are area-averaged rather than
    aliased."""
    image = Image.fromarray(decode_image(source, limits))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


@dataclass
class ChunkResult:
    positions: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def decode_chunk(
    items: list[tuple[int, str, str]], size: int, limits: DecodeSpec = DEFAULT
) -> ChunkResult:
    """Decode (position, path, manifest view) items; a bad file becomes a failure, not a crash."""
    result = ChunkResult()
    for position, path, view in items:
        try:
            image = decode_resized(path, size, limits)
            if not view and is_dicom(path):
                view = dicom_view_position(path)  # the only header value that leaves the decoder
        except DecodeError as exc:
            result.failures.append((position, exc.reason))
            continue
        result.positions.append(position)
        result.images.append(image)
        result.views.append(view)
    return result


def store_key(manifest: pd.DataFrame, spec: StoreSpec, limits: DecodeSpec = DEFAULT) -> str:
    """What the store depends on: each image's id, path, size and modification time (a replaced
    file rebuilds), the image size, the failure policy, the decoder's limits and its version."""
    stats = [os.stat(p) if os.path.exists(p) else None for p in manifest["path"]]
    listing = manifest[["image_id", "path"]].assign(
        bytes=[st.st_size if st else -1 for st in stats],
        mtime=[st.st_mtime_ns if st else -1 for st in stats],
    )
    text = listing.to_csv(index=False, lineterminator="\n")
    settings = f"v{STORE_VERSION}/{spec.image_size}/{spec.exclude_failed}/{limits.max_pixels}"
    return sha256_bytes(f"{settings}/{text}".encode())


class StoreBuilder:
    """Collects decoded chunks into a hidden folder; `finish` renames it into place."""

    def __init__(
        self, out: Path, manifest: pd.DataFrame, spec: StoreSpec, limits: DecodeSpec = DEFAULT
    ):
        self.out, self.manifest, self.spec, self.limits = (
            Path(out),
            manifest.reset_index(drop=True),
            spec,
            limits,
        )
        self.key = store_key(self.manifest, spec, limits)
        self._tmp: Path | None = None
        self._images: np.ndarray | None = None
        self._views = [""] * len(self.manifest)
        self._done = np.zeros(len(self.manifest), dtype=bool)
        self._failures: dict[int, str] = {}

    def is_current(self) -> bool:
        """True when a complete store of the same inputs is already at `out`: nothing to do."""
        return self.written_key(self.out) == self.key

    @staticmethod
    def written_key(out: Path) -> str:
        """The key of the complete store at `out` ("" if there is none): what its images came
        from."""
        meta = Path(out) / STORE_META
        return json.loads(meta.read_text()).get("key", "") if meta.is_file() else ""

    def chunks(self) -> list[list[tuple[int, str, str]]]:
        items = list(
            zip(
                range(len(self.manifest)),
                self.manifest["path"],
                self.manifest["view"],
                strict=False,
            )
        )
        n = self.spec.chunk_size
        return [items[i : i + n] for i in range(0, len(items), n)]

    def start(self) -> None:
        self._tmp = new_build_dir(self.out)
        size = self.spec.image_size
        self._images = np.lib.format.open_memmap(
            self._tmp / "images.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(len(self.manifest), size, size),
        )

    def add(self, result: ChunkResult) -> None:
        for position, image, view in zip(
            result.positions, result.images, result.views, strict=False
        ):
            self._images[position] = image
            self._views[position] = view
            self._done[position] = True
        self._failures.update(result.failures)

    def finish(self) -> Path:
        """Check that every image is in (or failed, when allowed) and put the store in place."""
        try:
            missing = ~self._done & ~np.isin(np.arange(len(self.manifest)), list(self._failures))
            if missing.any():
                raise StoreError(
                    f"{self.out}: {int(missing.sum())} image(s) were never decoded "
                    f"(an executor was lost?): {self.manifest.loc[missing, 'path'].tolist()[:5]}."
                )
            failures = self._failure_table()
            if not failures.empty and not self.spec.exclude_failed:
                report = self.out.with_name(self.out.name + ".failures.csv")
                failures.to_csv(report, index=False, lineterminator="\n")
                shown = "; ".join(
                    f"{p}: {r}"
                    for p, r in zip(failures["path"][:5], failures["reason"][:5], strict=False)
                )
                raise StoreError(
                    f"{len(failures)} image(s) could not be decoded ({shown}). All are listed in "
                    f"{report}. Fix or remove them, or set store.exclude_failed / pass "
                    f"--exclude-failed to leave them out of the store and the splits."
                )
            self._images.flush()
            self._images = None
            index = pd.DataFrame(
                {
                    "row": np.arange(len(self.manifest)),
                    "image_id": self.manifest["image_id"],
                    "source": self.manifest["source"],
                    "view": self._views,
                }
            )[self._done]
            index.to_csv(self._tmp / "index.csv", index=False, lineterminator="\n")
            failures.to_csv(self._tmp / "failures.csv", index=False, lineterminator="\n")
            meta = {
                "version": STORE_VERSION,
                "key": self.key,
                "image_size": self.spec.image_size,
                "count": int(self._done.sum()),
                "failed": len(failures),
            }
            (self._tmp / STORE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            replace_dir(self._tmp, self.out, marker=STORE_META)
            self.out.with_name(self.out.name + ".failures.csv").unlink(missing_ok=True)
            return self.out
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the hidden build folder (after a failure or an interruption)."""
        self._images = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _failure_table(self) -> pd.DataFrame:
        positions = sorted(self._failures)
        return pd.DataFrame(
            {
                "image_id": self.manifest["image_id"].iloc[positions].tolist(),
                "path": self.manifest["path"].iloc[positions].tolist(),
                "reason": [self._failures[p] for p in positions],
            },
            columns=["image_id", "path", "reason"],
        )


def without_failures(manifest: pd.DataFrame, store_dir: Path) -> pd.DataFrame:
    """The manifest less the images the store could not decode (only a store built with
    exclude_failed has any); they are named in the log, so none is dropped silently."""
    failed = ImageStore.open(store_dir).failures
    if failed.empty:
        return manifest
    log.warning(
        "leaving %d image(s) the store failed to decode out of the splits: %s",
        len(failed),
        failed["image_id"].tolist(),
    )
    return manifest[~manifest["image_id"].isin(failed["image_id"])]


def build_serial(
    manifest: pd.DataFrame, out: Path, spec: StoreSpec, limits: DecodeSpec = DEFAULT
) -> Path:
    """Build a store in this process, one chunk after another (benchmarks, small tests); the
    orchestrator's `build_store` fans the same chunks out as Ray tasks."""
    builder = StoreBuilder(out, manifest, spec, limits)
    builder.start()
    for chunk in builder.chunks():
        builder.add(decode_chunk(chunk, spec.image_size, limits))
    return builder.finish()


@dataclass(frozen=True)
class ImageStore:
    """A complete store, opened read-only and memory-mapped."""

    root: Path
    images: np.ndarray  # (N, size, size) uint8 memmap
    index: pd.DataFrame  # row, image_id, source, view
    failures: pd.DataFrame  # image_id, path, reason

    @classmethod
    def open(cls, root: Path | str) -> "ImageStore":
        root = Path(root)
        if not (root / STORE_META).is_file():
            raise StoreError(
                f"{root}: not a complete image store (no store.json); build it with `cxr prepare`."
            )
        images = np.load(root / "images.npy", mmap_mode="r")
        index = pd.read_csv(root / "index.csv", dtype={"row": np.int64}, keep_default_na=False)
        failures = pd.read_csv(root / "failures.csv", dtype=str, keep_default_na=False)
        return cls(root=root, images=images, index=index, failures=failures)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def rows(self, image_ids: pd.Series | list[str]) -> np.ndarray:
        """Store rows of the given images, in order; an image not in the store is an error."""
        lookup = pd.Series(self.index["row"].to_numpy(), index=self.index["image_id"])
        ids = pd.Index(image_ids)
        missing = ids[~ids.isin(lookup.index)]
        if len(missing):
            raise StoreError(
                f"{self.root}: {len(missing)} image(s) are not in the store: {list(missing[:10])}; "
                f"rebuild it from the same manifest (`cxr prepare`), "
                f"or split without failed images."
            )
        return lookup.loc[ids].to_numpy()
