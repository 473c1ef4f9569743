"""Special tokens, chat/generation templates and loss masks, in one place.

Understanding sample (image + question -> answer)::

    <bos> <|user|> <begin_of_image> <image_placeholder>*N <end_of_image> question <|assistant|> answer <eos>

Generation sample (prompt -> image)::

    <bos> <|user|> prompt <|assistant|> <begin_of_generation> <gen_placeholder>*M

``<begin_of_generation>``'s slot carries the flow time embedding (JanusFlow's
time token); the M placeholders carry the generation encoder's latent tokens.
Targets are next-token ids at positions whose next token is part of the answer
(answer + <eos>); everything else is IGNORE. Tokenizers only ever load from a
local directory: nothing comes from a hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

IGNORE = -100

PAD = "<|pad|>"
UNK = "<|unk|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
BEGIN_OF_IMAGE = "<begin_of_image>"
END_OF_IMAGE = "<end_of_image>"
IMAGE_PLACEHOLDER = "<image_placeholder>"
BEGIN_OF_GENERATION = "<begin_of_generation>"
GEN_PLACEHOLDER = "<gen_placeholder>"
SPECIAL_TOKENS = [
    PAD, UNK, BOS, EOS, USER, ASSISTANT, BEGIN_OF_IMAGE, END_OF_IMAGE,
    IMAGE_PLACEHOLDER, BEGIN_OF_GENERATION, GEN_PLACEHOLDER,
]  # fmt: skip

TASK_UND = "understanding"
TASK_GEN = "generation"

# Per-token kinds: what a token carries. The position policy (V2PE) and
# mixture-of-depths routing select tokens by kind; the templates set them.
TOKEN_TEXT = 0
TOKEN_UND_IMAGE = 1  # understanding-encoder features
TOKEN_GEN_IMAGE = 2  # generation-head inputs (flow latents, band tokens)
TOKEN_KINDS = {"text": TOKEN_TEXT, "und_image": TOKEN_UND_IMAGE, "gen_image": TOKEN_GEN_IMAGE}


@dataclass
class Sample:
    """One training/eval example before packing."""

    input_ids: list[int]
    targets: list[int]  # next-token target per position, IGNORE where no loss
    task: str
    und_images: list[torch.Tensor] = field(default_factory=list)  # [C,H,W] in [0,1]
    gen_images: list[torch.Tensor] = field(default_factory=list)  # [C,H,W] in [0,1]
    prompt_mask: list[bool] = field(default_factory=list)  # prompt tokens (CFG dropout)
    key: str = ""
    token_kinds: list[int] = field(default_factory=list)  # TOKEN_* per token; [] = all text
    positions: torch.Tensor | None = None  # float32 per token (mm.model.positions); None = 0..n-1

    def __len__(self) -> int:
        return len(self.input_ids)

    def kinds(self) -> list[int]:
        return self.token_kinds or [TOKEN_TEXT] * len(self.input_ids)

    def position_ids(self) -> torch.Tensor:
        """The sample's float32 positions (the standard 0..n-1 unless a policy set them)."""
        if self.positions is None:
            return torch.arange(len(self.input_ids), dtype=torch.float32)
        if len(self.positions) != len(self.input_ids):
            raise ValueError(f"sample {self.key!r}: {len(self.positions)} positions for {len(self)} tokens")
        return self.positions


class Vocab:
    """Tokenizer plus the ids of the special tokens the templates use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing:  # a real LLM tokenizer: add ours; the caller resizes embeddings
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        self.tokenizer = tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.pad, self.bos, self.eos = ids[PAD], ids[BOS], ids[EOS]
        self.user, self.assistant = ids[USER], ids[ASSISTANT]
        self.boi, self.eoi, self.image = ids[BEGIN_OF_IMAGE], ids[END_OF_IMAGE], ids[IMAGE_PLACEHOLDER]
        self.bog, self.gen = ids[BEGIN_OF_GENERATION], ids[GEN_PLACEHOLDER]

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def load_vocab(path: str | Path) -> Vocab:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    return Vocab(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def build_word_tokenizer(texts: list[str], out_dir: str | Path) -> Vocab:
    """Train a word-level tokenizer on ``texts`` and save it (tiny configs only)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )  # fmt: skip
    fast.save_pretrained(str(out_dir))
    return Vocab(fast)


def understanding_sample(
    vocab: Vocab, image: torch.Tensor, n_image_tokens: int, question: str, answer: str | None, key: str = ""
) -> Sample:
    """Image + question -> answer. ``answer=None`` builds the inference prompt."""
    ids = [vocab.bos, vocab.user, vocab.boi] + [vocab.image] * n_image_tokens + [vocab.eoi]
    ids += vocab.encode(question) + [vocab.assistant]
    prompt_len = len(ids)
    if answer is not None:
        ids += vocab.encode(answer) + [vocab.eos]
    targets = [IGNORE] * len(ids)
    for i in range(prompt_len - 1, len(ids) - 1):  # logits at i predict token i+1
        targets[i] = ids[i + 1]
    kinds = [TOKEN_UND_IMAGE if t == vocab.image else TOKEN_TEXT for t in ids]
    return Sample(
        ids, targets, TASK_UND, und_images=[image], prompt_mask=[False] * len(ids), key=key, token_kinds=kinds
    )


def generation_sample(
    vocab: Vocab, image: torch.Tensor | None, n_gen_tokens: int, prompt: str, key: str = ""
) -> Sample:
    """Prompt -> image. ``image=None`` builds the inference prompt (images come from the sampler)."""
    text = vocab.encode(prompt)
    ids = [vocab.bos, vocab.user] + text + [vocab.assistant, vocab.bog] + [vocab.gen] * n_gen_tokens
    prompt_mask = [False, False] + [True] * len(text) + [False] * (2 + n_gen_tokens)
    gen_images = [image] if image is not None else []
    kinds = [TOKEN_GEN_IMAGE if t == vocab.gen else TOKEN_TEXT for t in ids]
    return Sample(
        ids, [IGNORE] * len(ids), TASK_GEN, gen_images=gen_images, prompt_mask=prompt_mask, key=key,
        token_kinds=kinds,
    )  # fmt: skip


def scatter_placeholders(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, what: str) -> torch.Tensor:
    """Write ``features`` ([n, D]) into the ``mask``ed rows of ``embeds`` ([..., D]).

    A count mismatch raises: truncating or padding image features silently
    shifts every later token of the pack onto the wrong image.
    """
    n_slots = int(mask.sum())
    n_feats = features.shape[0]
    if n_slots != n_feats:
        raise ValueError(f"{what}: {n_slots} placeholder tokens but {n_feats} feature vectors")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
