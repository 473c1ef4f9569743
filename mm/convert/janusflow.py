"""JanusFlow-1.3B's released layout (``deepseek-ai/JanusFlow-1.3B``: ``config.json`` of ``multi_modality`` and
its safetensors) -> our release.

Theirs -> ours, one rename per part (every key once, equal shapes, checked):

    vision_und_enc_model.*         und.tower.*                  timm SigLIP-L/16 (``timm_vit`` tower)
    vision_und_enc_aligner.*       und.aligner.0.*              Linear 1024 -> 2048
    beg_of_und_embed               und.begin_embed              before each understanding image
    vision_gen_enc_model.*         heads.flow.gen_encoder.*     ShallowUViT encoder (``uvit`` codec)
    vision_gen_enc_aligner.*       heads.flow.gen_encoder_aligner.*
    vision_gen_dec_aligner_norm.*  heads.flow.gen_decoder_aligner_norm.*
    vision_gen_dec_aligner.*       heads.flow.gen_decoder_aligner.*
    vision_gen_dec_model.*         heads.flow.gen_decoder.*     ShallowUViT decoder
    language_model.*               llm.*                        LLaMA

The SDXL VAE is a separate published model (``--vae``: a local diffusers folder) and lands under
``heads.flow.autoencoder.vae``. Values the released files do not hold are ASSUMED below (the generated image
size: the reference demo's 48x48 latents, 384 px; the image normalisation when no preprocessor config is
present: 0.5/0.5, JanusFlow's VLMImageProcessor default). Images are preprocessed as that VLMImageProcessor
does (the ``timm_vit`` tower's default: pad, sizes int()ed, PIL bicubic, at least ``min_size`` px).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mm.convert.common import (
    ConversionError,
    Rule,
    check_processor_size,
    llm_fields,
    read_safetensors,
    rename,
    write_release,
)
from mm.model.autoencoder import SDXL_VAE, AutoencoderConfig
from mm.model.config import ModelConfig
from mm.model.gen_codec import GenCodecConfig
from mm.model.heads.flow import FlowHeadConfig
from mm.model.towers import UndConfig

RULES = [
    Rule("vision_und_enc_model.", "und.tower."), Rule("vision_und_enc_aligner.", "und.aligner.0."),
    Rule("beg_of_und_embed", "und.begin_embed"), Rule("vision_gen_enc_model.", "heads.flow.gen_encoder."),
    Rule("vision_gen_enc_aligner.", "heads.flow.gen_encoder_aligner."),
    Rule("vision_gen_dec_aligner_norm.", "heads.flow.gen_decoder_aligner_norm."),
    Rule("vision_gen_dec_aligner.", "heads.flow.gen_decoder_aligner."),
    Rule("vision_gen_dec_model.", "heads.flow.gen_decoder."), Rule("language_model.", "llm."),
]  # fmt: skip

# The SigLIP towers of the reference (its siglip_vit.py table): width, layers, heads, mlp_ratio, patch
SIGLIP = {"siglip_large_patch16_384": (1024, 24, 16, 4.0, 16), "siglip_large_patch16_256": (1024, 24, 16, 4.0, 16)}
GEN_IMAGE_SIZE = 384  # ASSUMED: the reference demo samples 4x48x48 SDXL latents
IMAGE_MEAN_STD = ([0.5] * 3, [0.5] * 3)  # ASSUMED without a preprocessor config: VLMImageProcessor's default


def _params(config: dict, part: str, cls: str) -> dict:
    section = config.get(part) or {}
    if section.get("cls") != cls:
        raise ConversionError(f"config.json {part}.cls={section.get('cls')!r}; JanusFlow's layout has {cls}")
    return dict(section.get("params") or {})


def tower_section(config: dict, mean: list[float], std: list[float], min_size: int = 14) -> dict:
    p = _params(config, "vision_und_enc_config", "CLIPVisionTower")
    name = p.get("model_name", "")
    if name not in SIGLIP or p.get("select_feature", "same") != "same":
        raise ConversionError(f"understanding tower {name!r} / select_feature {p.get('select_feature')!r}: "
                              f"known {sorted(SIGLIP)} with 'same'")  # fmt: skip
    width, layers, heads, mlp_ratio, patch = SIGLIP[name]
    select = int(p.get("select_layer", -1))  # the reference keeps the blocks up to this one
    depth = min(layers, layers + select + 1) if select <= 0 else min(layers, select)
    # the timm_vit kind's preprocessing is the reference's VLMImageProcessor (pad, int()ed sizes, PIL resize)
    return {"image_size": int(p.get("image_size", 384)), "patch_size": patch, "width": width, "layers": depth,
            "heads": heads, "mlp_ratio": mlp_ratio, "global_pool": "map", "mean": mean, "std": std,
            "preprocess": {"min_size": min_size}}  # fmt: skip


def codec_section(config: dict, llm_width: int, rms_eps: float) -> tuple[GenCodecConfig, int]:
    """(the uvit codec's config, latent channels) from the encoder/decoder params, cross-checked."""
    e = _params(config, "vision_gen_enc_config", "ShallowUViTEncoder")
    d = _params(config, "vision_gen_dec_config", "ShallowUViTDecoder")
    c, stride, kernel = e["block_out_channels"][-1], int(e.get("stride", 4)), int(e.get("kernel_size", 7))
    padding = e.get("padding")
    checks = {
        "encoder block_out_channels is one level": len(e["block_out_channels"]) == 1,
        "encoder padding = kernel_size - stride": padding is None or int(padding) == math.ceil(kernel - stride),
        "decoder in_channels = encoder channels": d.get("in_channels", 768) == c,
        "decoder block_out_channels = encoder's": d.get("block_out_channels", [768])[-1] == c,
        "decoder out_channels = encoder input_channels": d.get("out_channels", 3) == e.get("input_channels", 3),
        "2**upsamples = encoder stride": 2 ** int(d.get("upsamples", 2)) == stride,
        "hidden_size = the LLM width": e.get("hidden_size", 2048) == llm_width == d.get("hidden_size", 2048),
        "mid blocks and biases on": all(x.get("use_mid_block", True) and x.get("use_bias", True) for x in (e, d)),
        "equal norm_eps": e.get("norm_eps", 1e-6) == d.get("norm_eps", 1e-6),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ConversionError(f"JanusFlow generation config outside the released layout: {bad}")
    codec = GenCodecConfig(
        kind="uvit", channels=c, patch_size=stride, encoder_blocks=int(e.get("layers_in_middle", 2)),
        decoder_blocks=int(d.get("layers_in_middle", 2)), time_freq_dim=c, in_kernel=kernel,
        norm_eps=float(e.get("norm_eps", 1e-6)), aligner_norm_eps=rms_eps,
    )  # fmt: skip
    return codec, int(e.get("input_channels", 3))


def model_config(config: dict, text_config, gen_image_size: int, mean, std, vae_config: dict,
                 min_size: int = 14) -> ModelConfig:  # fmt: skip
    codec, latent = codec_section(config, text_config.hidden_size, float(text_config.rms_norm_eps))
    down = 2 ** (len(vae_config["block_out_channels"]) - 1)
    ae = AutoencoderConfig(kind="diffusers_kl", image_size=gen_image_size, image_channels=3,
                           latent_channels=latent, downsample=down)  # fmt: skip
    flow = FlowHeadConfig(autoencoder=ae, codec=codec, repa_weight=0.0)  # the release holds no REPA projector
    und = UndConfig(kind="timm_vit", tower=tower_section(config, mean, std, min_size), aligner_layers=1,
                    begin_embed=True)  # fmt: skip
    return ModelConfig(und=und, llm=llm_fields(text_config), heads={"flow": flow})


def read_vae(vae: str | None, random_vae: bool) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(VAE config, its tensors under our prefix, part_configs entry or None)."""
    from diffusers import AutoencoderKL

    if vae:
        model = AutoencoderKL.from_pretrained(str(vae), local_files_only=True)
        part = {"library": "diffusers", "class": "AutoencoderKL", "config": dict(model.config), "dtype": "float32"}
        config = dict(model.config)
    elif random_vae:
        model, part, config = AutoencoderKL(**SDXL_VAE), None, dict(SDXL_VAE)
    else:
        raise ConversionError(
            "JanusFlow generates through the SDXL VAE, which its release does not hold: pass --vae "
            "/path/to/sdxl-vae (a local diffusers folder), or --random-vae for shape tests"
        )
    state = {f"heads.flow.autoencoder.vae.{k}": v for k, v in model.state_dict().items()}
    return config, state, ({"heads.flow.autoencoder.vae": part} if part else None)


def import_janusflow(src: Path, out: Path, vae: str | None = None, random_vae: bool = False,
                     gen_image_size: int = GEN_IMAGE_SIZE, final: Path | None = None, **_) -> Path:  # fmt: skip
    """A JanusFlow release folder (``config.json``, safetensors, tokenizer) -> a release folder of ours."""
    from transformers import AutoTokenizer, LlamaConfig

    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "multi_modality":
        raise ConversionError(f"{src}/config.json has model_type {config.get('model_type')!r}, not multi_modality")
    lc = {k: v for k, v in (config.get("language_config") or {}).items() if k not in ("model_type", "torch_dtype")}
    text_config = LlamaConfig(**lc)
    (mean, std), min_size = IMAGE_MEAN_STD, 14
    pre = src / "preprocessor_config.json"
    if pre.is_file():  # VLMImageProcessor's: image_size, min_size, image_mean, image_std
        p = json.loads(pre.read_text())
        mean, std = list(p.get("image_mean", mean)), list(p.get("image_std", std))
        min_size = int(p.get("min_size", min_size))
        tower_size = int(_params(config, "vision_und_enc_config", "CLIPVisionTower").get("image_size", 384))
        check_processor_size(int(p.get("image_size", tower_size)), tower_size, str(pre))
    vae_config, vae_state, parts = read_vae(vae, random_vae)
    cfg = model_config(config, text_config, gen_image_size, mean, std, vae_config, min_size)
    # fp32 like every release of ours (the released file is bf16): the parts run in the precision they hold
    state = rename({k: v.float() for k, v in read_safetensors(src).items()}, RULES) | vae_state
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    source = {"path": str(src), "format": "janusflow", "vae": str(vae) if vae else "random (shape tests only)"}
    # a run rebuilds the VAE from its own folder (frozen, referenced by path), the release from part_configs
    local = {"heads.flow.autoencoder.path": str(vae)} if vae else {}
    return write_release(Path(out), cfg, text_config, tok, state, source, part_configs=parts, final=final,
                         local_paths=local)  # fmt: skip
