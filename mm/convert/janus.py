"""transformers' Janus (Janus, Janus-Pro: ``JanusForConditionalGeneration``) <-> our release.

Ours: ``und`` = the Janus vision model (``hf_janus_vision`` tower) + its aligner MLP, ``llm`` = the LLaMA LLM,
``heads.janus`` = the VQ tokenizer, generation embeddings, aligner and head (``mm/model/heads/janus.py``) with
Janus's prompt format and guidance. Keys are renamed by prefix only; every tensor is kept as is.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
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
from mm.model.heads.janus import JanusHeadConfig
from mm.model.image_tokenizers import ImageTokenizerConfig, JanusVQConfig
from mm.model.towers import UndConfig

# Janus's generation prompt (its "deepseek" conversation template with an empty system prompt); the
# <begin_of_image> token follows, <bos> precedes
PROMPT_FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:"
JANUS_TOKENS = ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")


def rules(aligner_depth: int) -> list[Rule]:
    """transformers' Janus keys <-> ours (the aligner's hidden layers sit at every other index of our MLP)."""
    out = [
        Rule("model.vision_model.", "und.tower.model."), Rule("model.aligner.fc1.", "und.aligner.0."),
        Rule("model.vqmodel.", "heads.janus.tokenizer.vq."),
        Rule("model.generation_embeddings.", "heads.janus.generation_embeddings."),
        Rule("model.generation_aligner.", "heads.janus.generation_aligner."),
        Rule("model.generation_head.", "heads.janus.generation_head."),
        Rule("model.language_model.", "llm.model."), Rule("lm_head.", "llm.lm_head."),
    ]  # fmt: skip
    out += [Rule(f"model.aligner.hidden_layers.{i}.", f"und.aligner.{2 * (i + 1)}.") for i in range(aligner_depth - 1)]
    return out


def image_processor(src: Path, image_size: int) -> tuple[list[float], list[float], dict]:
    """(mean, std, the tower's ``preprocess`` section) of the source's image processor (its
    preprocessor_config.json), else ``JanusImageProcessor``'s defaults: resize the longer side, pad with the
    mean colour, at least ``min_size`` px (the torchvision backend, as ``AutoImageProcessor`` gives it)."""
    from transformers import AutoImageProcessor, JanusImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError):
        proc = JanusImageProcessor()
    where = f"{src}/preprocessor_config.json"
    size = proc.size["height"] if isinstance(proc.size, dict) else proc.size.height
    check_processor_size(size, image_size, where)
    preprocess = {"mode": "pad", "resample": resample_name(proc.resample, where), "min_size": int(proc.min_size),
                  "backend": "torchvision", "resize_rounding": "round"}  # fmt: skip
    return list(proc.image_mean), list(proc.image_std), preprocess


def model_config(
    config: PreTrainedConfig, tokenizer, mean: list[float], std: list[float], preprocess: dict | None = None
) -> ModelConfig:
    """Our model config of a ``JanusConfig`` (shapes from its sub-configs; nothing typed by hand)."""
    v, vq = config.vision_config, config.vq_config
    if v.projection_dim != config.text_config.hidden_size:
        raise ConversionError(f"vision_config.projection_dim={v.projection_dim} != the LLM width "
                              f"{config.text_config.hidden_size}")  # fmt: skip
    head = JanusHeadConfig(
        tokenizer=ImageTokenizerConfig(kind="janus_vq", config=JanusVQConfig(hf_config=clean_config(vq))),
        prompt_format=PROMPT_FORMAT, bos_token=tokenizer.bos_token or "", pad_token=tokenizer.pad_token or "",
    )  # fmt: skip
    tower = {"config": clean_config(v), "mean": mean, "std": std} | ({"preprocess": preprocess} if preprocess else {})
    und = UndConfig(kind="hf_janus_vision", tower=tower, aligner_layers=v.depth)
    return ModelConfig(und=und, llm=llm_fields(config.text_config), heads={"janus": head})


def check_tokenizer(tokenizer, image_token_id: int) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in JANUS_TOKENS if t not in vocab]
    if missing:
        raise ConversionError(f"the tokenizer lacks Janus's tokens {missing}")
    if vocab["<image_placeholder>"] != image_token_id:
        raise ConversionError(f"<image_placeholder> is token {vocab['<image_placeholder>']} but the model's "
                              f"image_token_id is {image_token_id}")  # fmt: skip


def import_hf_janus(src: Path, out: Path, dtype: str = "float32", final: Path | None = None, **_) -> Path:
    """``JanusForConditionalGeneration`` folder -> a release folder of ours."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    src = Path(src)
    hf = JanusForConditionalGeneration.from_pretrained(str(src), local_files_only=True, dtype=torch_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    c = hf.config
    check_tokenizer(tok, c.image_token_id)
    text_config = copy.deepcopy(c.text_config)
    # tied or not as the loaded model is (Janus's config says it at the top level, its LLM's at its own)
    text_config.tie_word_embeddings = hf.lm_head.weight is hf.get_input_embeddings().weight
    state = rename(hf.state_dict(), rules(c.vision_config.depth))
    cfg = model_config(c, tok, *image_processor(src, c.vision_config.image_size))
    source = {"path": str(src), "format": "hf_janus", "class": type(hf).__name__}
    return write_release(Path(out), cfg, text_config, tok, state, source, final=final)


# ---------------------------------------------------------------------------------------------------------
# Ours -> transformers' Janus
# ---------------------------------------------------------------------------------------------------------


def refusal(model) -> str | None:
    """Why ``model`` (a UnifiedModel) has no transformers Janus form, or None."""
    cfg = model.cfg
    reasons = []
    if cfg.und.kind != "hf_janus_vision":
        reasons.append(f"its understanding tower is {cfg.und.kind!r}, not Janus's vision model (hf_janus_vision)")
    if cfg.und.begin_embed:
        reasons.append("it has a begin-of-image embedding (JanusFlow), which Janus lacks")
    if list(cfg.heads) != ["janus"]:
        reasons.append(f"its image heads are {list(cfg.heads)}, Janus has exactly one janus head")
    if cfg.mod.enabled:
        reasons.append("it routes tokens (p-MoD), which transformers' Janus cannot")
    if model.position_policy.enabled:
        reasons.append("it uses V2PE positions, which transformers' Janus cannot")
    if model.llm.config.model_type != "llama":
        reasons.append(f"its LLM is {model.llm.config.model_type}, transformers' Janus takes a LLaMA")
    p = model.und.preprocess
    if (p.mode, p.resize_rounding, p.fill) != ("pad", "round", tuple(int(m * 255) for m in model.und.tower.mean)):
        reasons.append(f"its image preprocessing ({p.mode}, resize_rounding={p.resize_rounding}, fill={p.fill}) is "
                       "not JanusImageProcessor's (pad, round, the mean colour)")  # fmt: skip
    return "; ".join(reasons) or None


def export_hf_janus(model, out: Path, image_token_id: int | None = None) -> Path:
    """A UnifiedModel of Janus architecture -> a folder ``JanusForConditionalGeneration.from_pretrained`` loads."""
    from transformers import (
        JanusConfig,
        JanusImageProcessor,
        JanusImageProcessorPil,
        JanusVisionConfig,
        JanusVQVAEConfig,
    )

    why = refusal(model)
    if why:
        raise ConversionError(f"not exportable as hf_janus: {why}; keep --format unified_mm")
    tower, head = model.und.tower, model.heads["janus"]
    vision = JanusVisionConfig(**{k: v for k, v in tower.model.config.to_dict().items() if k != "model_type"})
    vq = JanusVQVAEConfig(**{k: v for k, v in head.tokenizer.vq.config.to_dict().items() if k != "model_type"})
    text = model.llm.config
    config = JanusConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), vq_config=vq.to_dict(),
                         image_token_id=image_token_id if image_token_id is not None else model.vocab.image,
                         tie_word_embeddings=bool(text.tie_word_embeddings))  # fmt: skip
    state = rename({k: v for k, v in model.state_dict().items()}, rules(vision.depth), reverse=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_tensors(state, out)
    model.vocab.tokenizer.save_pretrained(str(out))
    p = model.und.preprocess  # the torchvision or the PIL variant, as our preprocessing resizes
    cls = JanusImageProcessor if p.backend == "torchvision" else JanusImageProcessorPil
    cls(size={"height": p.size, "width": p.size}, image_mean=list(tower.mean), image_std=list(tower.std),
        min_size=p.min_size, resample=RESAMPLE_IDS[p.resample]).save_pretrained(str(out))  # fmt: skip
    return out


def janus_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """[0,1] images -> the normalised pixel_values transformers' Janus takes (tests, parity)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images - m) / s
