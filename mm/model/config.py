"""The model's config: its parts' configs, each parsed and validated by the part's own class.

``heads`` maps image-head names (keys of ``mm.model.heads.IMAGE_HEADS``) to their configs; the first is
the default head; an empty ``heads`` means the default flow head. A YAML layer that derives from another may
drop an inherited head with ``name: null``. A model with no image head at all (LLaVA: understanding
only) says so with ``understanding_only: true`` and no heads. ``und.tower`` and each head's section are
plug-in sections: their schema is their part's ``Config`` class (see ``mm.schema.parse_part``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from mm.model.backbone import LLMConfig
from mm.model.heads import head_class
from mm.model.legacy import migrate_model
from mm.model.routing import MoDConfig
from mm.model.towers import UndConfig
from mm.positions import V2PEConfig
from mm.schema import ConfigError, merge_layers, parse_part

DEFAULT_HEAD = "flow"


@dataclass
class ModelConfig:
    und: UndConfig = field(default_factory=UndConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)
    v2pe: V2PEConfig = field(default_factory=V2PEConfig)
    heads: dict[str, Any] = field(default_factory=dict)  # image head -> its config; first = default; {} = flow
    understanding_only: bool = False  # no image head (heads must be empty): text out only, e.g. LLaVA
    text_loss_weight: float = 1.0

    # plug-in sections (dotted, from the model) -> the kind that selects their schema (mm.schema.merge_layers)
    PLUG_INS = {"und.tower": "und.kind", "heads": None}

    def __post_init__(self) -> None:
        heads = {name: c for name, c in dict(self.heads).items() if c is not None}
        if self.understanding_only and heads:
            raise ConfigError(f"model.understanding_only=true but model.heads names {sorted(heads)}; drop them "
                              f"(model.heads.<name>: null) or set model.understanding_only=false")  # fmt: skip
        if not heads and not self.understanding_only:
            heads = {DEFAULT_HEAD: {}}
        self.heads = {name: parse_part(head_class(name).Config, c, f"model.heads.{name}") for name, c in heads.items()}
        if self.text_loss_weight < 0:
            raise ConfigError("model.text_loss_weight must be >= 0")

    @property
    def default_head(self) -> str:
        if not self.heads:
            raise ConfigError("this model has no image head (model.understanding_only=true)")
        return next(iter(self.heads))

    def head_recipes(self) -> dict[str, dict]:
        """Each image head's default sampling recipe (``model.heads`` order: the first is the default)."""
        return {name: head_class(name).recipe(c) for name, c in self.heads.items()}


def model_config_from_dict(section: dict, source: str, legacy: bool = False) -> ModelConfig:
    """A saved ``model`` section -> a validated ModelConfig; ``legacy``: written in format 1 (names migrated)."""
    migrated = migrate_model(section)[0] if legacy else section
    return merge_layers(ModelConfig, [(source, OmegaConf.create(migrated))], ModelConfig.PLUG_INS)
