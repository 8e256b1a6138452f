"""The MLflow Model Registry: what `cxr run` registers at its end, and `cxr models`.

- Each finished run's model (a pyfunc of models.serving: image files in, probabilities out) is a
  version of `cxr-<config name>-<network>`, tagged with its fold, run id, fingerprint, split
  hash and test AUC and accuracy. A run is registered once, however often `cxr run` ends.
- A run set aside by `--restart-stale` keeps its versions, tagged `cxr.stale` (the column
  `stale` of `cxr models`); a run registered never points at a version of another run.
- Each network's fold ensemble, `cxr-<config name>-<network>-ensemble`: one model holding the
  folds' networks, whose output is the mean of their probabilities. It is logged to the parent
  run and registered; a new version only when its set of runs changed.
- A model card per version (orchestrator.serving.model_card): its description, and MODEL_CARD.md
  in its run's artifacts (an ensemble's: ensemble-<network>/MODEL_CARD.md in the parent run's).
- Aliases: `@fold<k>` is fold k's newest version of a network's model (a run trained again after
  `--restart-stale` takes it over), `@ensemble` the ensemble's newest; `cxr models` lists them and
  `cxr predict --model models:/<name>@fold1` loads by them.

An ensemble has no test set of its own: each fold's test set held images the other folds trained
on (the paper's folds overlap). Its tags give the members' mean test figures, and say so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from dataclasses import dataclass
from typing import Iterator

import mlflow
import pandas as pd
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from models.catalog import NETWORK_NAMES
from orchestrator.paths import WorkPaths
from orchestrator.serving.model_card import (
    CardInputs,
    card_description,
    ensemble_card,
    run_card,
    with_external,
)
from orchestrator.tracking.names import (
    ENSEMBLE_ALIAS,
    FINGERPRINT,
    FOLD,
    FOLDS,
    MEMBER_RUNS,
    MEMBERS_MEAN,
    MODEL_ARTIFACT,
    MODEL_CARD,
    NETWORK,
    RUN_ID,
    SPLIT_HASH,
    STALE,
    TEST_ACCURACY,
    TEST_AUC,
    ensemble_artifact,
    ensemble_model_name,
    fold_alias,
    registered_model_name,
)
from orchestrator.tracking.records import RunRecords

log = logging.getLogger(__name__)
COLUMNS = ("name", "version", "aliases", "folds", TEST_AUC, TEST_ACCURACY, "stale", "run_id", "uri")


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    new: bool
    network: str = ""
    ensemble: bool = False

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_models(
    tracking_uri: str, card: CardInputs, limits: dict[str, int], parent_run_id: str
) -> list[Registered]:
    """Register every finished run of the config (`card`: its name, workdir and protocol) not
    registered yet, and each network's fold ensemble (of two folds or more) when its runs
    changed; `limits`: what one request to an ensemble may hold (Config.model_limits). Returns
    what the registry holds for them."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    done = finished_runs(card.work, card.splits.folds)
    out = []
    for network in NETWORK_NAMES:
        runs = [r for r in done if r["network"] == network]
        out += [register_run(client, card, run) for run in runs]
        if runs:
            alias_folds(client, registered_model_name(card.config_name, network))
        if len(runs) >= 2:
            out.append(register_ensemble(client, card, limits, network, runs, parent_run_id))
    return out


def finished_runs(work: WorkPaths, folds: int) -> list[dict]:
    """{fold, network, run_id, model_uri} of each run folder with a done.json, in fold order."""
    runs = []
    for network in NETWORK_NAMES:
        for fold in range(1, folds + 1):
            record = RunRecords(work.run(fold, network)).read_done()
            if record.get("run_id"):  # runs finished before models were published have no model_uri
                runs.append(
                    {
                        "fold": fold,
                        "network": network,
                        "run_id": record["run_id"],
                        "model_uri": record.get("model_uri")
                        or f"runs:/{record['run_id']}/{MODEL_ARTIFACT}",
                    }
                )
    return runs


def register_run(client: MlflowClient, card: CardInputs, run: dict) -> Registered:
    name = registered_model_name(card.config_name, run["network"])
    existing = versions(client, name, f"tags.{RUN_ID} = '{run['run_id']}'")
    if existing:
        return Registered(name, existing[0].version, False, run["network"])
    data = client.get_run(run["run_id"]).data
    tags = {
        FOLD: str(run["fold"]),
        NETWORK: run["network"],
        RUN_ID: run["run_id"],
        FINGERPRINT: data.tags.get(FINGERPRINT, ""),
        SPLIT_HASH: data.tags.get(SPLIT_HASH, ""),
        **{
            key: f"{data.metrics[key]:.6f}"
            for key in (TEST_AUC, TEST_ACCURACY)
            if key in data.metrics
        },
    }
    with _quietly():
        version = mlflow.register_model(run["model_uri"], name, tags=tags)
    text = run_card(card, name, str(version.version), run, data.tags)
    client.log_text(run["run_id"], text, MODEL_CARD)
    client.update_model_version(name, version.version, description=card_description(text))
    log.debug("registered %s version %s (run %s)", name, version.version, run["run_id"])
    return Registered(name, str(version.version), True, run["network"])


def alias_folds(client: MlflowClient, name: str) -> None:
    """Point `@fold<k>` of model `name` at fold k's newest version."""
    newest: dict[str, str] = {}
    for version in versions(client, name):  # newest first
        newest.setdefault(version.tags.get(FOLD, ""), version.version)
    for fold, version in newest.items():
        if fold:
            client.set_registered_model_alias(name, fold_alias(int(fold)), version)


def register_ensemble(
    client: MlflowClient,
    card: CardInputs,
    limits: dict[str, int],
    network: str,
    runs: list[dict],
    parent_run_id: str,
) -> Registered:
    from models.serving import log_classifier

    name = ensemble_model_name(card.config_name, network)
    members = ",".join(r["run_id"] for r in runs)
    latest = versions(client, name)
    if latest and latest[0].tags.get(MEMBER_RUNS) == members:
        client.set_registered_model_alias(name, ENSEMBLE_ALIAS, latest[0].version)
        return Registered(name, latest[0].version, False, network, ensemble=True)
    metrics = [client.get_run(r["run_id"]).data.metrics for r in runs]
    means = {
        key: sum(m[key] for m in metrics) / len(metrics)
        for key in (TEST_AUC, TEST_ACCURACY)
        if all(key in m for m in metrics)
    }
    # the parent run holds the ensemble; ending it here is undone by the driver's finish_parent
    with mlflow.start_run(run_id=parent_run_id):
        info = log_classifier(
            ensemble_artifact(network), [member_file_uri(r["run_id"]) for r in runs], limits
        )
    tags = {
        NETWORK: network,
        FOLDS: ",".join(str(r["fold"]) for r in runs),
        MEMBER_RUNS: members,
        **{f"{MEMBERS_MEAN}{key}": f"{value:.6f}" for key, value in means.items()},
    }
    with _quietly():
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    text = ensemble_card(card, name, str(version.version), network, tags[FOLDS], means)
    client.log_text(parent_run_id, text, f"{ensemble_artifact(network)}/{MODEL_CARD}")
    client.update_model_version(name, version.version, description=card_description(text))
    client.set_registered_model_alias(name, ENSEMBLE_ALIAS, version.version)
    log.debug("registered %s version %s (folds %s)", name, version.version, tags[FOLDS])
    return Registered(name, str(version.version), True, network, ensemble=True)


def record_external(client: MlflowClient, version, evaluations: list[dict]) -> None:
    """Rewrite a registered version's card (MODEL_CARD.md and its description) with its external
    validations (orchestrator.serving.model_card.with_external)."""
    where = card_artifact(version)
    try:
        card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/{where}")
    except (
        Exception
    ) as exc:  # a version registered by hand, or before cards existed: nothing to rewrite
        log.warning(
            "%s version %s: no model card to add the evaluation to (%s)",
            version.name,
            version.version,
            str(exc).splitlines()[0][:200],
        )
        return
    card = with_external(card, evaluations)
    client.log_text(version.run_id, card, where)
    client.update_model_version(version.name, version.version, description=card_description(card))


def card_artifact(version) -> str:
    """Where a version's card lies in its run's artifacts: a fold's at the root, an ensemble's
    beside the ensemble in the parent run."""
    if MEMBER_RUNS in version.tags:
        return f"{ensemble_artifact(version.tags[NETWORK])}/{MODEL_CARD}"
    return MODEL_CARD


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """MLflow's own lines of a registration ("Successfully registered model", "Created version")
    kept off the console, two per version, unless debug logging is on (`cxr -v`); they are
    printed after all should the registration fail. MLflow writes them to `sys.stderr` as it
    stands at the call; the project's log handler keeps the stream it was made with."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def registry_table(registered: list[Registered]) -> pd.DataFrame:
    """One row per network of what the registry holds for these runs: the runs' model and its
    versions (new ones starred), and the fold ensemble's version."""
    rows = []
    for network in dict.fromkeys(r.network for r in registered):
        runs = [r for r in registered if r.network == network and not r.ensemble]
        ensemble = [r for r in registered if r.network == network and r.ensemble]
        rows.append(
            {
                "model": runs[0].name if runs else "",
                "versions": ", ".join(f"{r.version}{'*' if r.new else ''}" for r in runs),
                "ensemble": (
                    f"{ensemble[0].name} v{ensemble[0].version}{'*' if ensemble[0].new else ''}"
                    if ensemble
                    else ""
                ),
            }
        )
    return pd.DataFrame(rows, columns=["model", "versions", "ensemble"])


def member_file_uri(run_id: str) -> str:
    """The artifact URI of the network file inside a run's published model."""
    from models.serving import network_paths

    uri = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    (path,) = network_paths(Model.load(uri))
    return f"{uri}/{path}"


def versions(client: MlflowClient, name: str, where: str = "") -> list:
    """The versions of `name` (matching `where`), newest first; none if it is not registered."""
    query = f"name = '{name}'" + (f" and {where}" if where else "")
    return sorted(client.search_model_versions(query), key=lambda v: int(v.version), reverse=True)


def model_table(uri: str, prefix: str = "cxr-") -> pd.DataFrame:
    """`cxr models`: every version of the registered models named `prefix...`, newest first."""
    client = MlflowClient(uri)
    rows = []
    for model in sorted(
        client.search_registered_models(f"name LIKE '{prefix}%'"), key=lambda m: m.name
    ):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in versions(client, model.name):
            tags = version.tags
            figures = {
                key: tags.get(key) or tags.get(f"{MEMBERS_MEAN}{key}", "")
                for key in (TEST_AUC, TEST_ACCURACY)
            }
            rows.append(
                {
                    "name": model.name,
                    "version": int(version.version),
                    "aliases": ",".join(aliases.get(str(version.version), [])),
                    "folds": tags.get(FOLD) or tags.get(FOLDS, ""),
                    **figures,
                    "stale": "yes" if STALE in tags else "",
                    "run_id": version.run_id or "",
                    "uri": f"models:/{model.name}/{version.version}",
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))
