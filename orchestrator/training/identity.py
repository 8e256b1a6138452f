"""Run identity: what decides a run's result, as one fingerprint.

A run's fingerprint hashes what the run learns: the split (its hash), the image store (its key)
and the `model`, `augment` and `train` sections whole. How a run is carried out (checkpoints,
execution, tracking, the cluster) lives in other sections, so no list of result-free settings is
kept. Fingerprints written before those settings left `train` are the same: they hashed `train`
without them. It is written when the run first opens (identity.json, with the settings it
covers), into every checkpoint's cursor, into done.json, and as the MLflow tag `cxr.fingerprint`.

A run folder whose fingerprint is not the config's is stale: it is never resumed, skipped as
done, or reported. `cxr run` stops and names the stale runs and what changed; with
--restart-stale it moves them to runs/.stale/<time>/ and ends their MLflow runs KILLED.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.files import StateError, read_json, write_json
from data_pipeline.schema import DataError
from data_pipeline.splits import SUMS_FILE, split_hash
from data_pipeline.store import StoreBuilder
from models.catalog import NETWORK_NAMES
from orchestrator.config import ConfigError, Recipe, TrackingTarget, flatten
from orchestrator.config.loading import resolved_model
from orchestrator.paths import RunPaths, WorkPaths
from orchestrator.tracking.names import FINGERPRINT, SPLIT_HASH, STORE_KEY
from orchestrator.tracking.records import RunRecords
from orchestrator.training import checkpoints

log = logging.getLogger(__name__)
SPLIT, STORE = "split_hash", "store_key"
SECTIONS = ("model", "augment", "train")  # the config sections a fingerprint covers, whole


class StaleRun(ConfigError):
    """A run folder holds a run of other settings than the config's; the message names them."""


@dataclass(frozen=True)
class Identity:
    fingerprint: str
    settings: dict[
        str, str
    ]  # what the fingerprint covers, dotted: split_hash, store_key, model.*, ...

    @classmethod
    def of(cls, work: WorkPaths, recipe: Recipe) -> Identity:
        """The identity of the runs of `recipe` on the split and store in `work`."""
        splits, store = work.splits, work.store
        settings = {
            SPLIT: split_hash(splits) if (splits / SUMS_FILE).is_file() else "",
            STORE: StoreBuilder.written_key(store),
        }
        recipe = dataclasses.replace(recipe, model=resolved_model(recipe.model))
        for section in SECTIONS:
            settings.update(flatten(getattr(recipe, section), f"{section}."))
        return cls.from_settings(settings)

    @property
    def split_hash(self) -> str:
        return self.settings[SPLIT]

    @property
    def store_key(self) -> str:
        return self.settings[STORE]

    @staticmethod
    def workdir_ready(work: WorkPaths) -> bool:
        """Whether the workdir holds the split and the store an identity is made of."""
        return (work.splits / SUMS_FILE).is_file() and bool(StoreBuilder.written_key(work.store))

    @classmethod
    def from_settings(cls, settings: dict[str, str]) -> "Identity":
        text = json.dumps(settings, sort_keys=True)
        return cls(hashlib.sha256(text.encode()).hexdigest(), dict(settings))

    @classmethod
    def read(cls, path: Path) -> "Identity | None":
        """The identity a run folder recorded (None if none); StateError if it cannot be read."""
        data = read_json(
            path,
            "the run's fingerprint and settings",
            "`cxr run --restart-stale` moves the run folder aside and trains the run anew.",
        )
        if data is None:
            return None
        if not isinstance(data.get("fingerprint"), str) or not isinstance(
            data.get("settings"), dict
        ):
            raise StateError(
                f"{path}: expected the run's fingerprint and settings, found {sorted(data)}."
            )
        return cls(data["fingerprint"], data["settings"])

    def write(self, path: Path) -> Path:
        return write_json(
            path, {"fingerprint": self.fingerprint, "settings": self.settings}, indent=1
        )

    def changes(self, recorded: dict[str, str] | None) -> list[str]:
        """`key: recorded -> current` for each covered setting that differs (hashes shortened)."""
        if recorded is None:
            return ["not recorded (the run was written before run fingerprints)"]
        return differences(recorded, self.settings)


def _short(value: str) -> str:
    return value[:12] if len(value) == 64 else value


def recorded_settings(tags: dict[str, str], params: dict[str, str]) -> dict[str, str]:
    """The covered settings of an MLflow run: its split and store tags and its config params.
    A run logged before some settings left the covered sections holds them among its params
    (`train.fail_at`): only the settings the sections hold today count."""
    covered = {
        key for section in SECTIONS for key in flatten(getattr(Recipe(), section), f"{section}.")
    }
    settings = {SPLIT: tags.get(SPLIT_HASH, ""), STORE: tags.get(STORE_KEY, "")}
    settings.update({key: value for key, value in params.items() if key in covered})
    return settings


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """`key: recorded -> current` for each setting that differs (hashes shortened)."""
    return [
        f"{key}: {_short(recorded.get(key, 'unset'))} -> {_short(current.get(key, 'unset'))}"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]


@dataclass(frozen=True)
class Stale:
    """One run folder of other settings: which, what state it is in, and what changed."""

    name: str
    paths: RunPaths
    state: str  # done | checkpointed | started
    changes: list[str]


def recorded_fingerprints(paths: RunPaths) -> dict[str, str]:
    """Where this run folder records a fingerprint, and which: done.json, the newest cursor, and
    identity.json. A folder holding files but none of these is of a version before fingerprints
    ("")."""
    found = {}
    if paths.done.is_file():
        found["done"] = RunRecords(paths).read_done().get("fingerprint", "")
    cursor = checkpoints.newest_cursor(paths)
    if cursor is not None:
        found["checkpointed"] = cursor.fingerprint
    try:
        identity = Identity.read(paths.identity)
    except StateError:
        identity, found["started"] = None, ""  # unknown: not this config's
    if identity is not None:
        found["started"] = identity.fingerprint
    elif (
        not found
        and paths.root.is_dir()
        and any(not p.name.startswith(".") for p in paths.root.iterdir())
    ):
        found["started"] = ""  # files, and no record of what wrote them (its lock file aside)
    return found


def stale_run(paths: RunPaths, current: Identity) -> Stale | None:
    """The run folder as a Stale, if anything in it was written under another fingerprint."""
    found = recorded_fingerprints(paths)
    if all(value == current.fingerprint for value in found.values()):
        return None
    state = next(s for s in ("done", "checkpointed", "started") if s in found)
    try:
        recorded = Identity.read(paths.identity)
        changes = current.changes(recorded.settings if recorded else None)
    except StateError as exc:
        changes = [f"not readable ({exc})"]
    return Stale(paths.root.name, paths, state, changes)


def find_stale(work: WorkPaths, folds: int, current: Identity) -> list[Stale]:
    """The stale run folders of the whole grid (every fold and network): a stale run outside the
    folds asked for would still reach the parent run's report."""
    runs = [
        stale_run(work.run(fold, network), current)
        for fold in range(1, folds + 1)
        for network in NETWORK_NAMES
    ]
    return [run for run in runs if run is not None]


def describe(stale: list[Stale]) -> str:
    """The stale runs, and the settings that changed (once when every run shares them)."""
    changes = {tuple(s.changes) for s in stale}
    if len(changes) == 1:
        return "\n".join(
            [f"  {s.name} ({s.state})" for s in stale] + ["  changed: " + "; ".join(changes.pop())]
        )
    return "\n".join(f"  {s.name} ({s.state}): changed " + "; ".join(s.changes) for s in stale)


def refuse(stale: list[Stale]) -> StaleRun:
    return StaleRun(
        f"{len(stale)} run folder(s) hold runs of other settings than this config's, and would "
        f"be resumed, skipped as done or reported with its results:\n{describe(stale)}\n"
        f"Expected runs of this config. Go back to the settings they were trained with, use a "
        f"fresh workdir, or give --restart-stale to move them to runs/.stale/ (their MLflow runs "
        f"end KILLED) and train them anew."
    )


def check_one_fingerprint(
    tags: dict[str, dict[str, str]], params: dict[str, dict[str, str]], expected: Identity | None
) -> None:
    """For a report: the MLflow runs (their tags and params, by run name) must share one
    fingerprint, and `expected`'s where it is known (the config's, when its workdir holds the split
    and store to compute it); else a DataError naming the runs of each fingerprint and what
    differs."""
    groups: dict[str, list[str]] = {}
    for name in sorted(tags):
        groups.setdefault(tags[name].get(FINGERPRINT, ""), []).append(name)
    wanted = expected.fingerprint if expected is not None else next(iter(groups), "")
    if set(groups) <= {wanted}:
        return
    if expected is not None:
        reference, against = expected.settings, "this config's (with its workdir's split and store)"
    else:
        first = groups[wanted][0]
        reference, against = (
            recorded_settings(tags[first], params[first]),
            f"that of {', '.join(groups[wanted])}",
        )
    lines = []
    for fingerprint, names in groups.items():
        if fingerprint != wanted:
            changed = differences(recorded_settings(tags[names[0]], params[names[0]]), reference)
            lines.append(
                f"  fingerprint {fingerprint[:12] or 'none (written before fingerprints)'}: "
                f"{', '.join(names)}; " + ("; ".join(changed) or "the same covered settings")
            )
    raise DataError(
        f"the runs to report differ from {against} in what decides their results; a table of them "
        f"would mix runs of different settings:\n"
        + "\n".join(lines)
        + "\nExpected runs of one fingerprint: rerun the stale ones "
        "(`cxr run --restart-stale`), or report another parent run (--run-id)."
    )


def check_run(paths: RunPaths, current: Identity) -> None:
    """Raise StaleRun if the run folder holds a run of other settings (for a run started without
    the driver, e.g. `cxr train-one`)."""
    stale = stale_run(paths, current)
    if stale is not None:
        raise refuse([stale])


def move_stale(work: WorkPaths, tracking: TrackingTarget, stale: list[Stale]) -> Path:
    """Move the stale run folders to runs/.stale/<time>/ and end their MLflow runs KILLED, tagged
    with where the folder went. Returns that folder."""
    from orchestrator.tracking.runs import RunTracker
    from orchestrator.training import remote_run

    target = work.stale / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for run in stale:
        moved = target / run.name
        shutil.move(str(run.paths.root), str(moved))
        # object storage: copied, then deleted
        remote_run.move_aside(run.paths, work.remote_of(moved))
        tracker = RunTracker(tracking.uri, tracking.experiment, moved)
        status = tracker.end_stale(str(moved))
        log.warning(
            "%s: %s run of other settings moved to %s%s",
            run.name,
            run.state,
            moved,
            f"; its MLflow run is {status}" if status else "",
        )
    return target


def set_aside_stale(
    work: WorkPaths, folds: int, tracking: TrackingTarget, current: Identity, restart: bool
) -> None:
    """Stop on run folders of other settings than `current` (naming them and what changed), or,
    when `restart`, move them to runs/.stale/<time>/ with their MLflow runs KILLED."""
    stale = find_stale(work, folds, current)
    if not stale:
        return
    if not restart:
        raise refuse(stale)
    where = move_stale(work, tracking, stale)
    log.warning("moved %d run(s) of other settings to %s; they are trained anew", len(stale), where)
