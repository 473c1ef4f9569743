"""Typed configuration machinery, shared by every part's config dataclass (no project imports).

Every part of the system has a config dataclass beside it (a tower, an image head, a data source, the
trainer ...) whose fields have types and defaults and whose ``__post_init__`` validates itself. This
module holds what they share:

* :func:`resolve_path`: relative paths in configs are relative to the repository root;
* :class:`ConfigError`: a one-line error that names the key;
* :func:`yaml_layers` / :func:`merge_layers`: YAML files (with a ``base:`` chain) and ``a.b=c``
  overrides merged into a structured schema, an unknown key failing with the closest valid one;
* :func:`parse_part`: a plug-in's own config section (``model.heads.flow``, ``model.und.tower``, a
  source's ``options``), validated by the config class its registry names.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class ConfigError(ValueError):
    """A config names an unknown key, has a wrong type or breaks a rule; the message names the key."""


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` (made here when missing) cannot take a new file, or None: checked before any work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def resolve_path(path: str | Path) -> Path:
    """Relative paths in configs are relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def yaml_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """A YAML file's layers, its ``base`` chain first (``base: other.yaml`` is relative to the file)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"config base loop: {' -> '.join(map(str, chain + (path,)))}")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - a YAML syntax error is one line naming the file
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {path} is not a mapping of keys")
    base = layer.pop("base", None)
    layers = yaml_layers(path.parent / str(base), chain + (path.resolve(),)) if base else []
    return layers + [(str(path), layer)]


def dotlist_layer(overrides: list[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    return OmegaConf.from_dotlist(overrides)


def describe(e: OmegaConfBaseException, source: str, prefix: str = "") -> str:
    """One line: what is wrong with which key, where it came from, and the closest valid key."""
    key = prefix + (getattr(e, "full_key", None) or "?")
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConfigKeyError) and dataclasses.is_dataclass(getattr(e, "object_type", None)):
        valid = [f.name for f in dataclasses.fields(e.object_type)]
        close = difflib.get_close_matches(str(e.key), valid, n=1, cutoff=0.5)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f"; did you mean {parent}{close[0]}?" if close else f"; valid keys here: {', '.join(valid)}"
        return f"config error in {source}: unknown key {key}{hint}"
    if first_line.startswith("Merge error:"):  # a section given a plain value, e.g. model: 3
        return f"config error in {source}: {first_line} (a section needs key: value pairs)"
    return f"config error in {source}: {key}: {first_line}"


def merge_layers(
    schema: Any, layers: list[tuple[str, DictConfig]], plug_ins: Mapping[str, str | None] | None = None
) -> Any:
    """``schema`` (a dataclass type or instance) <- each (source, layer) in order -> the dataclass object.

    ``plug_ins``: dotted paths of plug-in sections (a mapping whose schema depends on a kind or a name, parsed
    by the part's own config class in ``__post_init__``) -> the dotted path of the kind that selects their
    schema, or None. They start empty, their defaults come from the class that parses them, and a layer that
    changes the kind starts the section afresh (the old kind's keys would not fit the new one's class).
    """
    merged = OmegaConf.structured(schema)
    for path in plug_ins or {}:
        OmegaConf.update(merged, path, {}, merge=False)
    for source, layer in layers:
        for path, kind_path in (plug_ins or {}).items():
            new_kind = OmegaConf.select(layer, kind_path) if kind_path else None
            if new_kind is not None and new_kind != OmegaConf.select(merged, kind_path):
                OmegaConf.update(merged, path, {}, merge=False)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:  # unknown key or wrong type
            raise ConfigError(describe(e, source)) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(describe(e, "the merged config")) from None


def parse_part(cls: type[T], value: Any, where: str) -> T:
    """A plug-in's config section -> an instance of its config class ``cls`` (validated by it).

    ``value`` is an instance already, or a mapping of overrides of ``cls``'s defaults; a wrong key or
    type is one line naming ``where.key`` and the closest valid key.
    """
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping | DictConfig):
        raise ConfigError(f"config error: {where} must be a mapping of keys, got {value!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(dict(value)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(describe(e, where, prefix=f"{where}.")) from None


def to_plain(cfg: Any) -> dict:
    """A config dataclass (plug-in sections included) as plain dicts and lists (JSON- and YAML-able)."""
    return OmegaConf.to_container(OmegaConf.create(dataclasses.asdict(cfg)), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)))
