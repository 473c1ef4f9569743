"""Special tokens, chat/generation templates and loss masks, in one place.

Understanding sample (image + question -> answer)::

    <bos> <|user|> <begin_of_image> <image_placeholder>*N <end_of_image> question <|assistant|> answer <eos>

Generation sample (prompt -> image), in the layout its image head's :class:`ImageTemplate` gives::

    <bos> <|user|> prompt <|assistant|> <begin_of_generation> <gen_placeholder>*M [<end_of_image>]

(the flow head: ``<begin_of_generation>``'s slot carries the flow time embedding, JanusFlow's time
token, and the M placeholders the generation encoder's latent tokens; code heads open with
``<begin_of_image>`` and close the image).
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
TASK_TEXT = "text"  # text-only documents (LM loss on every token; the packer may split them across rows)

IMAGE_MARKER = "<image>"  # where an image goes in a conversation turn (LLaVA / InternVL convention)
ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"

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
    und_images: list[torch.Tensor] = field(default_factory=list)  # [C,H,W] uint8 (loader) or [0,1] float
    gen_images: list[torch.Tensor] = field(default_factory=list)  # [C,H,W] uint8 (loader) or [0,1] float
    prompt_mask: list[bool] = field(default_factory=list)  # prompt tokens (CFG dropout)
    key: str = ""
    token_kinds: list[int] = field(default_factory=list)  # TOKEN_* per token; [] = all text
    positions: torch.Tensor | None = None  # float32 per token (mm.model.positions); None = 0..n-1
    head: str = ""  # generation samples: the name of the image head that trains on it
    block_ids: list[int] = field(default_factory=list)  # per token, >= 0: a full attention block; [] = all causal

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


@dataclass(frozen=True)
class ImageTemplate:
    """How one image head lays out a generation sample (``mm.model.heads``); picklable, for loader workers.

    ``<bos> <|user|> prompt <|assistant|> begin <gen_placeholder>*sum(blocks) [<end_of_image>]``.
    ``blocks`` are the token counts of the image's successive blocks (NFIG: one per stage); with
    ``full_blocks`` the tokens of one block see each other (block-causal attention), else every
    image token is an ordinary causal token.
    """

    head: str
    image_size: int
    image_channels: int
    blocks: tuple[int, ...]
    full_blocks: bool = False
    begin: str = "bog"  # the Vocab attribute of the token that opens the image: bog | boi
    end: bool = False  # close the image with <end_of_image>

    @property
    def image_tokens(self) -> int:
        return sum(self.blocks)


def image_generation_sample(
    vocab: Vocab, template: ImageTemplate, image: torch.Tensor | None, prompt: str, key: str = ""
) -> Sample:
    """Prompt -> image in ``template``'s layout; ``image=None`` builds the inference sequence (slots unfilled)."""
    if template.begin not in ("bog", "boi"):
        raise ValueError(f"ImageTemplate.begin={template.begin!r}; known: bog, boi")
    begin = getattr(vocab, template.begin)
    t = template
    return _image_sample(vocab, t.head, t.blocks, t.full_blocks, begin, t.end, image, prompt, key)


def _image_sample(
    vocab: Vocab,
    head: str,
    blocks: tuple[int, ...],
    full_blocks: bool,
    begin: int,
    end: bool,
    image: torch.Tensor | None,
    prompt: str,
    key: str,
) -> Sample:
    text = vocab.encode(prompt)
    head_ids = [vocab.bos, vocab.user] + text + [vocab.assistant, begin]
    n = sum(blocks)
    tail = [vocab.eoi] if end else []
    ids = head_ids + [vocab.gen] * n + tail
    block_ids = [-1] * len(head_ids)
    for b, size in enumerate(blocks):
        block_ids += [b if full_blocks else -1] * size
    block_ids += [-1] * len(tail)
    prompt_mask = [False, False] + [True] * len(text) + [False] * (2 + n + len(tail))
    kinds = [TOKEN_GEN_IMAGE if t == vocab.gen else TOKEN_TEXT for t in ids]
    return Sample(
        ids, [IGNORE] * len(ids), TASK_GEN, gen_images=[image] if image is not None else [], prompt_mask=prompt_mask,
        key=key, token_kinds=kinds, head=head, block_ids=block_ids if full_blocks else [],
    )  # fmt: skip


class TemplateError(ValueError):
    """A conversation or document that no template can turn into a sample (bad data, not a bug)."""


def conversation_sample(
    vocab: Vocab, turns: list[tuple[str, str]], images: list[torch.Tensor], n_image_tokens: int, key: str = ""
) -> Sample:
    """Multi-turn chat with images -> one understanding sample, loss on every assistant turn.

    ``turns`` alternate ``(ROLE_USER, text)`` and ``(ROLE_ASSISTANT, text)``, starting with the
    user. User text holds one ``<image>`` marker per entry of ``images``, in order. Layout::

        <bos> (<user> text|<begin_of_image> <image_placeholder>*n <end_of_image> ... <assistant> answer <eos>)*

    Text around a marker is stripped: the image tokens already delimit it (so "<image>\nq" is
    exactly :func:`understanding_sample`'s prompt). A trailing user turn ends in ``<assistant>``
    with no answer: the inference prompt.
    """
    if not turns or turns[0][0] != ROLE_USER:
        raise TemplateError(f"conversation {key!r} must start with a user turn")
    ids, supervised = [vocab.bos], []  # supervised: [start, end) spans of answer tokens (eos included)
    n_markers = 0
    for i, (role, text) in enumerate(turns):
        expected = ROLE_USER if i % 2 == 0 else ROLE_ASSISTANT
        if role != expected:
            raise TemplateError(f"conversation {key!r}: turn {i} is {role!r}, expected {expected!r} (turns alternate)")
        if role == ROLE_ASSISTANT:
            if IMAGE_MARKER in text:
                raise TemplateError(f"conversation {key!r}: an image marker in assistant turn {i}")
            start = len(ids)
            ids += vocab.encode(text.strip()) + [vocab.eos]
            supervised.append((start, len(ids)))
            continue
        ids.append(vocab.user)
        for j, segment in enumerate(text.split(IMAGE_MARKER)):
            if j > 0:  # an image sits between two segments
                ids += [vocab.boi] + [vocab.image] * n_image_tokens + [vocab.eoi]
                n_markers += 1
            if segment.strip():
                ids += vocab.encode(segment.strip())
        ids.append(vocab.assistant)
    if n_markers != len(images):
        raise TemplateError(f"conversation {key!r} has {n_markers} image marker(s) for {len(images)} image(s)")
    targets = [IGNORE] * len(ids)
    for start, end in supervised:
        for i in range(start - 1, end - 1):  # logits at i predict token i+1
            targets[i] = ids[i + 1]
    kinds = [TOKEN_UND_IMAGE if t == vocab.image else TOKEN_TEXT for t in ids]
    return Sample(
        ids, targets, TASK_UND, und_images=list(images), prompt_mask=[False] * len(ids), key=key, token_kinds=kinds
    )


def text_document_samples(vocab: Vocab, text: str, max_tokens: int, key: str = "") -> list[Sample]:
    """A text-only document -> LM samples of at most ``max_tokens`` tokens (loss on every next token).

    ``<bos> text <eos>`` is cut into consecutive chunks, as LLM pretraining does; the last
    token of a chunk still predicts the first token of the next one.
    """
    body = vocab.encode(text.strip())
    if not body:
        raise TemplateError(f"document {key!r} has no tokens")
    ids = [vocab.bos] + body + [vocab.eos]
    targets = ids[1:] + [IGNORE]
    return [
        Sample(
            ids[a : a + max_tokens],
            targets[a : a + max_tokens],
            TASK_TEXT,
            prompt_mask=[False] * len(ids[a : a + max_tokens]),
            key=key if a == 0 else f"{key}#{a}",
            token_kinds=[TOKEN_TEXT] * len(ids[a : a + max_tokens]),
        )  # fmt: skip
        for a in range(0, len(ids), max_tokens)
    ]


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
