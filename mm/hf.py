"""The Hugging Face identity of the unified model: config, model, processor, Auto registration.

``import mm`` registers them, so a release folder loads with the Auto classes::

    import mm
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained("release/")          # UnifiedMMModel
    processor = AutoProcessor.from_pretrained("release/")  # tokenizer + the tower's image preprocessing
    model.answer(processor.und_images([img]), ["what digit is this ?"])
    model(input_ids=ids, pixel_values=processor(images=[img])["pixel_values"])  # transformers-shaped

* ``UnifiedMMConfig`` carries our ``ModelConfig`` as one sub-config per part (``und``, ``llm``,
  ``mod``, ``v2pe``, ``heads``, ... every dataclass field, listed in ``mm_parts``, so a field added
  later travels without changes here), the LLM's own ``transformers`` config as ``text_config``,
  and ``part_configs``: the configs of parts that were built from local weights (a diffusers VAE, a
  transformers vision tower), so ``from_pretrained`` needs no original weights directory. Releases
  written before image heads owned their parts (format 1) load through ``mm.model.legacy``.
* ``UnifiedMMModel`` holds a ``UnifiedModel`` built from that config; the UnifiedModel's
  parts are its own children, so the state-dict keys are the UnifiedModel's, unchanged. Its
  ``forward(input_ids=, pixel_values=, attention_mask=, labels=)`` is transformers-shaped (a
  ``CausalLMOutputWithPast`` with the LLM's logits) and text generation runs through transformers'
  ``generate``; ``forward(batch)`` (a packed ``mm.batch.Batch``) gives the training losses, and
  ``answer``/``generate_images`` are conveniences.
* ``UnifiedMMProcessor`` = tokenizer + the understanding tower's preprocessing (``mm.images.preprocess`` with
  the tower's spec: the function and spec the training loader uses) and normalisation constants, and the
  generation targets' preprocessing. ``processor(images=...)["pixel_values"]`` are normalised as a
  transformers image processor's (equal to the tower's reference processor's); ``und_images`` gives the
  uint8 squares before normalisation (what ``answer`` and the loader carry).

Weights are safetensors, configs JSON: no pickle anywhere in a release.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from mm.batch import Batch
from mm.images import ImagePreprocess, generation_preprocess, normalize, preprocess
from mm.kernels.attention import AttentionSpec
from mm.model.autoencoder import DiffusersKL
from mm.model.backbone import stated_fields
from mm.model.config import ModelConfig, model_config_from_dict
from mm.model.freq_tokenizer import FreqTokenizer
from mm.model.legacy import FORMAT, LEGACY_KEY_MAPPING, legacy_key
from mm.model.towers import HFSiglipTower
from mm.model.unified import UnifiedModel
from mm.schema import ConfigError, to_plain
from mm.sequence import TOKEN_TEXT, TOKEN_UND_IMAGE, Vocab, scatter_placeholders

MODEL_TYPE = "unified_mm"


class UnifiedMMConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        mm_parts: list[str] | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        part_configs: dict | None = None,
        mm_format: int = 1,
        image_token_id: int | None = None,
        **kwargs,
    ):
        # One attribute per ModelConfig field (``mm_parts`` lists them); the rest of kwargs is transformers'.
        self.mm_format = mm_format  # 1: written before image heads owned their parts (mm.model.legacy)
        # The token whose positions take understanding-image features in the transformers-shaped forward
        # (transformers' VLM convention); None = our <image_placeholder>. A converted LLaVA keeps its <image>.
        self.image_token_id = image_token_id
        self.mm_parts = list(mm_parts or [])
        for name in self.mm_parts:
            if name not in kwargs:
                raise ConfigError(f"{MODEL_TYPE} config lists part {name!r} but has no value for it")
            setattr(self, name, kwargs.pop(name))
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        parts = dict(part_configs or {})
        self.part_configs = {legacy_key(k): v for k, v in parts.items()} if mm_format < 2 else parts
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(
        cls, model_cfg: ModelConfig, text_config: PreTrainedConfig, part_configs: dict | None = None, **kwargs
    ) -> UnifiedMMConfig:
        parts = to_plain(model_cfg)
        # tie_word_embeddings is the LLM's own business (its text_config); ours must never tie anything
        kwargs.setdefault("tie_word_embeddings", False)
        return cls(mm_parts=[f.name for f in fields(ModelConfig)], text_config=text_config.to_dict(),
                   part_configs=part_configs, mm_format=FORMAT, **parts, **kwargs)  # fmt: skip

    def to_model_config(self) -> ModelConfig:
        try:
            parts = {name: getattr(self, name) for name in self.mm_parts}
            return model_config_from_dict(parts, "the release config", legacy=self.mm_format < 2)
        except ConfigError as e:
            raise ConfigError(f"release config does not match this version's ModelConfig: {e}") from None


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


def _loaded_parts(model: UnifiedModel) -> dict[str, torch.nn.Module]:
    """Sub-modules built from local weights by a library (transformers, diffusers), by state-dict prefix."""
    out: dict[str, torch.nn.Module] = {}
    if isinstance(model.und.tower, HFSiglipTower) and model.und.tower.cfg.weights:
        out["und.tower.model"] = model.und.tower.model
    for name, head in model.heads.items():
        ae = getattr(head, "autoencoder", None)
        if isinstance(ae, DiffusersKL) and ae.path:
            out[f"heads.{name}.autoencoder.vae"] = ae.vae
    return out


def describe_loaded_parts(model: UnifiedModel) -> dict:
    """Configs of the sub-modules that the model config builds from local paths (tower, VAE).

    In a release those paths are gone; the parts are rebuilt from these configs and
    their weights come from the release's safetensors.
    """
    out = {}
    for path, m in _loaded_parts(model).items():
        library = "diffusers" if type(m).__module__.startswith("diffusers") else "transformers"
        config = dict(m.config) if library == "diffusers" else m.config.to_dict()
        dtype = str(next(m.parameters()).dtype).removeprefix("torch.")
        out[path] = {"library": library, "class": type(m).__name__, "config": config, "dtype": dtype}
    return out


def release_model_config(model: UnifiedModel, model_cfg: ModelConfig) -> ModelConfig:
    """The model config of a release: no local paths, the loaded parts' true shapes, SDPA for inference.

    Paths are cleared because the weights they named are inside the release; the shape fields are
    what the UnifiedModel sizes its aligners and REPA projection from (a part loaded from a path
    ignores them); flash-attn varlen cannot take the padded, masked rows of inference, so a release
    says ``sdpa``.
    """
    cfg = copy.deepcopy(model_cfg)
    if hasattr(model.und.tower, "release_config"):  # a tower that records its loaded architecture itself
        cfg.und.tower = model.und.tower.release_config()
    tower = cfg.und.tower
    if isinstance(model.und.tower, HFSiglipTower) and tower.weights:
        t = model.und.tower.model.config
        tower.width, tower.layers, tower.heads = t.hidden_size, t.num_hidden_layers, t.num_attention_heads
        tower.mlp_ratio = t.intermediate_size / t.hidden_size
        tower.image_size, tower.patch_size, tower.channels = t.image_size, t.patch_size, t.num_channels
    if hasattr(tower, "weights"):
        tower.weights = ""
    for name, head_cfg in cfg.heads.items():
        if hasattr(head_cfg, "autoencoder"):
            head_cfg.autoencoder.path = ""
        tok = getattr(head_cfg, "tokenizer", None)
        if tok is not None and hasattr(tok, "build_config"):  # its weights are in the release, its shapes here
            tok.config = copy.deepcopy(model.heads[name].tokenizer.cfg)
            tok.path, tok.build_config = "", ""
    llm, llm_config = cfg.llm, model.llm.config
    llm.pretrained, llm.tokenizer = "", ""
    for key, value in stated_fields(llm_config).items():  # the loaded LLM's architecture, every field
        setattr(llm, key, value)
    llm.vocab_size = llm_config.vocab_size
    if llm.attn_implementation not in ("sdpa", "eager"):
        llm.attn_implementation = "sdpa"
    return cfg


def build_unified(config: UnifiedMMConfig, tokenizer):
    """A ``UnifiedModel`` of the release config; the LLM and path-loaded parts come from their saved configs."""
    from transformers import AutoModelForCausalLM

    model_cfg = config.to_model_config()
    unified = UnifiedModel(model_cfg, Vocab(tokenizer, generation=bool(model_cfg.heads)))
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


class UnifiedMMModel(PreTrainedModel, GenerationMixin):
    """A ``UnifiedModel`` with a transformers identity: ``from_pretrained``/``save_pretrained``, a
    transformers-shaped ``forward`` and ``generate`` for text."""

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader; a release written before image heads owned their parts (format 1) has its
        weight names mapped onto today's (``mm.model.legacy``)."""
        config = kwargs.get("config")
        if not isinstance(config, UnifiedMMConfig):
            config = UnifiedMMConfig.from_pretrained(pretrained_model_name_or_path, local_files_only=True)
        if config.mm_format < 2:
            kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def unified(self):
        """The wrapped ``UnifiedModel`` (same parameters): ``answer``, ``generate``, ``forward(batch)``."""
        return self._unified

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The UnifiedModel's parts initialise themselves when built (zero-init FiLM and velocity
        # layers included); transformers' generic init must not overwrite that. Derived buffers that
        # no checkpoint holds (a code tokenizer's band masks) are recomputed: from_pretrained built
        # them on the meta device.
        if isinstance(module, FreqTokenizer):
            module.init_derived_buffers()

    def train(self, mode: bool = True) -> UnifiedMMModel:
        super().train(mode)
        self._unified.training = mode
        return self

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._unified.llm.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self._unified.llm.get_output_embeddings()

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id if self.config.image_token_id is not None else self._unified.vocab.image

    @property
    def own_loop_only(self) -> bool:
        """p-MoD routing and V2PE positions exist only in our decoder loop: transformers' LLM forward and its
        caches (which hold every token of every layer at integer positions) cannot run such a model."""
        cfg = self._unified.cfg
        return cfg.mod.enabled or self._unified.position_policy.enabled

    def forward(
        self,
        input_ids: torch.Tensor | Batch | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | dict[str, torch.Tensor]:
        """transformers-shaped: token ids (understanding images at ``config.image_token_id``), ``pixel_values``
        normalised as our processor returns them (equal to the tower's reference processor's), a 0/1
        ``attention_mask`` (left padding) -> ``CausalLMOutputWithPast`` with the LLM's logits (and the shifted
        next-token loss with ``labels``, -100 ignored). Positions restart after left padding, as in :meth:`answer`.

        ``forward(batch)`` with a packed ``mm.batch.Batch``: the training losses (``UnifiedModel.forward``).
        """
        if isinstance(input_ids, Batch):
            return self._unified(input_ids)
        if inputs_embeds is not None and pixel_values is not None:
            raise ValueError("forward: pass pixel_values with input_ids, not with inputs_embeds")
        embeds = self._embed(input_ids, pixel_values) if inputs_embeds is None else inputs_embeds
        if position_ids is None and attention_mask is not None:  # counted over the whole (cached + new) mask
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]
        if self.own_loop_only:
            if cache is not None and use_cache is not False:
                raise ValueError("this model routes tokens (p-MoD) or uses V2PE positions: transformers' caches "
                                 "cannot hold it; call generate(use_cache=False) or answer()")  # fmt: skip
            if attention_mask is None:
                attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            return self._own_loop(input_ids, embeds, attention_mask, labels, logits_to_keep)
        return self._unified.llm(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep, **kwargs,
        )  # fmt: skip

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        u, image = self._unified, self.image_token_id
        embeds = u.embed_tokens(input_ids)
        mask = input_ids == image
        if pixel_values is None:
            if bool(mask.any()):
                raise ValueError(f"forward: {int(mask.sum())} image tokens (id {image}) but no pixel_values")
            return embeds
        want = (u.und.channels, u.und.image_size, u.und.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want or not pixel_values.is_floating_point():
            raise ValueError(f"forward: pixel_values must be normalised floats [N, {want[0]}, {want[1]}, {want[2]}] "
                             f"(the processor's), got {pixel_values.dtype} {tuple(pixel_values.shape)}")  # fmt: skip
        features = u.und.aligner(u.und.tower(pixel_values.to(embeds.device)))  # already normalised: no second pass
        embeds = u.und.place_begin(embeds, input_ids, u.vocab.boi, image)
        return scatter_placeholders(embeds, mask, features.flatten(0, 1), "understanding images")

    def _own_loop(self, input_ids, embeds, attention_mask, labels, logits_to_keep) -> CausalLMOutputWithPast:
        """Our decoder loop over whole sequences (p-MoD, V2PE): positions from the position policy per row."""
        u = self._unified
        keep = attention_mask.bool()
        sid = torch.where(keep, 0, -1)
        kinds = torch.full_like(sid, TOKEN_TEXT, dtype=torch.int8)
        if input_ids is not None:
            kinds = kinds.masked_fill(input_ids == self.image_token_id, TOKEN_UND_IMAGE)
        pos = torch.zeros(sid.shape, dtype=torch.float32, device=embeds.device)
        for b in range(len(sid)):  # inference only: a host read per row is fine
            row_kinds = kinds[b][keep[b]].tolist()
            pos[b, keep[b]] = u.position_policy.positions(row_kinds).to(pos.device)
        h = u.decode(embeds, pos, AttentionSpec.packed(sid), kinds).last_hidden_state
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = u.llm.get_output_embeddings()(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def generate(self, *args, **kwargs):
        """transformers' text generation (greedy by default: ``generation_config.json``); a p-MoD or V2PE
        model recomputes the sequence per token (``use_cache=False``): see :attr:`own_loop_only`."""
        if self.own_loop_only:
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)

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


def wrap(unified: UnifiedModel, model_cfg: ModelConfig) -> UnifiedMMModel:
    """A ``UnifiedMMModel`` around an existing ``UnifiedModel`` (shares its parameters), ready to save."""
    cfg = UnifiedMMConfig.from_model_config(
        release_model_config(unified, model_cfg), unified.llm.config, describe_loaded_parts(unified)
    )
    return UnifiedMMModel(cfg, unified=unified)


# Recipe keys that are sampler arguments of ``UnifiedModel.generate`` (the rest describe the recipe).
SAMPLER_KEYS = ("steps", "cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p", "plan_temperature")


def sampler_kwargs(recipe: dict) -> dict:
    """The ``generate`` arguments of a recipe: head and sampler settings."""
    out = {k: recipe[k] for k in SAMPLER_KEYS if k in recipe}
    if "head" in recipe:
        out["head"] = recipe["head"]
    return out


def generation_config(model_cfg: ModelConfig, vocab, max_new_tokens: int = 16):
    """``generation_config.json``: greedy text decoding, and the default image head with its recipe."""
    from transformers import GenerationConfig

    recipes = model_cfg.head_recipes()
    head = next(iter(recipes), None)  # None: understanding only
    return GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, bos_token_id=vocab.bos, eos_token_id=vocab.stop_ids,
        pad_token_id=vocab.pad, image_head=head, image_heads=recipes,
    )  # fmt: skip


# ---------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------


class UnifiedMMProcessor(ProcessorMixin):
    """Tokenizer + the understanding tower's image preprocessing and normalisation (+ generation targets').

    ``und_preprocess`` / ``gen_preprocess`` are ``mm.images.ImagePreprocess`` fields (JSON in
    ``processor_config.json``); the training loader calls the same :func:`mm.images.preprocess` with the same
    spec (``UnifiedModel.sample_shapes``). ``__call__`` returns transformers-style normalised ``pixel_values``
    (what ``UnifiedMMModel.forward(pixel_values=)`` takes); :meth:`und_images` the uint8 squares before
    normalisation (what ``answer`` takes and the model normalises itself).
    """

    tokenizer_class = "AutoTokenizer"
    LEGACY_KEYS = ("und_image_size", "und_channels", "gen_image_size", "gen_channels")  # processors saved before specs

    def __init__(
        self,
        tokenizer=None,
        und_preprocess: dict | None = None,
        und_mean: float | list[float] = 0.5,
        und_std: float | list[float] = 0.5,
        gen_preprocess: dict | None = None,
        **kwargs,
    ):
        legacy = {k: kwargs.pop(k) for k in self.LEGACY_KEYS if k in kwargs}
        if und_preprocess is None and legacy:  # their preprocessing: centre crop, bilinear (the closest spec)
            und_preprocess = {"mode": "crop", "size": legacy.get("und_image_size", 8), "resample": "bilinear",
                              "channels": legacy.get("und_channels", 3)}  # fmt: skip
            gen_preprocess = generation_preprocess(legacy.get("gen_image_size", 8), legacy.get("gen_channels", 1))
        channels = int((und_preprocess or {}).get("channels", 3))
        self.und_mean, self.und_std = _per_channel(und_mean, channels), _per_channel(und_std, channels)
        self.und_preprocess = _spec(und_preprocess or {}, self.und_mean).to_dict()
        self.gen_preprocess = None if gen_preprocess is None else _spec(gen_preprocess, None).to_dict()
        super().__init__(tokenizer, **kwargs)

    @classmethod
    def from_model(cls, model: UnifiedModel) -> UnifiedMMProcessor:
        """A built model's processor: its tower's preprocessing and normalisation; its default head's targets
        (none for an understanding-only model)."""
        u = model.und
        gen = None
        if model.heads:
            t = model.head().template
            gen = generation_preprocess(t.image_size, t.image_channels).to_dict()
        return cls(model.vocab.tokenizer, und_preprocess=u.preprocess.to_dict(), und_mean=list(u.tower.mean),
                   und_std=list(u.tower.std), gen_preprocess=gen)  # fmt: skip

    @property
    def und_spec(self) -> ImagePreprocess:
        return ImagePreprocess(**self.und_preprocess)

    def und_images(self, images: list[Any]) -> torch.Tensor:
        """Images (PIL, HxW(xC) arrays, [C,H,W] tensors; see ``mm.images.as_pil``) -> uint8 [N, C, S, S], the
        tensors the training loader makes of the same pictures (for ``answer``)."""
        spec = self.und_spec
        return torch.stack([preprocess(im, spec) for im in images])

    def gen_images(self, images: list[Any]) -> torch.Tensor:
        """Images -> uint8 [N, C, S, S] generation targets of the default image head (as the loader makes them)."""
        if self.gen_preprocess is None:
            raise ValueError("this processor's model has no image head (understanding only): no generation targets")
        spec = ImagePreprocess(**self.gen_preprocess)
        return torch.stack([preprocess(im, spec) for im in images])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, S, S] -> normalised float32 pixel_values (transformers' fused rescale+normalise)."""
        return normalize(images, tuple(self.und_mean), tuple(self.und_std))

    def __call__(self, images=None, text=None, **kwargs):
        from transformers import BatchFeature

        out = {}
        if images is not None:
            out["pixel_values"] = self.normalize(self.und_images(images if isinstance(images, list) else [images]))
        if text is not None:
            out.update(self.tokenizer(text, add_special_tokens=False, **kwargs))
        return BatchFeature(out)


def _per_channel(values: float | list[float], channels: int) -> list[float]:
    values = [float(values)] if isinstance(values, int | float) else [float(v) for v in values]
    return values * channels if len(values) == 1 else values


def _spec(fields: dict | ImagePreprocess, mean: list[float] | None) -> ImagePreprocess:
    """A spec from saved fields; a missing fill is the mean colour (transformers' pad)."""
    if isinstance(fields, ImagePreprocess):
        return fields
    fields = dict(fields)
    if "fill" not in fields:
        channels = fields.get("channels", 3)
        fields["fill"] = [int(m * 255) for m in mean] if mean else [0] * channels
    return ImagePreprocess(**fields)


# ---------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------


def register_auto_classes() -> None:
    """AutoConfig / AutoModel / AutoProcessor learn ``unified_mm`` (idempotent)."""
    from transformers import AutoModel, AutoProcessor

    AutoConfig.register(MODEL_TYPE, UnifiedMMConfig, exist_ok=True)
    AutoModel.register(UnifiedMMConfig, UnifiedMMModel, exist_ok=True)
    AutoProcessor.register(UnifiedMMConfig, UnifiedMMProcessor, exist_ok=True)
