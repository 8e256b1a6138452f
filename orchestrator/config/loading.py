"""Loading a config: YAML files in configs/, overlays on a base config, `--set` overrides and
the keys that moved, into the frozen dataclasses of orchestrator.config.schema.

Unknown keys and wrong types fail with the key's dotted name; `--set section.key=value`
overrides parse values as YAML.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml

from data_pipeline.objects import is_uri
from models.catalog import NETWORKS
from orchestrator.config.schema import (
    NAMED_WEIGHTS,
    PER_NETWORK,
    Config,
    ConfigError,
    ModelSpec,
    sqlite_file,
)

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# Keys that moved to another section, old -> new. They keep working for one release, with a
# warning naming the new key; a config giving both is refused.
MOVED: dict[str, str] = {
    "train.checkpoint_every": "checkpoint.every",
    "train.checkpoint_min_seconds": "checkpoint.min_seconds",
    "train.keep_checkpoints": "checkpoint.keep",
    "train.log_checkpoints": "checkpoint.log",
    "train.eval_batch_size": "execution.eval_batch_size",
    "train.run_eagerly": "execution.run_eagerly",
    "train.reuse_traced": "execution.reuse_traced",
    "train.fail_at": "execution.fail_at",
}


class MovedKeyWarning(FutureWarning):
    """A config or --set used a key's old place; the message names the new one."""


BASE = "base"  # a config's key naming the config it is an overlay on (a path relative to it)


def load_config(path: Path | str | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key=value` overrides.

    A config with `base: paper.yaml` is an overlay: its values replace the base's, key by key
    (sections merge), so that it holds only what differs (big_vision's `runlocal`)."""
    where = str(path or "defaults")
    data: dict[str, Any] = _read_config(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(data, _moved_override(item))
    config = from_mapping(Config, data, where=where)
    if path is not None and not config.name:
        config = dataclasses.replace(config, name=Path(path).stem)
    return config


def _read_config(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, merged over its base's (and that base's, ...)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        where = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}{where}: cannot read the config ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, found {type(data).__name__}."
        )
    base = data.pop(BASE, None)
    _move_keys(data, str(path))
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{path}: {BASE}: expected the path of the config this one overlays, received {base!r}."
        )
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        raise ConfigError(
            f"{path}: {BASE}: {base} leads back to a config already in the chain "
            f"{[str(p) for p in (*chain, path)]}; expected a chain that ends."
        )
    return _merged(_read_config(base_path, (*chain, path.resolve())), data)


def _merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        under = _spread(out.get(key), value if isinstance(value, dict) else ())
        out[key] = (
            _merged(under, value) if isinstance(value, dict) and isinstance(under, dict) else value
        )
    return out


def _spread(value: Any, keys: typing.Iterable[str]) -> Any:
    """One value of a per-network setting (`epochs: 100`) as the mapping that some networks'
    values (an overlay's `epochs: {resnet50v2: 2}`, `--set train.epochs.resnet50v2=2`) go into;
    else `value`."""
    names = [n.name for n in NETWORKS]
    one = isinstance(value, int) and not isinstance(value, bool) and set(keys) <= set(names)
    return dict.fromkeys(names, value) if one else value


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. splits.seed=3.")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node[part] = node = _spread(node.setdefault(part, {}), [leaf])
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section.")
    node[leaf] = yaml.safe_load(raw)


def from_mapping(cls: type, data: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping, received {data!r}."
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {[prefix + k for k in unknown]}; expected keys of "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)}."
        )
    values = {}
    for name, value in data.items():
        key, expected = prefix + name, hints[name]
        # one value for every network
        value = _spread(value, ()) if expected in PER_NETWORK else value
        if dataclasses.is_dataclass(expected):
            values[name] = from_mapping(expected, value or {}, where, key + ".")
        else:
            values[name] = _check_type(value, expected, where, key)
    try:
        return cls(**values)
    except ValueError as exc:  # a spec's own validation (allowed values, ranges)
        raise ConfigError(f"{where}: {exc}") from None


def _check_type(value: Any, expected: Any, where: str, key: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot in the mantissa) as a string
    origin = typing.get_origin(expected)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(expected) or (Any,)
        # a tuple: a config turned back into a mapping (dataclasses.asdict)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{where}: {key}: expected a list, received {type(value).__name__} {value!r}."
            )
        return tuple(_check_type(v, inner, where, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _check_type(value, option, where, key)
            except ConfigError:
                continue
        raise ConfigError(
            f"{where}: {key}: expected {expected}, received {type(value).__name__} {value!r}."
        )
    if expected is Any or expected is type(None) and value is None:
        return value
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{where}: {key}: expected {getattr(expected, '__name__', expected)}, "
            f"received {type(value).__name__} {value!r}."
        )
    return value


def resolved(config: Config, base: Path | None = None) -> Config:
    """The config with every relative path made absolute against `base` (default: the current
    folder), and the tracking URI fixed (config, else $MLFLOW_TRACKING_URI, else the default).
    Ray workers run in other folders (and on other nodes), so the driver resolves paths and the
    URI once and hands the workers the result; on a cluster, give absolute paths on shared
    storage."""
    base = Path(base or Path.cwd())

    def absolute(path: str) -> str:
        return absolute_path(path, base)

    uri = config.tracking_uri  # fixed here: workers see neither this folder nor this environment
    if (database := sqlite_file(uri)) is not None:
        uri = "sqlite:///" + absolute(str(database))
    return dataclasses.replace(
        config,
        workdir=absolute(config.workdir),
        model=resolved_model(config.model, base),
        data=dataclasses.replace(
            config.data,
            covid_root=absolute(config.data.covid_root),
            rsna_root=absolute(config.data.rsna_root),
        ),
        splits=dataclasses.replace(config.splits, import_dir=absolute(config.splits.import_dir)),
        tracking=dataclasses.replace(config.tracking, uri=uri),
        cluster=dataclasses.replace(
            config.cluster, storage_path=absolute(config.cluster.storage_path)
        ),
    )


def absolute_path(path: str, base: Path) -> str:
    """`path` against `base` when it is relative; an empty path and a URI as they are."""
    if path and not Path(path).is_absolute() and not is_uri(path):
        return str(base / path)
    return path


def resolved_model(model: ModelSpec, base: Path | None = None) -> ModelSpec:
    """The model section with a weights file's path made absolute (default: against the current
    folder), so that it means the same file from any folder; named weights as they are."""
    if model.weights in NAMED_WEIGHTS:
        return model
    return dataclasses.replace(model, weights=absolute_path(model.weights, base or Path.cwd()))


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A config dataclass (or mapping) as dotted strings, the form of MLflow params:
    {'splits.seed': '0', ...}."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _move_keys(data: dict[str, Any], where: str) -> None:
    """The moved keys of a config's mapping put in their new places, each with a warning."""
    for old, new in MOVED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = data.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{where}: {new_section}: expected a mapping, received {target!r}.")
        if new_key in target:
            raise ConfigError(
                f"{where}: {old} and {new}: expected only {new} (its new place), received both."
            )
        target[new_key] = section.pop(old_key)
        warnings.warn(_moved_text(old, new, where), MovedKeyWarning, stacklevel=3)


def _moved_override(item: str) -> str:
    """A `--set` of a moved key as the `--set` of its new place, with a warning."""
    key, sep, raw = item.partition("=")
    if sep and key in MOVED:
        warnings.warn(_moved_text(key, MOVED[key], "--set"), MovedKeyWarning, stacklevel=3)
        return f"{MOVED[key]}={raw}"
    return item


def _moved_text(old: str, new: str, where: str) -> str:
    return f"{where}: {old} is now {new}; the old key is read for one release. Write {new}."
