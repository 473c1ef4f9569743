"""Tiny random published architectures, built with transformers' own config classes and saved with
``save_pretrained`` (the offline stand-ins of Janus-Pro and LLaVA-1.5 checkpoints), with small word-level
tokenizers that hold each model's special tokens; and a JanusFlow-format folder (its config and key names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

WORDS = ["what", "digit", "is", "this", "?", "draw", "the", "a", "red", "cat", "blue", "dog", "on", "mat", "USER",
         "ASSISTANT", ":", "<|", "User", "|>:", "Assistant", *"0123456789"]  # fmt: skip


def word_tokenizer(specials: dict[str, str], extra: list[str], **named):
    """A word-level fast tokenizer: ``specials`` (bos/eos/pad/unk -> text) first, then ``extra`` special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = [specials["unk"], specials["bos"], specials["eos"], specials["pad"], *extra, *WORDS]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(dict.fromkeys(tokens))}, unk_token=specials["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = specials["bos"]  # like LLaMA's tokenizers: <bos> before a text when special tokens are added
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokens.index(bos))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials["bos"], eos_token=specials["eos"], pad_token=specials["pad"],
        unk_token=specials["unk"], extra_special_tokens=named or None,
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


JANUS_SPECIALS = {
    "unk": "<unk>",
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "pad": "<｜▁pad▁｜>",
}


def janus_tokenizer():
    extra = ["<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
    return word_tokenizer(JANUS_SPECIALS, extra, image_token=extra[0], boi_token=extra[1], eoi_token=extra[2])


def tiny_janus(folder: Path, seed: int = 0, tie: bool = False) -> Path:
    """A random ``JanusForConditionalGeneration`` (32 px understanding images, 4x4 VQ grid of 16 px images)."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor

    tok = janus_tokenizer()
    torch.manual_seed(seed)
    text = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    vision = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                  projection_dim=32, depth=2, mlp_ratio=2.0, num_image_tokens=16)  # fmt: skip
    vq = dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2],
              num_res_blocks=1, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=2)  # fmt: skip
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=tie,
                         image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))  # fmt: skip
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():  # random everywhere: zero-initialised parts would hide a wrong mapping
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = model.generation_config  # what Janus's released generation_config.json holds
    g.bos_token_id, g.pad_token_id, g.eos_token_id = tok.bos_token_id, tok.pad_token_id, tok.eos_token_id
    g.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    g._from_model_config = False  # a file of its own, not re-derived from the model config on load
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    JanusImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        str(folder)
    )
    return folder


LLAVA_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def llava_tokenizer():
    return word_tokenizer(LLAVA_SPECIALS, ["<image>"], image_token="<image>")


def tiny_llava(folder: Path, seed: int = 0, vocab_size: int = 80) -> Path:
    """A random ``LlavaForConditionalGeneration``: a CLIP ViT (32 px, patch 8: 16 patch tokens + CLS), features
    from the second-to-last layer with CLS dropped, a 2-layer GELU projector, a LLaMA."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    tok = llava_tokenizer()
    torch.manual_seed(seed)
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                rms_norm_eps=1e-5)  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=16)  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def tiny_janusflow(folder: Path) -> tuple[Path, dict]:
    """A JanusFlow-format folder (their config and key names) of a small random model, and a tiny VAE."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from mm.convert.common import rename
    from mm.convert.janusflow import RULES, model_config
    from mm.model.unified import UnifiedModel
    from mm.sequence import load_vocab

    config = json.loads((DATA / "janusflow_1.3b_config.json").read_text())
    config["vision_und_enc_config"]["params"].update(image_size=32, select_layer=1)
    config["language_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, vocab_size=64)  # fmt: skip
    for part in ("vision_gen_enc_config", "vision_gen_dec_config"):
        config[part]["params"].update(block_out_channels=[32], hidden_size=64, layers_in_middle=1)
    config["vision_gen_dec_config"]["params"]["in_channels"] = 32
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 32],
                        layers_per_block=1, norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2)  # fmt: skip
    vae.save_pretrained(str(folder / "vae"))
    lc = {k: v for k, v in config["language_config"].items() if k not in ("model_type", "torch_dtype")}
    cfg = model_config(config, LlamaConfig(**lc), 16, [0.5] * 3, [0.5] * 3, dict(vae.config))
    cfg.llm.tokenizer = "configs/tokenizers/digits"
    torch.manual_seed(0)
    model = UnifiedModel(cfg, load_vocab(ROOT / "configs" / "tokenizers" / "digits"))
    with torch.no_grad():  # timm's weight_init="skip" leaves pos_embed as it was allocated (possibly not finite)
        model.und.tower.vision_tower.pos_embed.normal_(0, 0.02)
    theirs = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.flow.autoencoder.")}
    theirs = {k: v + 0.01 * torch.randn_like(v) for k, v in rename(theirs, RULES, reverse=True).items()}
    src = folder / "janusflow"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(config))
    model.vocab.tokenizer.save_pretrained(str(src))
    return src, theirs
