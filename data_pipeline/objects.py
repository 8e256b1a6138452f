"""Object storage (`s3://`, `gs://`, `abfs://`, any URI pyarrow's file systems resolve): folders
published whole, fetched whole, and a node-local cache of them.

Why an adapter: object stores have no rename, so the local idiom (build aside, rename in) does
not carry over. Here a folder on object storage is complete when its marker object is there:
every other file is uploaded first and the marker last, each object being written whole by one
PUT. Readers never look past a missing marker. Downloads go into a folder built aside and renamed
in (data_pipeline.files), so a local copy is complete or absent too.

Credentials and endpoint come from the environment, as pyarrow reads them (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, an instance profile, ...),
never from a config file.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pyarrow import fs as pafs

from data_pipeline.files import new_build_dir, replace_dir
from data_pipeline.schema import DataError

log = logging.getLogger(__name__)
PROBE = ".cxr-write-check"  # written and removed by Prefix.check_writable


class StorageError(DataError):
    """Object storage that cannot be reached, read or written: names the URI and the cause."""


def is_uri(text: str) -> bool:
    """Whether `text` names object storage (a scheme such as s3://) rather than a local path."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.isalnum() and scheme != "file"


CHUNK = 64 * 2**20  # bytes per read or write: a store's images.npy (GBs) never whole in memory


@functools.lru_cache(maxsize=16)
def _filesystem(root: str, environment: tuple) -> tuple[pafs.FileSystem, str]:
    """pyarrow's file system of a bucket, made once per bucket and credentials (making one may ask
    the store for the bucket's region: once, not per object)."""
    return pafs.FileSystem.from_uri(root)


@dataclass(frozen=True)
class Prefix:
    """A place on object storage: `s3://bucket/some/prefix` and the objects under it."""

    uri: str

    @cached_property
    def _resolved(self) -> tuple[pafs.FileSystem, str]:
        scheme, _, rest = self.uri.partition("://")
        bucket, _, key = rest.partition("/")
        if "?" in self.uri or not bucket:
            raise StorageError(
                f"{self.uri}: expected scheme://bucket/prefix without a query (the endpoint "
                f"and credentials come from AWS_ENDPOINT_URL and the other AWS_* variables)."
            )
        environment = tuple(
            sorted(
                (k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "AZURE_"))
            )
        )
        try:
            fs, base = _filesystem(f"{scheme}://{bucket}", environment)
        except (OSError, ValueError) as exc:
            raise StorageError(
                f"{self.uri}: not a storage URI pyarrow can open ({exc}); expected e.g. "
                f"s3://bucket/prefix."
            ) from None
        return fs, "/".join(p for p in (base.rstrip("/"), key.strip("/")) if p)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._resolved[0]

    @property
    def path(self) -> str:
        return self._resolved[1].rstrip("/")

    def child(self, *parts: str) -> "Prefix":
        return Prefix("/".join([self.uri.rstrip("/"), *parts]))

    def _call(self, what: str, action, *args):
        try:
            return action(*args)
        except OSError as exc:
            raise StorageError(
                f"{self.uri}: could not {what} ({str(exc).strip()[:400]})."
            ) from None

    def exists(self) -> bool:
        info = self._call("look it up", self.fs.get_file_info, self.path)
        return info.type == pafs.FileType.File

    def files(self) -> list[str]:
        """The objects under this prefix, as paths relative to it (sorted)."""
        info = self._call("look it up", self.fs.get_file_info, self.path)
        if info.type != pafs.FileType.Directory:
            return []
        listed = self._call(
            "list it", self.fs.get_file_info, pafs.FileSelector(self.path, recursive=True)
        )
        return sorted(i.path[len(self.path) + 1 :] for i in listed if i.type == pafs.FileType.File)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            # a random-access file knows its size and reads in ranged requests of the size asked;
            # a stream reads small pieces, each a request: a large object would cost many round
            # trips where the ranged reads cost a few
            with self.fs.open_input_file(self.path) as file:
                return file.read()

        return self._call("read it", read)

    def write_bytes(self, data: bytes) -> None:
        """One object, written whole (S3 and its kin show an object only once it is complete)."""

        def write() -> None:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)

        self._call("write it", write)

    def upload(self, local: Path) -> None:
        """The local file `local` as this object, in chunks."""

        def write() -> None:
            with open(local, "rb") as source, self.fs.open_output_stream(self.path) as stream:
                while chunk := source.read(CHUNK):
                    stream.write(chunk)

        self._call("write it", write)

    def download(self, local: Path) -> None:
        """This object into the local file `local`, in chunks, written aside and renamed in."""
        local.parent.mkdir(parents=True, exist_ok=True)
        aside = local.with_name(f".{local.name}.{uuid.uuid4().hex}")

        def read() -> None:
            with self.fs.open_input_file(self.path) as source, open(aside, "wb") as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)

        try:
            self._call("read it", read)
            aside.replace(local)
        finally:
            aside.unlink(missing_ok=True)

    def copy_to(self, other: "Prefix") -> None:
        """This object as `other`, copied by the store itself (S3: server-side, no bytes through
        here)."""
        self._call(f"copy it to {other.uri}", self.fs.copy_file, self.path, other.path)

    def delete(self) -> None:
        """This object or every object under this prefix; nothing there is not an error."""
        info = self._call("look it up", self.fs.get_file_info, self.path)
        if info.type == pafs.FileType.File:
            self._call("delete it", self.fs.delete_file, self.path)
        elif info.type == pafs.FileType.Directory:
            self._call("delete it", self.fs.delete_dir, self.path)

    def check_writable(self) -> None:
        """Write, read back and remove a small object here: StorageError naming the URI and the
        cause (wrong credentials, no such bucket, no endpoint) before anything depends on it."""
        probe = self.child(f"{PROBE}-{uuid.uuid4().hex}")  # one per caller: nodes check at once
        stamp = f"{os.getpid()} {time.time()}".encode()
        probe.write_bytes(stamp)
        if probe.read_bytes() != stamp:
            raise StorageError(f"{probe.uri}: read back other bytes than were written.")
        probe.delete()


def put_tree(local: Path, prefix: Prefix, marker: str) -> None:
    """Publish the folder `local` under `prefix`: what was there first removed (its marker first:
    a folder rewritten is never complete with old files), then every file, then `marker` (its
    presence says the folder is complete there)."""
    files = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    if marker not in files:
        raise StorageError(
            f"{local}: no {marker}; expected a complete folder to publish to {prefix.uri}."
        )
    prefix.child(marker).delete()
    prefix.delete()
    for name in [f for f in files if f != marker] + [marker]:
        prefix.child(name).upload(local / name)


def get_tree(prefix: Prefix, target: Path, marker: str) -> bool:
    """The complete folder under `prefix` into `target` (built aside, renamed in); False, and
    nothing written, when it has no `marker` (absent, or an upload still going or cut short)."""
    if not prefix.child(marker).exists():
        return False
    build = new_build_dir(target)
    try:
        for name in prefix.files():
            prefix.child(name).download(build / name)
        replace_dir(build, target, marker=marker)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return True


_IN_USE: list = []  # this process's shared locks on the cache entries it uses, held while it lives


@dataclass(frozen=True)
class NodeCache:
    """Copies of published folders on this node's own disk, `<root>/<kind>/<key>/`: fetched once
    per node, used in place afterwards, the least recently used removed beyond `max_gb`.

    Each entry has a lock file beside it: a process that fetches an entry holds it exclusively
    (the others of the node wait, then use its copy), and every process using an entry holds it
    shared for as long as it lives, so an entry in use is never removed. Runs' working folders
    live under `work`, which is never evicted."""

    root: Path
    max_gb: float

    @property
    def work(self) -> Path:
        return self.root / "work"

    def fetch(self, prefix: Prefix, kind: str, key: str, marker: str) -> Path:
        """The entry, fetched here first if this node has none; this process uses it from now on."""
        target = self.root / kind / key
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{key}.lock", "a")
        fcntl.flock(
            lock, fcntl.LOCK_EX
        )  # another process of this node may be fetching or removing it
        try:
            if not (target / marker).is_file():
                started = time.perf_counter()
                if not get_tree(prefix, target, marker):
                    raise StorageError(
                        f"{prefix.uri}: no {marker} there; expected the {kind} published by "
                        f"`cxr prepare` or `cxr run` (key {key})."
                    )
                log.info(
                    "cached %s %s from %s in %.1f s",
                    kind,
                    key[:12],
                    prefix.uri,
                    time.perf_counter() - started,
                )
            os.utime(target)  # recently used (eviction goes by the folder's time)
            fcntl.flock(lock, fcntl.LOCK_SH)  # in use while this process lives
        except BaseException:
            lock.close()
            raise
        _IN_USE.append(lock)
        self.evict()
        return target

    def entries(self) -> list[Path]:
        return [
            p
            for p in self.root.glob("*/*")
            if p.is_dir() and not p.name.startswith(".") and p.parent != self.work
        ]

    def size_gb(self) -> float:
        return (
            sum(f.stat().st_size for p in self.entries() for f in p.rglob("*") if f.is_file())
            / 2**30
        )

    def evict(self) -> list[Path]:
        """Remove the least recently used entries no process uses, until the cache fits `max_gb`.
        An entry is renamed aside before it is deleted: a removal cut short leaves no entry half
        there. A reader of a removed entry keeps its pages (the files are unlinked, not its
        maps)."""
        removed = []
        for leftover in self.root.glob("*/.*.removing-*"):  # removals that were cut short
            shutil.rmtree(leftover, ignore_errors=True)
        for entry in sorted(self.entries(), key=lambda p: p.stat().st_mtime):
            if self.size_gb() <= self.max_gb:
                break
            with open(entry.parent / f".{entry.name}.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # in use (or being fetched): it stays
                    continue
                aside = entry.with_name(f".{entry.name}.removing-{os.getpid()}")
                entry.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(entry)
            log.info("cache over %.1f GB: removed %s", self.max_gb, entry)
        return removed


# a node's own cache folder: wins over the config's (nodes differ in their disks)
CACHE_ENV = "CXR_CACHE_DIR"


@dataclass(frozen=True)
class CacheSpec:
    """The node-local cache of what is published on object storage: where, and how much."""

    dir: str = ""  # "": the node's $CXR_CACHE_DIR, else ~/.cache/cxr
    max_gb: float = 100.0  # least recently used copies are removed beyond it

    def __post_init__(self) -> None:
        if self.max_gb <= 0:
            raise ValueError(f"cache.max_gb: expected a size in GB > 0, received {self.max_gb}.")

    def node_cache(self) -> NodeCache:
        """This node's cache: its $CXR_CACHE_DIR, else the config's folder, else ~/.cache/cxr."""
        return NodeCache(
            Path(os.environ.get(CACHE_ENV) or self.dir or "~/.cache/cxr").expanduser(), self.max_gb
        )
