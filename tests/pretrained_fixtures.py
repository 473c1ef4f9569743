"""Library-saved stand-ins of the pretrained parts a real run loads (nothing downloaded): a Qwen2 LLM with a
byte-level BPE tokenizer and Qwen2's chat template, a LLaMA-style tokenizer without one, a ``SiglipVisionModel``
and a diffusers ``AutoencoderKL``. Each is built from its library's own config class and written with
``save_pretrained``, so our code reads them as it reads the published folders. Widths are tiny; the grids are
the published ones (SigLIP-L/16 at 384 px: 24x24 patches; SDXL-VAE: 8x downsampling, 4 latent channels)."""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen2-Instruct's chat template (the default system prompt when none is given), as its tokenizer_config.json holds it
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    "what digit is this ?", "draw the digit 0", "draw the digit 1", "draw the digit 2", "draw the digit 3",
    "draw the digit 4", "draw the digit 5", "draw the digit 6", "draw the digit 7", "draw the digit 8",
    "draw the digit 9", "0 1 2 3 4 5 6 7 8 9", "You are a helpful assistant.", "system user assistant",
    "a red cat on the mat", "what is the cat on ?", "yes no",
]  # fmt: skip


def bpe_tokenizer(specials: list[str], **named):
    """A byte-level BPE fast tokenizer trained on a few lines (as Qwen2's and LLaMA-3's are byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def qwen2_tokenizer():
    """Qwen2-Instruct's special tokens: no bos, eos <|im_end|>, pad <|endoftext|>; its chat template."""
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                        pad_token="<|endoftext|>")  # fmt: skip
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    return tok


def llama_tokenizer():
    """LLaMA's special tokens (bos <s>, eos </s>, unk <unk>, no pad) and no chat template (a base model)."""
    return bpe_tokenizer(["<unk>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """A random ``Qwen2ForCausalLM`` (64 wide, 8 layers, GQA, tied embeddings, rms_norm_eps 1e-5) and its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen2_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok) + 16, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=1000000.0,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def tiny_siglip(folder: Path, image_size: int = 384, patch_size: int = 16, seed: int = 0) -> Path:
    """A random ``SiglipVisionModel`` at SigLIP-L/16@384's grid (24x24 patches), 32 wide."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(str(folder))
    return folder


def tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A random diffusers ``AutoencoderKL`` with SDXL-VAE's 8x downsampling and 4 latent channels, 8 wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8, 8],
                        layers_per_block=1, norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.13025)  # fmt: skip
    vae.save_pretrained(str(folder))
    return folder


def stand_ins(root: Path) -> dict[str, Path]:
    """The folders a real run names, under ``root``: the LLM (with its tokenizer), the SigLIP tower, the VAE."""
    return {
        "llm": tiny_qwen2(root / "Qwen2.5-1.5B-Instruct"),
        "siglip": tiny_siglip(root / "siglip-large-patch16-384"),
        "vae": tiny_vae(root / "sdxl-vae"),
    }
