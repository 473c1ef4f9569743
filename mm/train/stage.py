"""Training stages without code: which parameters train, at which learning rate, and which frozen ones
must load weights.

``train.frozen`` freezes modules by name prefix, ``train.param_groups`` sets learning rates per prefix,
``train.init_from`` starts from the previous stage's checkpoint. A frozen module with no weights to
load (no local path in its config, no ``init_from``) is an error at start: it would train on top of a
random network.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm.config import TrainConfig
from mm.model.unified import UnifiedModel
from mm.schema import ConfigError
from mm.train.engine import ParamGroup

# Where the weights of a part that may be frozen come from, for the error message that asks for them.
WEIGHT_KEYS = {
    "und.tower": "model.und.tower.weights", "llm": "model.llm.pretrained",
    "heads.flow.autoencoder": "model.heads.flow.autoencoder.path",
}  # fmt: skip


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _part(name: str) -> str:
    """The module a parameter is reported under: ``und.tower``/``und.aligner``, ``heads.<name>.<part>``,
    else its top-level module."""
    parts = name.split(".")
    depth = {"und": 2, "heads": 3}.get(parts[0], 1)
    return ".".join(parts[:depth])


def pretrained_tower(model: UnifiedModel, t: TrainConfig, group_of) -> str:
    """Where a trainable pretrained tower's weights come from, when no param group names it; "" otherwise."""
    tower = [p for n, p in model.named_parameters() if _matches(n, "und.tower") and p.requires_grad]
    if not tower or any(group_of(n) >= 0 for n, p in model.named_parameters() if _matches(n, "und.tower")):
        return ""
    source = model.und.tower.pretrained_source()
    if source:
        return f"weights from {source[0]}={source[1]}"
    return f"weights from train.init_from={t.init_from}" if t.init_from else ""


@dataclass
class Stage:
    groups: list[ParamGroup]
    referenced: list[str]  # frozen parts whose weights come from a path or init_from (not saved)
    random_frozen: list[str]  # frozen parts with no weights (allowed only for benchmarks)
    report: str


def _groups(model: UnifiedModel, t: TrainConfig) -> tuple[list[ParamGroup], dict[str, set[float]], str]:
    """(optimizer groups, each part's learning rates, where a trainable pretrained tower comes from or "").

    Each trainable parameter goes to the group with the longest matching prefix of ``train.param_groups``, else
    a pretrained tower's own group (``train.pretrained_tower_lr`` > 0), else the default group."""

    def group_of(name: str) -> int:
        best, best_len = -1, -1
        for i, g in enumerate(t.param_groups):
            for prefix in g.modules:
                if _matches(name, prefix) and len(prefix) > best_len:
                    best, best_len = i, len(prefix)
        return best

    groups = [
        ParamGroup("+".join(g.modules), [], g.lr or t.lr, g.weight_decay if g.weight_decay >= 0 else t.weight_decay)
        for g in t.param_groups
    ] + [ParamGroup("default", [], t.lr, t.weight_decay)]
    tower_note = pretrained_tower(model, t, group_of)
    own_tower_group = bool(tower_note and t.pretrained_tower_lr)
    if own_tower_group:  # before the default one
        groups.insert(len(groups) - 1, ParamGroup("und.tower (pretrained)", [], t.pretrained_tower_lr, t.weight_decay))
    lr_of: dict[str, set[float]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            index = group_of(n)
            if index < 0 and own_tower_group and _matches(n, "und.tower"):
                index = -2
            groups[index].params.append(p)
            lr_of.setdefault(_part(n), set()).add(groups[index].lr)
    for i, g in enumerate(groups[: len(t.param_groups)]):
        if not g.params:
            raise ConfigError(f"train.param_groups[{i}] ({g.name}) holds only frozen parameters")
    return [g for g in groups if g.params], lr_of, tower_note


def apply_stage(model: UnifiedModel, t: TrainConfig, allow_random_frozen: bool = False) -> Stage:
    """Freeze ``train.frozen``, check frozen parts have weights, split the rest into ``train.param_groups``."""
    params = dict(model.named_parameters())
    sources = model.pretrained_sources()  # module prefix -> (config key, path) of parts loaded from a path
    for where, prefixes in [("train.frozen", t.frozen)] + [
        (f"train.param_groups[{i}].modules", g.modules) for i, g in enumerate(t.param_groups)
    ]:
        for prefix in prefixes:
            if not any(_matches(n, prefix) for n in params):
                parts = sorted({_part(n) for n in params})
                raise ConfigError(f"{where}: {prefix!r} names no parameter of the model; modules: {', '.join(parts)}")
    for n, p in params.items():
        if any(_matches(n, f) for f in t.frozen):
            p.requires_grad_(False)

    def source(name: str) -> str | None:
        for prefix, (key, _) in sources.items():
            if _matches(name, prefix):
                return key
        return "train.init_from" if t.init_from else None

    frozen = [n for n, p in params.items() if not p.requires_grad]
    random_frozen = sorted({_part(n) for n in frozen if source(n) is None})
    if random_frozen and not allow_random_frozen:
        what = []
        for part in random_frozen:
            n_params = sum(p.numel() for n, p in params.items() if _part(n) == part and not p.requires_grad)
            fix = [WEIGHT_KEYS[k] for k in WEIGHT_KEYS if _matches(part, k) or _matches(k, part)]
            fix += ["model.und.freeze=false"] if part == "und.tower" else []
            user_froze = any(_matches(part, f) or _matches(f, part) for f in t.frozen)
            fix += ["remove it from train.frozen"] if user_froze else []
            what.append(f"{part} ({n_params / 1e6:.1f}M; {' or '.join(fix) or 'a local weights path'})")
        raise ConfigError(
            f"frozen modules without weights to load would keep their random init: {', '.join(what)}; "
            "train.init_from can supply any of them"
        )
    referenced = sorted({_part(n) for n in frozen if source(n) is not None})

    groups, lr_of, tower_note = _groups(model, t)

    lines = ["parameters (trainable / total):"]
    for part in sorted({_part(n) for n in params}, key=lambda s: list(dict.fromkeys(map(_part, params))).index(s)):
        members = [(n, p) for n, p in params.items() if _part(n) == part]
        total = sum(p.numel() for _, p in members)
        trainable = sum(p.numel() for _, p in members if p.requires_grad)
        note = f"lr {'/'.join(f'{x:.1e}' for x in sorted(lr_of[part]))}" if part in lr_of else "frozen"
        if part in referenced:
            note += f" (weights from {source(next(n for n, p in members if not p.requires_grad))})"
        elif part in random_frozen:
            note += " (RANDOM weights: benchmark only)"
        lines.append(f"  {part:<14} {trainable / 1e6:10.3f}M / {total / 1e6:10.3f}M  {note}")
    n_all = sum(p.numel() for p in params.values())
    n_train = sum(p.numel() for p in params.values() if p.requires_grad)
    lines.append(f"  {'total':<14} {n_train / 1e6:10.3f}M / {n_all / 1e6:10.3f}M")
    if tower_note:
        lr = t.pretrained_tower_lr or t.lr
        lines.append(f"the pretrained understanding tower ({tower_note}) fine-tunes at lr {lr:.1e} "
                     f"(train.pretrained_tower_lr; 0 = train.lr); model.und.freeze=true keeps it frozen")  # fmt: skip
    lines.append(model.vocab.describe())
    return Stage(groups, referenced, random_frozen, "\n".join(lines))
