"""Splits: for each fold, the 8 training-phase sets, the test set and (where the protocol has one) a
validation set for checkpoint selection; written to disk, hashed, and checked for patient leakage.

Protocols (section 3.1 of the paper and the authors' code):
- `paper`: per fold, hold out whole COVID-19 patients until the test set has `test_covid` images
  (31) and covid-dataset pneumonia patients for `test_covid_pneumonia` images (8); every other
  covid-dataset image is the part shared by all phases; each phase adds its own `phase_normal`
  (250) RSNA normal and `phase_pneumonia` (200) RSNA pneumonia images, disjoint across phases;
  everything else is the test set. Folds are drawn independently, as in the paper, so a patient
  may be tested in several folds.
- `import`: the authors' own files (`All.csv`, `foldK/trainN.csv`), reproduced exactly.
- `sound`: every image in exactly one of the folds (grouped by patient, stratified by source and
  class), so each image is tested once; a validation set carved by patient from the training
  pool; phases built from the rest as in `paper` (smaller where the pool is).

`validation: test_pool` (paper, import) adds the authors' `s_test` set (all test COVID-19 plus
`s_test_normal` normal and `s_test_pneumonia` pneumonia test images) as `val.csv`: checkpoint
selection on test images, flagged in `splits.json` and wherever results are shown.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.files import new_build_dir, replace_dir, sha256_bytes
from data_pipeline.manifest import rsna_grouped_by_person
from data_pipeline.schema import CLASSES, DataError
from data_pipeline.sources.covid_chestxray import SOURCE as COVID_SOURCE
from data_pipeline.sources.rsna_pneumonia import SOURCE as RSNA_SOURCE

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["image_id", "label", "patient_id", "source"]
META_FILE, SUMS_FILE = (
    "splits.json",
    "SHA256SUMS",
)  # the split settings and flags; every file's hash
PROTOCOLS = ("paper", "import", "sound")
TEST_POOL_FLAG = (
    "checkpoint selection on a validation set drawn from the test pool (the paper's "
    "s_test): test-set selection, results are optimistic"
)


@dataclass(frozen=True)
class SplitSpec:
    protocol: str = "paper"
    seed: int = 0
    folds: int = 5
    phases: int = 8
    test_covid: int = 31  # paper: COVID-19 test images per fold (whole patients)
    test_covid_pneumonia: int = 8  # paper: covid-dataset pneumonia test images per fold
    phase_normal: int = 250  # RSNA normal images unique to each phase
    phase_pneumonia: int = 200  # RSNA pneumonia images unique to each phase
    validation: str = "none"  # paper/import: none | test_pool; sound always has its own
    s_test_normal: int = 300  # test_pool: normal / pneumonia images of the s_test set
    s_test_pneumonia: int = 300
    val_folds: int = 10  # sound: validation = 1 of this many patient-grouped parts of the pool
    import_dir: str = ""  # import: folder with All.csv and foldK/trainN.csv

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"splits.protocol: expected one of {list(PROTOCOLS)}, received {self.protocol!r}."
            )
        if self.validation not in ("none", "test_pool"):
            raise ValueError(
                f"splits.validation: expected 'none' or 'test_pool', received {self.validation!r}."
            )
        if self.protocol == "sound" and self.validation == "test_pool":
            raise ValueError(
                "splits.validation: 'test_pool' selects on test images; the sound protocol "
                "carves its own validation set from the training pool. Use 'none'."
            )
        if self.protocol == "import" and not self.import_dir:
            raise ValueError(
                "splits.import_dir: the import protocol needs the folder of the authors' "
                "split files."
            )
        if self.val_folds < 2:
            raise ValueError(f"splits.val_folds: expected at least 2, received {self.val_folds}.")


# A fold: subset name ("phase1".."phaseN", "val", "test") -> rows (SPLIT_COLUMNS [+ part]).
Fold = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class Splits:
    spec: SplitSpec
    folds: dict[int, Fold]
    notes: tuple[str, ...]
    flags: tuple[str, ...] = ()  # warnings that must travel with every result (test-set selection)


def make_splits(manifest: pd.DataFrame, spec: SplitSpec) -> Splits:
    """Build every fold of the chosen protocol and check it for patient leakage."""
    manifest = manifest.sort_values(["source", "image_id"], kind="stable").reset_index(drop=True)
    if rsna_grouped_by_person(manifest):
        rsna = manifest[manifest["source"] == RSNA_SOURCE]
        notes = [
            f"RSNA images are grouped by person: {rsna['patient_id'].nunique()} persons "
            f"for {len(rsna)} images, from RSNA's mapping to NIH ChestX-ray14 "
            f"and NIH's patient ids."
        ]
    else:
        notes = [
            "RSNA ids are per image, not per person: without RSNA's mapping to NIH ChestX-ray14 "
            "(data.rsna_mapping, data.nih_entries) RSNA images are grouped by image, "
            "and one person's images could sit on both sides."
        ]
    if spec.protocol == "paper":
        folds = {k: _paper_fold(manifest, spec, k) for k in range(1, spec.folds + 1)}
        notes.append(
            "Folds are drawn independently, as in the paper: a patient may be tested in "
            "several folds, so the folds are not independent estimates."
        )
    elif spec.protocol == "import":
        folds = _import_folds(manifest, spec)
        notes.append("Splits are the authors' own files; their folds overlap in test patients.")
    else:
        folds, shrink_notes = _sound_folds(manifest, spec)
        notes.extend(shrink_notes)
    if spec.validation == "test_pool":
        for k, fold in folds.items():
            fold["val"] = _s_test(fold["test"], spec, k)
    splits = Splits(
        spec=spec,
        folds=folds,
        notes=tuple(notes),
        flags=(TEST_POOL_FLAG,) if spec.validation == "test_pool" else (),
    )
    check_splits(splits)
    return splits


def check_splits(splits: Splits) -> None:
    for k, fold in splits.folds.items():
        check_no_leakage(fold, k, val_from_test_pool=splits.spec.validation == "test_pool")


# ---------------------------------------------------------------- leakage


def patient_keys(rows: pd.DataFrame) -> set[tuple[str, str]]:
    """Patients are only comparable within a source (covid id `2` is not RSNA's `2`)."""
    return set(zip(rows["source"], rows["patient_id"], strict=False))


def check_no_leakage(fold: Fold, k: int, val_from_test_pool: bool = False) -> None:
    """No patient of the fold's test set may appear in its phases or validation set, and none of
    a training-pool validation set in the phases it selects among."""
    phases = [name for name in fold if name.startswith("phase")]
    pairs = [("test", name) for name in phases]
    if "val" in fold:
        pairs += [("val", name) for name in phases]
        if not val_from_test_pool:  # s_test is drawn from the test pool by design (flagged)
            pairs.append(("test", "val"))
    for held, used in pairs:
        leaked = sorted(patient_keys(fold[held]) & patient_keys(fold[used]))
        if leaked:
            shown = ", ".join(f"{s}:{p}" for s, p in leaked[:20])
            raise DataError(
                f"fold {k}: {len(leaked)} patient(s) of the {held} set also appear in {used}: "
                f"{shown}{' ...' if len(leaked) > 20 else ''}."
            )


# ---------------------------------------------------------------- paper


def _paper_fold(manifest: pd.DataFrame, spec: SplitSpec, k: int) -> Fold:
    rng = np.random.default_rng([spec.seed, k])
    covid = manifest[manifest["source"] == COVID_SOURCE]
    rsna = manifest[manifest["source"] == RSNA_SOURCE]
    test_parts = [
        hold_out_patients(
            covid[covid["label"] == "COVID-19"], spec.test_covid, rng, f"fold {k} COVID-19"
        ),
        hold_out_patients(
            covid[covid["label"] == "pneumonia"],
            spec.test_covid_pneumonia,
            rng,
            f"fold {k} covid-dataset pneumonia",
        ),
    ]
    held = pd.concat(test_parts)
    shared = covid[~covid["image_id"].isin(held["image_id"])]
    fold = _phases(shared, rsna, spec, rng, spec.phase_normal, spec.phase_pneumonia)
    used = pd.concat([held] + [f for f in fold.values()])
    fold["test"] = pd.concat([held, rsna[~rsna["image_id"].isin(used["image_id"])]])
    return fold


def hold_out_patients(
    rows: pd.DataFrame, n_images: int, rng: np.random.Generator, what: str
) -> pd.DataFrame:
    """Whole patients, taken in a random order, holding out exactly `n_images` images.

    Walking the shuffled patients, one is taken when the rest can still complete the count
    exactly (a subset-sum table over the remaining patients): plain greedy would miss exact
    totals that exist when patients have several images.
    """
    if n_images > len(rows):
        raise DataError(f"{what}: cannot hold out {n_images} images, only {len(rows)} exist.")
    sizes = rows.groupby("patient_id").size()
    order = rng.permutation(sizes.index.to_numpy())
    counts = sizes.loc[order].to_numpy()
    # reachable[i, s]: patients order[i:] can make exactly s images
    reachable = np.zeros((len(order) + 1, n_images + 1), dtype=bool)
    reachable[len(order), 0] = True
    for i in range(len(order) - 1, -1, -1):
        reachable[i] = reachable[i + 1]
        if counts[i] <= n_images:  # a patient with more images than wanted can never be taken
            reachable[i, counts[i] :] |= reachable[i + 1, : n_images + 1 - counts[i]]
    if not reachable[0, n_images]:
        raise DataError(
            f"{what}: no set of whole patients has exactly {n_images} images; "
            f"change the configured count."
        )
    chosen, remaining = [], n_images
    for i, patient in enumerate(order):
        if remaining == 0:
            break
        if counts[i] <= remaining and reachable[i + 1, remaining - counts[i]]:
            chosen.append(patient)
            remaining -= counts[i]
    return rows[rows["patient_id"].isin(chosen)]


def _phases(
    shared: pd.DataFrame,
    rsna: pd.DataFrame,
    spec: SplitSpec,
    rng: np.random.Generator,
    n_normal: int,
    n_pneumonia: int,
) -> Fold:
    """`spec.phases` phase sets: the shared part plus disjoint RSNA draws of each class."""
    normal = _permuted(rsna[rsna["label"] == "normal"], rng)
    pneumonia = _permuted(rsna[rsna["label"] == "pneumonia"], rng)
    for name, pool, n in (("normal", normal, n_normal), ("pneumonia", pneumonia, n_pneumonia)):
        if n * spec.phases > len(pool):
            raise DataError(
                f"{spec.phases} phases x {n} RSNA {name} images need {n * spec.phases}, "
                f"only {len(pool)} are available; lower splits.phase_{name}."
            )
    fold = {}
    for i in range(spec.phases):
        unique = pd.concat(
            [
                normal.iloc[i * n_normal : (i + 1) * n_normal],
                pneumonia.iloc[i * n_pneumonia : (i + 1) * n_pneumonia],
            ]
        )
        fold[f"phase{i + 1}"] = pd.concat(
            [shared.assign(part="shared"), unique.assign(part="unique")]
        )
    return fold


def _permuted(rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    return rows.iloc[rng.permutation(len(rows))]


def _s_test(test: pd.DataFrame, spec: SplitSpec, k: int) -> pd.DataFrame:
    """The authors' s_test: all test COVID-19 plus a sample of test normal and pneumonia."""
    rng = np.random.default_rng([spec.seed, k, 1])
    parts = [test[test["label"] == "COVID-19"]]
    for label, n in (("normal", spec.s_test_normal), ("pneumonia", spec.s_test_pneumonia)):
        pool = test[test["label"] == label]
        parts.append(_permuted(pool, rng).iloc[:n])
    return pd.concat(parts)


# ---------------------------------------------------------------- import


def _import_folds(manifest: pd.DataFrame, spec: SplitSpec) -> dict[int, Fold]:
    root = Path(spec.import_dir)
    by_name = _manifest_by_authors_name(manifest)
    every = _read_authors_file(root / "All.csv", by_name)
    folds = {}
    for k in range(1, spec.folds + 1):
        phases = [
            _read_authors_file(root / f"fold{k}" / f"train{n}.csv", by_name)
            for n in range(1, spec.phases + 1)
        ]
        shared_ids = set.intersection(*(set(p["image_id"]) for p in phases))
        fold = {
            f"phase{n}": p.assign(part=np.where(p["image_id"].isin(shared_ids), "shared", "unique"))
            for n, p in enumerate(phases, start=1)
        }
        trained = set().union(*(set(p["image_id"]) for p in phases))
        fold["test"] = every[~every["image_id"].isin(trained)]
        folds[k] = fold
    return folds


def _manifest_by_authors_name(manifest: pd.DataFrame) -> pd.DataFrame:
    """The authors name RSNA images `<patientId>.png` and covid-dataset images by file name."""
    names = manifest["image_id"].where(
        manifest["source"] != RSNA_SOURCE, manifest["image_id"] + ".png"
    )
    return manifest.assign(authors_name=names).set_index("authors_name")


def _read_authors_file(path: Path, by_name: pd.DataFrame) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: expected an authors' split file (filename,class), found nothing.")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("filename", "class") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(table.columns)}.")
    unknown = table.loc[~table["filename"].isin(by_name.index), "filename"]
    if not unknown.empty:
        raise DataError(
            f"{path}: {len(unknown)} image(s) are not in the manifest: {unknown.tolist()[:10]}."
        )
    rows = by_name.loc[table["filename"]].reset_index(drop=True)
    disagree = table["class"].to_numpy() != rows["label"].to_numpy()
    if disagree.any():
        shown = list(
            zip(
                table.loc[disagree, "filename"],
                table.loc[disagree, "class"],
                rows.loc[disagree, "label"],
                strict=False,
            )
        )
        raise DataError(
            f"{path}: column 'class' disagrees with the manifest "
            f"for {int(disagree.sum())} image(s) (file, theirs, ours): {shown[:10]}."
        )
    return rows


# ---------------------------------------------------------------- sound


def _sound_folds(manifest: pd.DataFrame, spec: SplitSpec) -> tuple[dict[int, Fold], list[str]]:
    groups = (manifest["source"] + ":" + manifest["patient_id"]).to_numpy()
    strata = (manifest["source"] + ":" + manifest["label"]).to_numpy()
    fold_of = group_stratified_folds(strata, groups, spec.folds, seed=spec.seed) + 1

    folds, notes = {}, []
    for k in range(1, spec.folds + 1):
        pool = manifest[fold_of != k]
        inner = group_stratified_folds(
            strata[fold_of != k], groups[fold_of != k], spec.val_folds, seed=spec.seed * 1000 + k
        )
        val, rest = pool[inner == 0], pool[inner != 0]
        rsna = rest[rest["source"] == RSNA_SOURCE]
        per_phase = {}
        for label, wanted in (("normal", spec.phase_normal), ("pneumonia", spec.phase_pneumonia)):
            available = int((rsna["label"] == label).sum())
            per_phase[label] = min(wanted, available // spec.phases)
            if per_phase[label] < wanted:
                notes.append(
                    f"fold {k}: the training pool has {available} RSNA {label} images, so each of "
                    f"the {spec.phases} phases gets {per_phase[label]} instead of {wanted}."
                )
                log.warning(notes[-1])
        rng = np.random.default_rng([spec.seed, k])
        fold = _phases(
            rest[rest["source"] == COVID_SOURCE],
            rsna,
            spec,
            rng,
            per_phase["normal"],
            per_phase["pneumonia"],
        )
        fold["val"] = val
        fold["test"] = manifest[fold_of == k]
        folds[k] = fold
    return folds, notes


def group_stratified_folds(
    strata: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> np.ndarray:
    """The fold (0 .. n_splits-1) of each row: every group whole in one fold, every stratum spread
    as evenly as the groups allow.

    The criterion is sklearn's `StratifiedGroupKFold` (each group, largest first, goes where the
    spread of the strata's per-fold shares grows least), but sklearn walks every group in Python:
    on RSNA's 14,863 one-image persons that walk is most of a sound split's time. A one-image
    group holds one stratum, so those are dealt per stratum, each to the fold holding the fewest
    of it; only the multi-image groups, far fewer, take the greedy walk.
    """
    rng = np.random.default_rng(seed)
    group_names, group_of = np.unique(groups, return_inverse=True)
    strata_names, stratum_of = np.unique(strata, return_inverse=True)
    per_group = np.zeros((len(group_names), len(strata_names)), dtype=np.int64)
    np.add.at(per_group, (group_of, stratum_of), 1)
    sizes, totals = per_group.sum(axis=1), per_group.sum(axis=0)
    if len(group_names) < n_splits:
        raise DataError(
            f"splits: {n_splits} folds need at least {n_splits} patients; found {len(group_names)}."
        )
    counts = np.zeros((n_splits, len(strata_names)), dtype=np.int64)
    fold_of_group = np.empty(len(group_names), dtype=np.int64)

    multi = rng.permutation(np.flatnonzero(sizes > 1))
    for g in multi[np.argsort(-sizes[multi], kind="stable")]:
        fold = _least_spread_fold(counts, per_group[g], totals)
        fold_of_group[g] = fold
        counts[fold] += per_group[g]

    singles = np.flatnonzero(sizes == 1)
    for s in range(len(strata_names)):
        members = rng.permutation(singles[per_group[singles, s] == 1])
        fold_of_group[members] = _deal(counts[:, s], counts.sum(axis=1), len(members))
        np.add.at(counts[:, s], fold_of_group[members], 1)
    return fold_of_group[group_of]


def _least_spread_fold(counts: np.ndarray, group: np.ndarray, totals: np.ndarray) -> int:
    """The fold whose taking `group` leaves the strata's per-fold shares least spread; ties go to
    the smallest fold."""
    n_splits = len(counts)
    trial = np.repeat(
        counts[None].astype(float), n_splits, axis=0
    )  # trial[f]: counts if f takes it
    trial[np.arange(n_splits), np.arange(n_splits)] += group
    spread = (trial / np.maximum(totals, 1)).std(axis=1).mean(axis=1)
    tied = np.flatnonzero(np.isclose(spread, spread.min()))
    return int(tied[np.argmin(counts.sum(axis=1)[tied])])


def _deal(stratum: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
    """The folds of `n` one-image groups of one stratum, each to the fold holding the fewest of it
    so far (ties to the smallest fold)."""
    stratum, sizes, out = stratum.copy(), sizes.copy(), np.empty(n, dtype=np.int64)
    for i in range(n):
        fold = min(range(len(stratum)), key=lambda f: (stratum[f], sizes[f]))
        out[i] = fold
        stratum[fold] += 1
        sizes[fold] += 1
    return out


# ---------------------------------------------------------------- files


def write_splits(splits: Splits, out: Path, manifest_path: Path | None = None) -> str:
    """Write every fold's CSVs, summary.csv, splits.json and SHA256SUMS; returns the split hash.

    Files are sorted and written with fixed formatting, so the same manifest and spec give
    byte-identical files. The folder is replaced atomically: a reader never sees half a split.
    """
    check_splits(splits)  # whatever built them, leaking splits are never written
    out = Path(out)
    tmp = new_build_dir(out)
    try:
        files = {}
        for k, fold in splits.folds.items():
            for name, rows in fold.items():
                columns = SPLIT_COLUMNS + (["part"] if "part" in rows.columns else [])
                table = rows[columns].sort_values(["source", "image_id"], kind="stable")
                files[f"fold{k}/{name}.csv"] = table.to_csv(index=False, lineterminator="\n")
        files["summary.csv"] = summary(splits).to_csv(index=False, lineterminator="\n")
        meta = {
            "spec": asdict(splits.spec),
            "notes": list(splits.notes),
            "validation": _validation_kind(splits.spec),
            "flags": list(splits.flags),
        }
        if manifest_path is not None:
            meta["manifest_sha256"] = sha256_bytes(Path(manifest_path).read_bytes())
        files[META_FILE] = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        sums = []
        for name, text in sorted(files.items()):
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            sums.append(f"{sha256_bytes(text.encode())}  {name}\n")
        (tmp / SUMS_FILE).write_text("".join(sums), encoding="utf-8")
        replace_dir(tmp, out, marker=SUMS_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return split_hash(out)


def split_hash(split_dir: Path) -> str:
    """One hash naming the whole split: the hash of its SHA256SUMS file."""
    return sha256_bytes((Path(split_dir) / SUMS_FILE).read_bytes())


def _validation_kind(spec: SplitSpec) -> str:
    if spec.protocol == "sound":
        return "training_pool"
    return spec.validation


def summary(splits: Splits) -> pd.DataFrame:
    """fold, subset, label, count (images) and patients (people, as the manifest groups them) for
    every subset (phases, val, test) and class."""
    records = []
    for k, fold in splits.folds.items():
        for name, rows in fold.items():
            counts = rows["label"].value_counts()
            people = rows.groupby("label")["patient_id"].nunique()
            records.extend(
                {
                    "fold": k,
                    "subset": name,
                    "label": label,
                    "count": int(counts.get(label, 0)),
                    "patients": int(people.get(label, 0)),
                }
                for label in CLASSES
            )
    return pd.DataFrame.from_records(
        records, columns=["fold", "subset", "label", "count", "patients"]
    )


def describe(splits: Splits) -> list[str]:
    """`cxr splits`' lines: images per subset and label (a range where the folds differ, as the
    sound protocol's do), then the notes and flags."""
    ranges = summary(splits).groupby(["subset", "label"], sort=False)["count"].agg(["min", "max"])
    cells = ranges.apply(
        lambda r: str(r["min"]) if r["min"] == r["max"] else f"{r['min']}-{r['max']}", axis=1
    )
    return (
        [f"images per fold ({splits.spec.folds} folds):", cells.unstack("label").to_string()]
        + [f"note: {note}" for note in splits.notes]
        + [f"FLAG: {flag}" for flag in splits.flags]
    )


def split_file(split_dir: Path, fold: int, subset: str) -> Path:
    """Where `write_splits` puts one subset of one fold (e.g. `phase3`, `val`, `test`)."""
    return Path(split_dir) / f"fold{fold}" / f"{subset}.csv"


def read_split(split_dir: Path, fold: int, subset: str) -> pd.DataFrame:
    """One subset of one fold (e.g. `phase3`, `val`, `test`) as written by `write_splits`."""
    path = split_file(split_dir, fold, subset)
    if not path.is_file():
        raise DataError(
            f"{path}: no such split file; expected fold{fold}/{subset}.csv under {split_dir}."
        )
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@dataclass(frozen=True)
class SplitMeta:
    """What `write_splits` records beside the split files, as the runs and the report read it."""

    spec: dict
    validation: str = ""  # test_pool | training_pool | none
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest_sha256: str = ""

    @property
    def protocol(self) -> str:
        return self.spec.get("protocol", "")

    @classmethod
    def read(cls, split_dir: Path) -> SplitMeta:
        path = Path(split_dir) / META_FILE
        if not path.is_file():
            raise DataError(
                f"{path}: no such file; expected the metadata of a splits folder written by "
                f"`cxr splits` (or `cxr run`)."
            )
        data = json.loads(path.read_text())
        if not isinstance(data.get("spec"), dict):
            raise DataError(
                f"{path}: expected a 'spec' mapping (the split settings), "
                f"found {data.get('spec')!r}."
            )
        return cls(
            spec=data["spec"],
            validation=data.get("validation", ""),
            flags=list(data.get("flags", [])),
            notes=list(data.get("notes", [])),
            manifest_sha256=data.get("manifest_sha256", ""),
        )

    @classmethod
    def read_if_any(cls, split_dir: Path | None) -> SplitMeta | None:
        if split_dir is None or not (Path(split_dir) / META_FILE).is_file():
            return None
        return cls.read(split_dir)
