"""The data stages of `cxr run`, each skipped when its outputs are up to date: the raw datasets
(generated when synthetic), the manifest, the image store (decoded on the cluster) and the
splits."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from data_pipeline.files import sha256_bytes
from data_pipeline.manifest import (
    build_manifest,
    is_current,
    manifest_key,
    read_manifest,
    write_manifest,
)
from data_pipeline.splits import SplitMeta, make_splits, write_splits
from data_pipeline.store import without_failures
from data_pipeline.synth import COVID_DIR, MARKER, RSNA_DIR, stamp, write_synthetic
from orchestrator.cluster.store_build import build_store
from orchestrator.cluster.uploads import upload_inputs
from orchestrator.config import Config, ConfigError

log = logging.getLogger(__name__)


def prepare_inputs(config: Config) -> None:
    """The data stages; with object storage (cluster.storage_path s3://...) the raw files are
    decoded on the driver's node only (no other node need see them), and the store and splits
    are then uploaded there for the workers (orchestrator.cluster.uploads)."""
    covid_root, rsna_root = ensure_data(config)
    ensure_manifest(config, covid_root, rsna_root)
    build_store(
        read_manifest(config.paths.manifest),
        config.paths.store,
        config.store,
        address=config.cluster.address or None,
        limits=config.decode,
        on_driver_node=bool(config.paths.remote),
    )
    ensure_splits(config)
    upload_inputs(config.paths)


def ensure_data(config: Config) -> tuple[Path, Path]:
    """The raw dataset folders: generated when `data.synthetic` is set (once per scale and seed)."""
    data = config.data
    if not data.synthetic:
        if not data.covid_root or not data.rsna_root:
            raise ConfigError(
                "data: set covid_root and rsna_root to the two datasets' folders, "
                "or data.synthetic to tiny|small|paper."
            )
        return Path(data.covid_root), Path(data.rsna_root)
    root = config.paths.data
    wanted = stamp(
        data.synthetic, data.synthetic_seed, data.synthetic_marker, data.synthetic_phi_markers
    )
    if (root / MARKER).is_file() and (root / MARKER).read_text() == wanted:
        log.info("synthetic data in %s is up to date", root)
    else:
        write_synthetic(
            root,
            data.synthetic,
            data.synthetic_seed,
            source_marker=data.synthetic_marker,
            phi_markers=data.synthetic_phi_markers,
        )
    return root / COVID_DIR, root / RSNA_DIR


def ensure_manifest(config: Config, covid_root: Path, rsna_root: Path) -> None:
    """Rebuilt when the key of its inputs changed: the label files' contents, the dataset
    folders, the reader settings (data_pipeline.manifest); the store and splits follow."""
    out, data = config.paths.manifest, config.data
    settings = {"skip_missing": data.skip_missing, "rsna_persons": data.rsna_persons}
    key = manifest_key(covid_root, rsna_root, **settings)
    if is_current(out, key):
        log.info("manifest %s is up to date", out)
        return
    write_manifest(build_manifest(covid_root, rsna_root, **settings), out, key=key)


def ensure_splits(config: Config) -> None:
    """Rewritten when the split settings or the manifest changed."""
    out = config.paths.splits
    manifest_hash = sha256_bytes(config.paths.manifest.read_bytes())
    written = SplitMeta.read_if_any(out)
    if (
        written is not None
        and written.spec == asdict(config.splits)
        and written.manifest_sha256 == manifest_hash
    ):
        log.info("splits %s are up to date", out)
        return
    manifest = without_failures(read_manifest(config.paths.manifest), config.paths.store)
    write_splits(make_splits(manifest, config.splits), out, manifest_path=config.paths.manifest)
