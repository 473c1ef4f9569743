"""The Hugging Face identity of the unified model: config, model, processor, Auto registration.

``import mm`` registers them, so a release folder loads with the Auto classes::

    import mm
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained("release/")          # UnifiedMMModel
    processor = AutoProcessor.from_pretrained("release/")  # tokenizer + per-tower image preprocessing
    model.answer(processor.und_images([img]), ["what digit is this ?"])

* ``UnifiedMMConfig`` carries our ``ModelConfig`` as one sub-config per part (``und``,
  ``autoencoder``, ``gen``, ``llm``, ``flow``, ... every dataclass field, listed in
  ``mm_parts``, so a field added later travels without changes here), the LLM's own
  ``transformers`` config as ``text_config``, and ``part_configs``: the configs of
  parts that were built from local weights (a diffusers VAE, a transformers vision
  tower), so ``from_pretrained`` needs no original weights directory.
* ``UnifiedMMModel`` holds a ``UnifiedModel`` built from that config; the UnifiedModel's
  parts are its own children, so the state-dict keys are the UnifiedModel's, unchanged.
* ``UnifiedMMProcessor`` = tokenizer + image preprocessing of each tower (size,
  channels) and the understanding tower's normalisation constants.

Weights are safetensors, configs JSON: no pickle anywhere in a release.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, fields
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel, ProcessorMixin

from mm.config import ConfigError, ModelConfig

MODEL_TYPE = "unified_mm"


def _model_config_from_dict(parts: dict) -> ModelConfig:
    """Validate the parts against today's schema: a key this version does not know is an error."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), parts))
    except OmegaConfBaseException as e:
        raise ConfigError(f"release config does not match this version's ModelConfig: {e}") from None


class UnifiedMMConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        mm_parts: list[str] | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        part_configs: dict | None = None,
        **kwargs,
    ):
        # One attribute per ModelConfig field (``mm_parts`` lists them); the rest of kwargs is transformers'.
        self.mm_parts = list(mm_parts or [])
        for name in self.mm_parts:
            if name not in kwargs:
                raise ConfigError(f"{MODEL_TYPE} config lists part {name!r} but has no value for it")
            setattr(self, name, kwargs.pop(name))
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.part_configs = dict(part_configs or {})
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(
        cls, model_cfg: ModelConfig, text_config: PreTrainedConfig, part_configs: dict | None = None
    ) -> UnifiedMMConfig:
        parts = asdict(model_cfg)
        return cls(mm_parts=[f.name for f in fields(ModelConfig)], text_config=text_config.to_dict(),
                   part_configs=part_configs, **parts)  # fmt: skip

    def to_model_config(self) -> ModelConfig:
        return _model_config_from_dict({name: getattr(self, name) for name in self.mm_parts})


# ---------------------------------------------------------------------------------
# Parts built from local weights: saved as configs, rebuilt from them
# ---------------------------------------------------------------------------------


def _library_class(library: str, name: str):
    """A model class by its exported name in ``transformers`` or ``diffusers`` (what ``part_configs`` records)."""
    if library == "transformers":
        import transformers as lib
    elif library == "diffusers":
        import diffusers as lib
    else:
        raise ValueError(f"part config of unknown library {library!r}")
    cls = getattr(lib, name, None)
    if cls is None:
        raise ValueError(f"{library} has no class {name!r} (saved in part_configs)")
    return cls


def describe_loaded_parts(model: torch.nn.Module, model_cfg: ModelConfig) -> dict:
    """Configs of the sub-modules that the model config builds from local paths (tower, VAE).

    In a release those paths are gone; the parts are rebuilt from these configs and
    their weights come from the release's safetensors.
    """
    out = {}
    if model_cfg.und.weights and model_cfg.und.kind == "hf_siglip":
        m = model.und.tower.model
        out["und.tower.model"] = {"library": "transformers", "class": type(m).__name__, "config": m.config.to_dict()}
    if model_cfg.autoencoder.path and model_cfg.autoencoder.kind == "diffusers_kl":
        m = model.autoencoder.vae
        out["autoencoder.vae"] = {"library": "diffusers", "class": type(m).__name__, "config": dict(m.config)}
    for path, spec in out.items():
        spec["dtype"] = str(next(model.get_submodule(path).parameters()).dtype).removeprefix("torch.")
    return out


def release_model_config(model: torch.nn.Module, model_cfg: ModelConfig) -> ModelConfig:
    """The model config of a release: no local paths, the loaded parts' true shapes, SDPA for inference.

    Paths are cleared because the weights they named are inside the release; the shape
    fields are what the UnifiedModel sizes its aligners and REPA projection from (a part
    loaded from a path ignores them); flash-attn varlen cannot take the padded, masked
    rows of inference, so a release says ``sdpa``.
    """
    cfg = copy.deepcopy(model_cfg)
    llm_config = model.llm.config
    if cfg.und.weights and cfg.und.kind == "hf_siglip":
        t = model.und.tower.model.config
        cfg.und.width, cfg.und.layers, cfg.und.heads = t.hidden_size, t.num_hidden_layers, t.num_attention_heads
        cfg.und.mlp_ratio = t.intermediate_size / t.hidden_size
        cfg.und.image_size, cfg.und.patch_size, cfg.und.in_channels = t.image_size, t.patch_size, t.num_channels
    cfg.und.weights = ""
    cfg.autoencoder.path = ""
    for name in cfg.heads:  # code heads: the tokenizer's weights are in the release, its shapes in the config
        c = getattr(cfg, name, None)
        if hasattr(c, "tokenizer_model"):
            c.tokenizer_model = copy.deepcopy(model.heads[name].tokenizer.cfg)
            c.tokenizer, c.build_config = "", ""
    llm = cfg.llm
    llm.pretrained, llm.tokenizer = "", ""
    llm.model_type = llm_config.model_type
    llm.hidden_size = llm_config.hidden_size
    llm.num_layers = llm_config.num_hidden_layers
    llm.num_heads = llm_config.num_attention_heads
    llm.num_kv_heads = getattr(llm_config, "num_key_value_heads", None) or llm_config.num_attention_heads
    llm.intermediate_size = llm_config.intermediate_size
    llm.max_position_embeddings = llm_config.max_position_embeddings
    llm.vocab_size = llm_config.vocab_size
    if llm.attn_implementation not in ("sdpa", "eager"):
        llm.attn_implementation = "sdpa"
    return cfg


def build_unified(config: UnifiedMMConfig, tokenizer):
    """A ``UnifiedModel`` of the release config; the LLM and path-loaded parts come from their saved configs."""
    from transformers import AutoModelForCausalLM

    from mm.model.unified import UnifiedModel
    from mm.sequence import Vocab

    model_cfg = config.to_model_config()
    unified = UnifiedModel(model_cfg, Vocab(tokenizer))
    # Rebuilt from the saved transformers config: exact architecture (rope, norms, ties) without the
    # original weights directory. (An ``LLMConfig`` field taking an HF config would avoid the first build.)
    text_dtype = config.text_config.dtype if isinstance(config.text_config.dtype, torch.dtype) else None
    unified.llm = AutoModelForCausalLM.from_config(
        config.text_config, attn_implementation=model_cfg.llm.attn_implementation, dtype=text_dtype
    )
    for path, spec in config.part_configs.items():
        cls = _library_class(spec["library"], spec["class"])
        if spec["library"] == "diffusers":
            part = cls.from_config(spec["config"])
        else:
            part = cls(cls.config_class(**spec["config"]))
        parent, _, leaf = path.rpartition(".")
        part = part.to(getattr(torch, spec.get("dtype", "float32"))).requires_grad_(False).eval()
        owner = unified.get_submodule(parent)
        setattr(owner, leaf, part)
        if hasattr(owner, "scaling") and hasattr(part.config, "scaling_factor"):
            # DiffusersKL copies the VAE's latent scaling at construction: copy the rebuilt VAE's
            owner.scaling = float(part.config.scaling_factor)
    return unified


class UnifiedMMModel(PreTrainedModel):
    """A ``UnifiedModel`` with a transformers identity (``from_pretrained``/``save_pretrained``)."""

    config_class = UnifiedMMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: UnifiedMMConfig, tokenizer=None, unified=None):
        super().__init__(config)
        if unified is None:
            if tokenizer is None:  # from_pretrained sets name_or_path to the folder before building the model
                tokenizer = _load_tokenizer(config.name_or_path)
            unified = build_unified(config, tokenizer)
        # Register the UnifiedModel's parts as our own children: identical state-dict keys, shared modules.
        for name, child in unified.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_unified", unified)
        self.post_init()

    @property
    def unified(self):
        """The wrapped ``UnifiedModel`` (same parameters): ``answer``, ``generate``, ``forward(batch)``."""
        return self._unified

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The UnifiedModel's parts initialise themselves when built (zero-init FiLM and velocity
        # layers included); transformers' generic init must not overwrite that. Derived buffers that
        # no checkpoint holds (a code tokenizer's band masks) are recomputed: from_pretrained built
        # them on the meta device.
        from mm.model.freq_tokenizer import FreqTokenizer

        if isinstance(module, FreqTokenizer):
            module.init_derived_buffers()

    def train(self, mode: bool = True) -> UnifiedMMModel:
        super().train(mode)
        self._unified.training = mode
        return self

    def forward(self, **batch) -> dict[str, torch.Tensor]:
        """Training losses of a packed batch (``data/pack.py: collate`` keys), as ``UnifiedModel.forward``."""
        return self._unified(batch)

    def answer(self, images: torch.Tensor, questions: list[str], max_new_tokens: int = 8, on_token=None) -> list[str]:
        return self._unified.answer(images, questions, max_new_tokens=max_new_tokens, on_token=on_token)

    def generate_images(self, prompts: list[str], **kwargs) -> torch.Tensor:
        """Text -> [0,1] images (``UnifiedModel.generate``: head, generator and the head's sampler settings)."""
        return self._unified.generate(prompts, **kwargs)


def _load_tokenizer(folder: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    if not folder or not Path(folder).is_dir():
        raise ValueError(
            "UnifiedMMModel needs its tokenizer: load a release folder with from_pretrained, "
            "or pass tokenizer= when building from a config"
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def wrap(unified, model_cfg: ModelConfig) -> UnifiedMMModel:
    """A ``UnifiedMMModel`` around an existing ``UnifiedModel`` (shares its parameters), ready to save."""
    cfg = UnifiedMMConfig.from_model_config(
        release_model_config(unified, model_cfg), unified.llm.config, describe_loaded_parts(unified, model_cfg)
    )
    return UnifiedMMModel(cfg, unified=unified)


# Recipe keys that are sampler arguments of ``UnifiedModel.generate`` (the rest describe the recipe).
SAMPLER_KEYS = ("steps", "cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")


def image_head_recipes(model_cfg: ModelConfig) -> dict[str, dict]:
    """Sampling recipe of each image head the model carries (``model.heads`` order: the first is the default)."""
    from mm.model.heads import HEAD_RECIPES

    return {name: HEAD_RECIPES[name](model_cfg) for name in model_cfg.heads}


def sampler_kwargs(recipe: dict) -> dict:
    """The ``generate`` arguments of a recipe: head and sampler settings."""
    out = {k: recipe[k] for k in SAMPLER_KEYS if k in recipe}
    if "head" in recipe:
        out["head"] = recipe["head"]
    return out


def generation_config(model_cfg: ModelConfig, vocab, max_new_tokens: int = 16):
    """``generation_config.json``: greedy text decoding, and the default image head with its recipe."""
    from transformers import GenerationConfig

    recipes = image_head_recipes(model_cfg)
    head = next(iter(recipes))
    return GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, bos_token_id=vocab.bos, eos_token_id=vocab.eos,
        pad_token_id=vocab.pad, image_head=head, image_heads=recipes,
    )  # fmt: skip


# ---------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------


class UnifiedMMProcessor(ProcessorMixin):
    """Tokenizer + image preprocessing for each tower (centre crop, resize, channels; [0,1] floats).

    The understanding tower's mean/std are applied inside the model (``UnderstandingEncoder``),
    so preprocessed images stay in [0,1]; they are recorded here for other front-ends.
    """

    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        und_image_size: int = 8,
        und_channels: int = 3,
        und_mean: float = 0.5,
        und_std: float = 0.5,
        gen_image_size: int = 8,
        gen_channels: int = 1,
        **kwargs,
    ):
        self.und_image_size, self.und_channels = und_image_size, und_channels
        self.und_mean, self.und_std = und_mean, und_std
        self.gen_image_size, self.gen_channels = gen_image_size, gen_channels
        super().__init__(tokenizer, **kwargs)

    @classmethod
    def from_model_config(cls, model_cfg: ModelConfig, tokenizer) -> UnifiedMMProcessor:
        u, ae = model_cfg.und, model_cfg.autoencoder
        return cls(tokenizer, und_image_size=u.image_size, und_channels=u.in_channels, und_mean=u.mean,
                   und_std=u.std, gen_image_size=ae.image_size, gen_channels=ae.image_channels)  # fmt: skip

    def und_images(self, images: list[Any]) -> torch.Tensor:
        """Images (PIL, HxW(xC) uint8 arrays, or [C,H,W] tensors in [0,1]) -> [N, C, S, S] for ``answer``."""
        return torch.stack([fit(to_unit_tensor(im), self.und_image_size, self.und_channels) for im in images])

    def gen_images(self, images: list[Any]) -> torch.Tensor:
        """Images -> [N, C, S, S] at the generation size (training targets, REPA)."""
        return torch.stack([fit(to_unit_tensor(im), self.gen_image_size, self.gen_channels) for im in images])

    def __call__(self, images=None, text=None, **kwargs):
        from transformers import BatchFeature

        out = {}
        if images is not None:
            out["pixel_values"] = self.und_images(images if isinstance(images, list) else [images])
        if text is not None:
            out.update(self.tokenizer(text, add_special_tokens=False, **kwargs))
        return BatchFeature(out)


def to_unit_tensor(image: Any) -> torch.Tensor:
    """PIL image, uint8 array or [C,H,W] tensor -> [C,H,W] float in [0,1] (grey stays one channel)."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return t[None] if t.ndim == 2 else t
    if isinstance(image, Image.Image):
        mode = "L" if image.mode in ("L", "1", "I;16", "I") else "RGB"
        image = np.asarray(image.convert(mode))
    a = np.asarray(image)
    t = torch.from_numpy(a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def fit(image: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """The training pipeline's resize (``data.stream.fit_image``): centre crop, resize, channel conversion."""
    from data.stream import fit_image

    return fit_image(image, size, channels)


# ---------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------


def register_auto_classes() -> None:
    """AutoConfig / AutoModel / AutoProcessor learn ``unified_mm`` (idempotent)."""
    from transformers import AutoModel, AutoProcessor

    AutoConfig.register(MODEL_TYPE, UnifiedMMConfig, exist_ok=True)
    AutoModel.register(UnifiedMMConfig, UnifiedMMModel, exist_ok=True)
    AutoProcessor.register(UnifiedMMConfig, UnifiedMMProcessor, exist_ok=True)
