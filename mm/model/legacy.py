"""Reading what the code wrote before image heads owned their parts (format 1): configs and weight names.

Format 1 (until the layering rework) kept the flow head's parts at the top of the model (``gen_encoder``,
``repa_proj``, ...; config sections ``model.flow``, ``model.gen``, ``model.autoencoder``), a code head's
net under its name (``nextfreq.*``; config ``model.nextfreq``), ``model.heads`` as a list, and the
understanding tower's fields flat in ``model.und``. Format 2 nests every head under ``heads.<name>``
and the tower under ``und.tower``. These functions map the old names onto the new ones, so runs and
releases written before still load (``tests/test_legacy.py`` holds a run and a release of format 1).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

FORMAT = 2  # of checkpoints (``trainer.json``) and releases (``config.json``) written today

FLOW_PARTS = ("autoencoder", "time_embed", "gen_encoder", "gen_decoder", "repa_proj")
CODE_HEADS = ("nextfreq", "raster")
OLD_HEADS = ("flow", *CODE_HEADS)
TOWER_KEYS = ("open_clip_arch", "weights", "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio",
              "in_channels", "mean", "std")  # fmt: skip


# The same renaming as regular expressions, for transformers' ``from_pretrained(key_mapping=...)`` (releases)
LEGACY_KEY_MAPPING = {
    rf"^({'|'.join(FLOW_PARTS)})\.": r"heads.flow.\1.",
    rf"^({'|'.join(CODE_HEADS)})\.": r"heads.\1.",
}


def legacy_key(name: str) -> str:
    """A format-1 parameter name or module prefix -> its format-2 name (others unchanged)."""
    first = name.split(".", 1)[0]
    if first in FLOW_PARTS:
        return f"heads.flow.{name}"
    if first in CODE_HEADS:
        return f"heads.{name}"
    return name


def is_legacy_state(keys: list[str]) -> bool:
    return any(k.split(".", 1)[0] in FLOW_PARTS + CODE_HEADS for k in keys)


def _code_head(section: Mapping) -> dict:
    out = {k: v for k, v in section.items() if k not in ("tokenizer", "build_config", "tokenizer_model")}
    tok = {"kind": "freq"}
    if "tokenizer" in section:
        tok["path"] = section["tokenizer"]
    if "build_config" in section:
        tok["build_config"] = section["build_config"]
    if "tokenizer_model" in section:
        tok["config"] = section["tokenizer_model"]
    return out | {"tokenizer": tok}


def _und(und: Mapping, notes: list[str]) -> dict:
    if not any(k in und for k in TOWER_KEYS):
        return dict(und)
    out = {k: v for k, v in und.items() if k not in TOWER_KEYS}
    tower = dict(out.pop("tower", None) or {})
    for k in TOWER_KEYS:
        if k not in und:
            continue
        v = und[k]
        if k in ("mean", "std") and not isinstance(v, list | tuple):
            v = [v]
        if k == "in_channels":
            if und.get("kind") == "hf_siglip":
                tower["channels"] = v
            continue  # open_clip towers are RGB; the field was never read
        tower["arch" if k == "open_clip_arch" else k] = v
    notes.append("model.und.<tower fields> -> model.und.tower.*")
    return out | {"tower": tower}


def migrate_model(section: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """A (possibly partial) format-1 ``model`` section -> format 2, and notes of what moved."""
    d, notes = copy.deepcopy(dict(section)), []
    heads = d.get("heads")
    if isinstance(heads, list | tuple):
        # a list named exactly the heads to build: the others are dropped explicitly (null)
        heads = {h: {} for h in heads} | {h: None for h in OLD_HEADS if h not in heads}
        notes.append("model.heads: [names] -> model.heads: {name: {...}}")
    heads = dict(heads or {})
    flow: dict = {}
    moves = (("flow", ""), ("gen", "codec"), ("autoencoder", "autoencoder"), ("flow_loss_weight", "loss_weight"))
    for old, new in moves:
        if old not in d:
            continue
        value = d.pop(old)
        if old == "autoencoder" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k != "scaling_factor"}  # never read; the VAE's own is used
        flow.update({new: value} if new else value)
        notes.append(f"model.{old} -> model.heads.flow" + (f".{new}" if new else ""))
    if flow and heads.get("flow", {}) is not None:
        heads["flow"] = _merge(heads.get("flow") or {}, flow)
    for name in CODE_HEADS:
        if name in d:
            section = _code_head(d.pop(name))
            notes.append(f"model.{name} -> model.heads.{name}")
            if heads.get(name, {}) is not None:  # not dropped by a list of heads
                heads[name] = _merge(heads.get(name) or {}, section)
    if heads or notes:
        d["heads"] = heads
    if isinstance(d.get("und"), Mapping):
        d["und"] = _und(d["und"], notes)
    return d, notes


def migrate_prefixes(prefixes: list[str]) -> list[str]:
    return [legacy_key(p) for p in prefixes]


def _merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
