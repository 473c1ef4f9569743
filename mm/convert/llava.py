"""transformers' LLaVA (``LlavaForConditionalGeneration``; LLaVA-1.5: CLIP ViT-L/336, features of the
second-to-last layer with CLS dropped, a 2-layer GELU projector, a LLaMA) <-> our release, understanding only.

Ours: ``und`` = the CLIP vision model (``hf_clip`` tower reading the same layer) + the projector as our
2-layer aligner, ``llm`` = the LLM, no image head (``model.understanding_only``). The release keeps LLaVA's
``<image>`` token as ``image_token_id`` for the transformers-shaped forward.
"""

from __future__ import annotations

import copy
from pathlib import Path

from transformers import PreTrainedConfig

from mm.convert.common import (
    RESAMPLE_IDS,
    ConversionError,
    Rule,
    check_processor_size,
    clean_config,
    llm_fields,
    rename,
    resample_name,
    save_tensors,
    torch_dtype,
    write_release,
)
from mm.model.config import ModelConfig
from mm.model.towers import UndConfig

RULES = [
    Rule("model.vision_tower.", "und.tower.model."), Rule("model.multi_modal_projector.linear_1.", "und.aligner.0."),
    Rule("model.multi_modal_projector.linear_2.", "und.aligner.2."), Rule("model.language_model.", "llm.model."),
    Rule("lm_head.", "llm.lm_head."),
]  # fmt: skip


def model_config(
    config: PreTrainedConfig, mean: list[float], std: list[float], preprocess: dict | None = None
) -> ModelConfig:
    """Our model config of a ``LlavaConfig``; what our parts cannot express is refused, named."""
    v = config.vision_config
    problems = []
    if v.model_type != "clip_vision_model":
        problems.append(f"vision tower {v.model_type!r} (only CLIP's, LLaVA-1.5's)")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"several feature layers {config.vision_feature_layer}")
    if config.vision_feature_select_strategy not in ("default", "full"):
        problems.append(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        problems.append(f"a projector with {config.projector_hidden_act!r} or without bias (ours: GELU, bias)")
    if problems:
        raise ConversionError("this LLaVA does not map onto our parts: " + "; ".join(problems))
    tower = {"config": clean_config(v), "mean": mean, "std": std, "feature_layer": config.vision_feature_layer,
             "drop_cls": config.vision_feature_select_strategy == "default"}  # fmt: skip
    if preprocess:
        tower["preprocess"] = preprocess
    und = UndConfig(kind="hf_clip", tower=tower, aligner_layers=2)
    return ModelConfig(und=und, llm=llm_fields(config.text_config), heads={}, understanding_only=True)


def image_processor(src: Path, image_size: int) -> tuple[list[float], list[float], dict]:
    """(mean, std, the tower's ``preprocess`` section) of the source's image processor: ``LlavaImageProcessor``
    with ``do_pad`` (LLaVA-1.5's expand2square with the mean colour, then CLIP's) -> ``pad_crop``, a plain
    ``CLIPImageProcessor`` -> ``crop``; none -> LLaVA-1.5's own (``pad_crop``, CLIP's constants)."""
    from transformers import AutoImageProcessor, LlavaImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError):
        proc = LlavaImageProcessor(do_pad=True)
    where = f"{src}/preprocessor_config.json"
    size, crop = getattr(proc.size, "shortest_edge", None), proc.crop_size
    if not size or not proc.do_center_crop or crop is None or crop.height != crop.width:
        raise ConversionError(f"{where}: only shortest-edge resizing + a square centre crop (CLIP's) is known, got "
                              f"size={proc.size} crop_size={crop} do_center_crop={proc.do_center_crop}")  # fmt: skip
    check_processor_size(crop.height, image_size, where)
    check_processor_size(size, image_size, where)
    preprocess = {"mode": "pad_crop" if getattr(proc, "do_pad", False) else "crop",
                  "resample": resample_name(proc.resample, where), "backend": "torchvision"}  # fmt: skip
    return list(proc.image_mean), list(proc.image_std), preprocess


def import_hf_llava(src: Path, out: Path, dtype: str = "float32", final: Path | None = None, **_) -> Path:
    """``LlavaForConditionalGeneration`` folder -> a release folder of ours."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    src = Path(src)
    hf = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True, dtype=torch_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    c = hf.config
    text_config = copy.deepcopy(c.text_config)
    # tied or not as the loaded model is (LLaVA's config says it at the top level, its LLM's at its own)
    text_config.tie_word_embeddings = hf.lm_head.weight is hf.get_input_embeddings().weight
    cfg = model_config(c, *image_processor(src, c.vision_config.image_size))
    state = rename(hf.state_dict(), RULES)
    source = {"path": str(src), "format": "hf_llava", "class": type(hf).__name__}
    return write_release(Path(out), cfg, text_config, tok, state, source, image_token_id=c.image_token_id, final=final)


def refusal(model) -> str | None:
    """Why ``model`` (a UnifiedModel) has no transformers LLaVA form, or None."""
    cfg = model.cfg
    reasons = []
    if cfg.und.kind != "hf_clip":
        reasons.append(f"its understanding tower is {cfg.und.kind!r}, not CLIP's (hf_clip)")
    if cfg.und.aligner_layers != 2 or cfg.und.begin_embed:
        reasons.append("its aligner is not LLaVA's 2-layer projector")
    if cfg.heads:
        reasons.append(f"it has image heads {list(cfg.heads)}; LLaVA only answers in text")
    if cfg.mod.enabled:
        reasons.append("it routes tokens (p-MoD), which transformers' LLaVA cannot")
    if model.position_policy.enabled:
        reasons.append("it uses V2PE positions, which transformers' LLaVA cannot")
    p = model.und.preprocess
    if (p.mode not in ("crop", "pad_crop") or p.crop_offset != "floor"
            or p.mode == "pad_crop" and p.fill != tuple(int(m * 255) for m in model.und.tower.mean)):  # fmt: skip
        reasons.append(f"its image preprocessing ({p.mode}, crop_offset={p.crop_offset}, fill={p.fill}) is neither "
                       "CLIPImageProcessor's nor LlavaImageProcessor's")  # fmt: skip
    return "; ".join(reasons) or None


def export_hf_llava(model, out: Path, image_token_id: int | None = None) -> Path:
    """A UnifiedModel of LLaVA architecture -> a folder ``LlavaForConditionalGeneration.from_pretrained`` loads."""
    from transformers import LlavaConfig, LlavaImageProcessor, LlavaImageProcessorPil

    why = refusal(model)
    if why:
        raise ConversionError(f"not exportable as hf_llava: {why}; keep --format unified_mm")
    tower = model.und.tower
    text = model.llm.config
    config = LlavaConfig(
        text_config=text.to_dict(), vision_config=tower.model.config.to_dict(),
        image_token_id=image_token_id if image_token_id is not None else model.vocab.image,
        vision_feature_layer=tower.cfg.feature_layer,
        vision_feature_select_strategy="default" if tower.cfg.drop_cls else "full",
        projector_hidden_act="gelu", image_seq_length=tower.tokens_per_image,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )  # fmt: skip
    state = rename(dict(model.state_dict()), RULES, reverse=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_tensors(state, out)
    model.vocab.tokenizer.save_pretrained(str(out))
    p = model.und.preprocess  # pad_crop: LLaVA's do_pad; the torchvision or the PIL variant, as ours resizes
    cls = {"torchvision": LlavaImageProcessor, "pil": LlavaImageProcessorPil}[p.backend]
    cls(size={"shortest_edge": p.size}, crop_size={"height": p.size, "width": p.size}, do_pad=p.mode == "pad_crop",
        resample=RESAMPLE_IDS[p.resample], image_mean=list(tower.mean), image_std=list(tower.std),
        ).save_pretrained(str(out))  # fmt: skip
    return out
