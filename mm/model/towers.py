"""Understanding encoders: a vision tower (registry of kinds) + an aligner into the LLM width.

A tower kind is an ``nn.Module`` class with a ``Config`` dataclass beside it, registered in
:data:`UND_TOWERS` by one line. The model config names the kind and gives the tower's own section::

    model:
      und: {kind: open_clip, tower: {image_size: 8, patch_size: 2, width: 64}, aligner_layers: 2}

A tower takes normalised pixels ``[N, channels, image_size, image_size]`` and returns patch tokens
``[N, tokens_per_image, width]``; it states its own size, channels, normalisation constants and preprocessing
(``preprocess``: how a picture becomes its input square, the reference processor's geometry by default), which
the data pipeline and the processor read from it (``UnderstandingEncoder.preprocess``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mm.images import ImagePreprocess, normalize, preprocess_problem
from mm.schema import ConfigError, parse_part, resolve_path


def _per_channel(values: tuple[float, ...], channels: int, key: str) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise ConfigError(f"{key}: {len(values)} values for {channels} channels (give 1 or {channels})")
    return tuple(values)


@dataclass
class PreprocessConfig:
    """How a picture becomes this tower's input square (``mm.images.preprocess``); each kind's default is its
    reference processor's: ``model.und.tower.preprocess.mode=crop`` etc. override it."""

    mode: str = "crop"  # pad (Janus) | crop (CLIP, open_clip) | pad_crop (LLaVA-1.5) | squash (SigLIP)
    resample: str = "bicubic"  # bicubic | bilinear
    backend: str = "torchvision"  # torchvision: transformers' default processors; pil: their *Pil variants, open_clip
    crop_offset: str = "floor"  # floor: transformers; round: torchvision's v1 CenterCrop (open_clip)
    min_size: int = 1  # pad: neither resized side below this (JanusImageProcessor: 14)
    resize_rounding: str = "round"  # pad: the shorter side round()ed (transformers' Janus) or int()ed (Janus's own)
    fill: tuple[int, ...] = ()  # pad colour 0-255, one value or one per channel; () = int(255 * mean), as transformers

    def __post_init__(self) -> None:
        problem = preprocess_problem(self.mode, self.resample, self.backend, self.crop_offset, self.min_size,
                                     self.resize_rounding)  # fmt: skip
        if problem is None and not all(0 <= v <= 255 for v in self.fill):
            problem = f"fill={tuple(self.fill)}: values in 0..255"
        if problem:
            raise ConfigError(f"model.und.tower.preprocess.{problem}")


def _preprocess(**kw: Any) -> Any:
    return field(default_factory=lambda: PreprocessConfig(**kw))


class Tower(nn.Module):
    """What every tower kind provides besides ``forward(pixels) -> [N, T, width]``."""

    Config: ClassVar[type]
    width: int
    image_size: int
    patch_size: int
    channels: int
    mean: tuple[float, ...]  # per channel, applied to [0,1] pixels
    std: tuple[float, ...]

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def pretrained_source(self) -> tuple[str, str] | None:
        """(config key, local path) of the weights this tower loaded, or None (random init)."""
        return None

    def preprocess_spec(self) -> ImagePreprocess:
        """The tower's preprocessing at its size and channels (its config's ``preprocess``; a plug-in tower
        without one: ``PreprocessConfig()``); fill defaults to the mean colour, as transformers pads."""
        p = getattr(getattr(self, "cfg", None), "preprocess", None) or PreprocessConfig()
        fill = tuple(p.fill) or tuple(int(m * 255) for m in self.mean)
        # a tower smaller than Janus's floor (tiny test towers) cannot hold it: the reference would exceed the size
        min_size = min(p.min_size, self.image_size)
        try:
            return ImagePreprocess(mode=p.mode, size=self.image_size, channels=self.channels, resample=p.resample,
                                   fill=fill * self.channels if len(fill) == 1 else fill, min_size=min_size,
                                   backend=p.backend, crop_offset=p.crop_offset,
                                   resize_rounding=p.resize_rounding)  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"model.und.tower.preprocess: {e}") from None


@dataclass
class OpenClipTowerConfig:
    """open_clip VisionTransformer: built from the shape fields, or a named ``arch`` with local ``weights``."""

    arch: str = ""  # a named open_clip architecture (weights from ``weights``); "" = the fields below
    weights: str = ""  # local open_clip checkpoint file; "" = random init
    image_size: int = 8
    patch_size: int = 2
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 2.0
    mean: tuple[float, ...] = (0.5,)  # one value, or one per RGB channel (CLIP's constants)
    std: tuple[float, ...] = (0.5,)
    # open_clip's eval transform: torchvision Resize (shorter side) + CenterCrop on PIL images
    preprocess: PreprocessConfig = _preprocess(mode="crop", backend="pil", crop_offset="round")

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.und.tower: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")  # fmt: skip
        self.mean, self.std = (
            _per_channel(self.mean, 3, "model.und.tower.mean"),
            _per_channel(self.std, 3, "model.und.tower.std"),
        )


class OpenClipTower(Tower):
    """open_clip VisionTransformer returning patch tokens (RGB; no tokenizer is touched, so no hub access)."""

    Config = OpenClipTowerConfig

    def __init__(self, cfg: OpenClipTowerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch:
            import open_clip  # heavy third-party import, only for named architectures

            weights = str(resolve_path(cfg.weights)) if cfg.weights else None
            if weights and not Path(weights).is_file():
                raise FileNotFoundError(f"model.und.tower.weights: no such file {weights}")
            model = open_clip.create_model(cfg.arch, pretrained=weights, load_weights=bool(weights))
            if not hasattr(model.visual, "transformer"):  # timm-backed towers (open_clip's SigLIP)
                raise ConfigError(
                    f"open_clip arch {cfg.arch!r} has no native VisionTransformer tower that returns "
                    "patch tokens; use model.und.kind=hf_siglip for SigLIP weights"
                )
            self.visual = model.visual
            check_open_clip_preprocess(cfg, getattr(model.visual, "preprocess_cfg", None) or {})
            self.visual.output_tokens = True
            self.image_size = self.visual.image_size[0]
            self.patch_size = self.visual.patch_size[0]
        else:
            from open_clip.transformer import VisionTransformer

            self.visual = VisionTransformer(
                image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.width, output_tokens=True,
            )  # fmt: skip
            if cfg.weights:
                state = torch.load(resolve_path(cfg.weights), map_location="cpu", weights_only=True)
                self.visual.load_state_dict(state)
            self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.width = self.visual.transformer.width
        self.channels, self.mean, self.std = 3, cfg.mean, cfg.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(pixels)
        return tokens

    def pretrained_source(self) -> tuple[str, str] | None:
        return ("model.und.tower.weights", self.cfg.weights) if self.cfg.weights else None


OPEN_CLIP_RESIZE_MODES = {"shortest": "crop", "squash": "squash"}  # open_clip's resize_mode -> ours


def check_open_clip_preprocess(cfg: OpenClipTowerConfig, ref: dict) -> None:
    """A named open_clip arch states its preprocessing (``preprocess_cfg``); the config must say the same."""
    mode = OPEN_CLIP_RESIZE_MODES.get(ref.get("resize_mode", "shortest"))
    if mode is None:
        raise ConfigError(f"open_clip arch {cfg.arch!r} resizes with resize_mode={ref['resize_mode']!r}, which model."
                          f"und.tower.preprocess cannot express (known: {sorted(OPEN_CLIP_RESIZE_MODES)})")  # fmt: skip
    want = {"preprocess.mode": mode, "preprocess.resample": ref.get("interpolation", "bicubic"),
            "mean": tuple(ref.get("mean", cfg.mean)), "std": tuple(ref.get("std", cfg.std))}  # fmt: skip
    have = {"preprocess.mode": cfg.preprocess.mode, "preprocess.resample": cfg.preprocess.resample,
            "mean": tuple(cfg.mean), "std": tuple(cfg.std)}  # fmt: skip
    for key, value in want.items():
        if have[key] != value:
            raise ConfigError(f"model.und.tower.{key}={have[key]} but open_clip arch {cfg.arch!r} preprocesses with "
                              f"{value}: set model.und.tower.{key}")  # fmt: skip


@dataclass
class HFSiglipTowerConfig:
    """transformers' SigLIP vision model: a local directory, or built from the shape fields.

    With ``weights`` the folder's ``config.json`` is the truth: unset shape fields (None) are read from it and a
    set one that contradicts it is a one-line error naming the key; without, unset fields take SIGLIP_DEFAULTS.
    """

    weights: str = ""  # local transformers directory; "" = built from the fields below
    image_size: int | None = None
    patch_size: int | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    channels: int | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    preprocess: PreprocessConfig = _preprocess(mode="squash")  # SiglipImageProcessor

    def __post_init__(self) -> None:
        folder = _siglip_folder_shapes(self.weights) if self.weights else None
        for key, default in SIGLIP_DEFAULTS.items():
            mine = getattr(self, key)
            if folder is None:  # no folder (or not there yet: building the tower says so)
                setattr(self, key, default if mine is None else mine)
            elif mine is None:
                setattr(self, key, folder[key])
            elif abs(float(mine) - float(folder[key])) > 1e-9:
                raise ConfigError(f"model.und.tower.{key}={mine} contradicts {self.weights}/config.json "
                                  f"({folder[key]}); the folder is the truth: drop model.und.tower.{key}")  # fmt: skip
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.und.tower: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")  # fmt: skip
        self.mean = _per_channel(self.mean, self.channels, "model.und.tower.mean")
        self.std = _per_channel(self.std, self.channels, "model.und.tower.std")


SIGLIP_DEFAULTS = {"image_size": 8, "patch_size": 2, "width": 64, "layers": 2, "heads": 2, "mlp_ratio": 2.0,
                   "channels": 3}  # fmt: skip


def _siglip_folder_shapes(weights: str) -> dict[str, Any] | None:
    """The shape fields a SigLIP folder states (a vision model's or a full SigLIP's config.json), or None."""
    path = resolve_path(weights)
    if not (path / "config.json").is_file():
        return None
    from transformers import SiglipVisionConfig  # the kind's own library, read only for this kind

    c = SiglipVisionConfig.from_pretrained(str(path), local_files_only=True)
    return {"image_size": c.image_size, "patch_size": c.patch_size, "width": c.hidden_size,
            "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
            "mlp_ratio": c.intermediate_size / c.hidden_size, "channels": c.num_channels}  # fmt: skip


class HFSiglipTower(Tower):
    Config = HFSiglipTowerConfig

    def __init__(self, cfg: HFSiglipTowerConfig):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.cfg = cfg
        if cfg.weights:
            path = resolve_path(cfg.weights)
            if not path.is_dir():
                raise FileNotFoundError(f"model.und.tower.weights: no such directory {path}")
            self.model = SiglipVisionModel.from_pretrained(str(path), local_files_only=True)
        else:
            hf = SiglipVisionConfig(
                image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                intermediate_size=int(cfg.width * cfg.mlp_ratio), num_channels=cfg.channels,
            )  # fmt: skip
            self.model = SiglipVisionModel(hf)
        c = self.model.config
        self.width, self.image_size, self.patch_size, self.channels = (
            c.hidden_size,
            c.image_size,
            c.patch_size,
            c.num_channels,
        )
        self.mean, self.std = _per_channel(cfg.mean, self.channels, "mean"), _per_channel(cfg.std, self.channels, "std")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state

    def pretrained_source(self) -> tuple[str, str] | None:
        return ("model.und.tower.weights", self.cfg.weights) if self.cfg.weights else None


@dataclass
class TimmViTTowerConfig:
    """timm's VisionTransformer as Janus and JanusFlow build SigLIP-L/16 (``siglip_large_patch16_384``):
    no class token, attention-pool head (kept, unused: their checkpoints hold it), final LayerNorm."""

    weights: str = ""  # a file of the ViT's state dict (safetensors or torch); "" = random init
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"  # "map": the attention-pool head exists (unused by the features); "" = none
    mean: tuple[float, ...] = (0.5,)  # Janus/JanusFlow normalise to [-1, 1]
    std: tuple[float, ...] = (0.5,)
    # Janus's and JanusFlow's own VLMImageProcessor: longer side (int()ed) on PIL, mean-colour pad, at least 14 px
    preprocess: PreprocessConfig = _preprocess(mode="pad", min_size=14, backend="pil", resize_rounding="floor")

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.und.tower: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")  # fmt: skip
        if self.global_pool not in ("map", ""):
            raise ConfigError(f"model.und.tower.global_pool={self.global_pool!r}; known: 'map', ''")
        self.mean = _per_channel(self.mean, 3, "model.und.tower.mean")
        self.std = _per_channel(self.std, 3, "model.und.tower.std")


class TimmViTTower(Tower):
    """Patch tokens after the final norm (``forward_features``); keys ``vision_tower.*`` as Janus's releases."""

    Config = TimmViTTowerConfig

    def __init__(self, cfg: TimmViTTowerConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer  # heavy third-party import, this kind only

        self.cfg = cfg
        self.vision_tower = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, class_token=False, global_pool=cfg.global_pool,
            num_classes=0,  # timm's own init: "skip" leaves pos_embed as torch.empty (garbage, NaN at times)
        )  # fmt: skip
        if cfg.weights:
            self.vision_tower.load_state_dict(_read_state_dict(cfg.weights, "model.und.tower.weights"))
        if self.vision_tower.attn_pool is not None:  # never on the feature path: frozen, so it gets no gradient
            self.vision_tower.attn_pool.requires_grad_(False)
        self.width, self.image_size, self.patch_size = cfg.width, cfg.image_size, cfg.patch_size
        self.channels, self.mean, self.std = 3, cfg.mean, cfg.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.forward_features(pixels)

    def pretrained_source(self) -> tuple[str, str] | None:
        return ("model.und.tower.weights", self.cfg.weights) if self.cfg.weights else None


def _read_state_dict(path: str, key: str) -> dict[str, torch.Tensor]:
    file = resolve_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{key}: no such file {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


@dataclass
class HFVisionTowerConfig:
    """A transformers vision model: a local directory (``weights``), or its transformers config (``config``)."""

    weights: str = ""  # local transformers directory
    config: dict = field(default_factory=dict)  # the model's transformers config (to_dict()), when no weights
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    preprocess: PreprocessConfig = _preprocess(mode="pad", min_size=14)  # JanusImageProcessor

    def __post_init__(self) -> None:
        if not self.weights and not self.config:
            raise ConfigError("model.und.tower: set weights (a local transformers directory) or config "
                              "(the vision model's transformers config)")  # fmt: skip
        self.mean = _per_channel(self.mean, 3, "model.und.tower.mean")
        self.std = _per_channel(self.std, 3, "model.und.tower.std")


class HFVisionTower(Tower):
    """A transformers vision model as a tower (``model``: its state-dict prefix); subclasses say which."""

    model_class: ClassVar[str]  # the transformers class name
    Config = HFVisionTowerConfig

    def __init__(self, cfg: HFVisionTowerConfig):
        super().__init__()
        import transformers  # the class is named by the kind

        cls = getattr(transformers, self.model_class)
        self.cfg = cfg
        if cfg.weights:
            path = resolve_path(cfg.weights)
            if not path.is_dir():
                raise FileNotFoundError(f"model.und.tower.weights: no such directory {path}")
            self.model = cls.from_pretrained(str(path), local_files_only=True)
        else:
            config = dict(cfg.config)
            config.pop("model_type", None)
            self.model = cls(cls.config_class(**config))
        c = self.model.config
        size = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
        patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        self.width, self.image_size, self.patch_size, self.channels = c.hidden_size, size, patch, c.num_channels
        self.mean, self.std = cfg.mean, cfg.std

    def pretrained_source(self) -> tuple[str, str] | None:
        return ("model.und.tower.weights", self.cfg.weights) if self.cfg.weights else None

    def release_config(self) -> HFVisionTowerConfig:
        """This tower's config in a release: the loaded model's own config, no path (its weights travel)."""
        return replace(self.cfg, weights="", config=self.model.config.to_dict())


class HFJanusVisionTower(HFVisionTower):
    """transformers' ``JanusVisionModel`` (Janus, Janus-Pro): every patch token after the post-layernorm."""

    model_class = "JanusVisionModel"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


@dataclass
class HFClipTowerConfig(HFVisionTowerConfig):
    """transformers' ``CLIPVisionModel`` as LLaVA reads it: a hidden layer's patch tokens, CLS dropped."""

    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's constants
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    preprocess: PreprocessConfig = _preprocess(mode="pad_crop")  # LLaVA-1.5: expand2square, then CLIP's
    feature_layer: int = -2  # index into hidden_states (0 = embeddings); LLaVA-1.5: the second to last layer
    drop_cls: bool = True  # LLaVA's "default" strategy; False = "full" (CLS kept)


class HFClipTower(HFVisionTower):
    model_class = "CLIPVisionModel"
    Config = HFClipTowerConfig

    def __init__(self, cfg: HFClipTowerConfig):
        super().__init__(cfg)
        n = self.model.config.num_hidden_layers
        layer = cfg.feature_layer % (n + 1)
        # Layers after the read one and the post-layernorm never reach the features: frozen, so no gradient is awaited
        vision = getattr(self.model, "vision_model", self.model)  # transformers < 5 nests the transformer
        for i, block in enumerate(vision.encoder.layers):
            if i >= layer:
                block.requires_grad_(False)
        vision.post_layernorm.requires_grad_(False)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (0 if self.cfg.drop_cls else 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.cfg.feature_layer]
        return h[:, 1:] if self.cfg.drop_cls else h


UND_TOWERS: dict[str, type[Tower]] = {
    "open_clip": OpenClipTower, "hf_siglip": HFSiglipTower, "timm_vit": TimmViTTower,
    "hf_janus_vision": HFJanusVisionTower, "hf_clip": HFClipTower,
}  # fmt: skip


@dataclass
class UndConfig:
    """The understanding encoder: a tower of a registered kind + an aligner into the LLM width."""

    kind: str = "open_clip"  # key of UND_TOWERS
    tower: Any = field(default_factory=dict)  # the kind's own config (UND_TOWERS[kind].Config)
    aligner_layers: int = 2  # 1 = Linear (JanusFlow), 2 = Linear-GELU-Linear (Janus, LLaVA)
    freeze: bool = False
    # JanusFlow's ``beg_of_und_embed``: a learned vector in place of the <begin_of_image> token before an image
    begin_embed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in UND_TOWERS:
            raise ConfigError(f"model.und.kind={self.kind!r}; known: {sorted(UND_TOWERS)}")
        self.tower = parse_part(UND_TOWERS[self.kind].Config, self.tower, "model.und.tower")
        if self.aligner_layers < 1:
            raise ConfigError("model.und.aligner_layers must be >= 1")


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with GELU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class UnderstandingEncoder(nn.Module):
    def __init__(self, cfg: UndConfig, llm_width: int):
        super().__init__()
        self.cfg = cfg
        self.tower: Tower = UND_TOWERS[cfg.kind](cfg.tower)
        self.preprocess = self.tower.preprocess_spec()  # what the loader and the processor make of a picture
        self.aligner = mlp([self.tower.width] + [llm_width] * cfg.aligner_layers)
        self.begin_embed = nn.Parameter(torch.zeros(1, llm_width)) if cfg.begin_embed else None
        if cfg.freeze:
            self.tower.requires_grad_(False)

    @property
    def tokens_per_image(self) -> int:
        return self.tower.tokens_per_image

    @property
    def image_size(self) -> int:
        return self.tower.image_size

    @property
    def channels(self) -> int:
        return self.tower.channels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as the reference processors normalise them (``mm.images.normalize``); [0,1] floats too.

        Constants made at each call, not buffers: a release loads on the meta device, where buffers that
        no checkpoint holds would stay empty."""
        return normalize(images, self.tower.mean, self.tower.std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Tower patch tokens of uint8 (preprocessed) or [0,1] images: [N, T, width] (REPA's targets)."""
        return self.tower(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (``self.preprocess``'s squares) or [0,1] images -> LLM-width tokens [N, T, D]."""
        return self.aligner(self.features(images))

    def place_begin(self, embeds: torch.Tensor, ids: torch.Tensor, begin_id: int, image_id: int) -> torch.Tensor:
        """With ``begin_embed``: the learned vector at every ``begin_id`` token directly followed by an image
        placeholder (an understanding image's opening token; a generated image's is followed by other slots)."""
        if self.begin_embed is None:
            return embeds
        opens = torch.zeros_like(ids, dtype=torch.bool)
        opens[:, :-1] = (ids[:, :-1] == begin_id) & (ids[:, 1:] == image_id)
        vec = self.begin_embed[0].to(embeds.dtype)
        # + 0 * vec.sum(): the parameter joins the graph on every step (ZeRO-3, DDP) even with no image
        return torch.where(opens.unsqueeze(-1), vec, embeds) + 0.0 * vec.sum()
