"""The image store and the splits for nodes that share no folder with the driver: uploaded to
object storage by the driver (`cxr prepare --upload`, `cxr run`), copied once per node into its
cache and memory-mapped there (data_pipeline.objects).

On the bucket, `<storage>/store/<store key>/` and `<storage>/splits/<split hash>/`: keyed by what
they are, so an uploaded copy is never replaced, only added beside. Each is complete when its
marker (the store's store.json, the splits' SHA256SUMS) is there, uploaded last.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from data_pipeline.objects import CacheSpec, Prefix, StorageError, is_uri, put_tree
from data_pipeline.splits import SUMS_FILE, split_hash
from data_pipeline.store import STORE_META, StoreBuilder
from orchestrator.paths import WorkPaths

log = logging.getLogger(__name__)
STORE, SPLITS = "store", "splits"  # their kinds: folders on the bucket and in each node's cache


def uploaded_keys(work: WorkPaths) -> dict[str, str]:
    """{store: its key, splits: their hash} of the driver's workdir (what the workers fetch)."""
    return {STORE: StoreBuilder.written_key(work.store), SPLITS: split_hash(work.splits)}


def upload_inputs(work: WorkPaths) -> list[str]:
    """The workdir's store and splits onto the run storage (nothing where it is a folder)."""
    if not work.remote:
        return []
    return upload_folders(work.remote, work.store, work.splits)


def upload_folders(storage: str, store: Path, splits: Path | None = None) -> list[str]:
    """A store (and a splits folder) under the storage URI, by their keys, unless there already:
    what `cluster.storage_path: <storage>` workers fetch. Returns where each went."""
    if not is_uri(storage):
        raise StorageError(
            f"{storage}: expected an object-storage URI to upload to, such as s3://bucket/prefix."
        )
    if splits is not None and not (splits / SUMS_FILE).is_file():
        raise StorageError(
            f"{splits}: no {SUMS_FILE}; expected a splits folder written by `cxr splits` or "
            f"`cxr run`."
        )
    work = WorkPaths.of("", storage)
    keys = {
        STORE: StoreBuilder.written_key(store),
        **({SPLITS: split_hash(splits)} if splits else {}),
    }
    if not keys[STORE]:
        raise StorageError(
            f"{store}: not a complete image store (no {STORE_META}); expected one to upload."
        )
    where = []
    folders = {STORE: (store, STORE_META), SPLITS: (splits, SUMS_FILE)}
    for kind in keys:  # the store, then the splits if given
        (local, marker), prefix = folders[kind], Prefix(work.uploaded(kind, keys[kind]))
        if prefix.child(marker).exists():
            log.info("%s %s is on %s already", kind, keys[kind][:12], prefix.uri)
        else:
            put_tree(local, prefix, marker)
            log.info("uploaded the %s to %s", kind, prefix.uri)
        where.append(prefix.uri)
    return where


def on_this_node(work: WorkPaths, cache_spec: CacheSpec, keys: dict[str, str]) -> WorkPaths:
    """The workdir as a worker on this node uses it: a folder of the node's cache in which
    `store` and `splits` are the cached copies of the uploaded ones (fetched now if this node has
    none), and where the runs' working copies live. Unchanged without object storage."""
    if not work.remote:
        return work
    cache = cache_spec.node_cache()
    store = cache.fetch(Prefix(work.uploaded(STORE, keys[STORE])), STORE, keys[STORE], STORE_META)
    splits = cache.fetch(
        Prefix(work.uploaded(SPLITS, keys[SPLITS])), SPLITS, keys[SPLITS], SUMS_FILE
    )
    identity = "\n".join((work.remote, keys[STORE], keys[SPLITS]))
    local = cache.work / hashlib.sha256(identity.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    for link, target in (("store", store), ("splits", splits)):
        _link(local / link, target)
    return WorkPaths.of(str(local), work.remote)


def _link(link: Path, target: Path) -> None:
    """`link` -> `target`, made aside and renamed in (several runs of a node may do it at once)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    aside = link.with_name(f".{link.name}.{os.getpid()}")
    aside.unlink(missing_ok=True)
    aside.symlink_to(target, target_is_directory=True)
    aside.replace(link)
