"""Special tokens, chat/generation templates and loss masks, in one place.

Understanding sample (image + question -> answer)::

    <bos> <|user|> <begin_of_image> <image_placeholder>*N <end_of_image> question <|assistant|> answer <eos>

Generation sample (prompt -> image), in the layout its image head's :class:`ImageTemplate` gives::

    <bos> <|user|> prompt <|assistant|> <begin_of_generation> <gen_placeholder>*M [<end_of_image>]

(the flow head: ``<begin_of_generation>``'s slot carries the flow time embedding, JanusFlow's time
token, and the M placeholders the generation encoder's latent tokens; code heads open with
``<begin_of_image>`` and close the image). A head with ``plan_tokens`` has the model write a plan first:
``... <|assistant|> plan <begin_of_generation> ...`` (:class:`ImageTemplate`).
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


# Which tokenizer attribute names each role's token where the tokenizer has one (transformers' conventions:
# the special tokens of an LLM; ``image_token``/``boi_token``/``eoi_token`` of multimodal tokenizers, e.g. Janus's)
OWN_TOKENS = {
    "bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "image": "image_token", "boi": "boi_token",
    "eoi": "eoi_token",
}  # fmt: skip
OURS = {
    "bos": BOS, "eos": EOS, "pad": PAD, "image": IMAGE_PLACEHOLDER, "boi": BEGIN_OF_IMAGE, "eoi": END_OF_IMAGE,
    "user": USER, "assistant": ASSISTANT, "bog": BEGIN_OF_GENERATION, "gen": GEN_PLACEHOLDER,
}  # fmt: skip
PROBE = "MMCHATPROBE{}X"  # stands for a message's content while a chat template is rendered


class Vocab:
    """Tokenizer plus the ids of the special tokens the templates use.

    The tokenizer's own tokens are used where it has them (bos, eos, pad; ``image_token``, ``boi_token``,
    ``eoi_token``) and so is its chat template (``tokenizer.chat_template``, rendered around each message's
    content); ours (:data:`OURS`) only where it lacks one: they are added as special tokens (the model then
    grows its embedding table) and :meth:`describe` says which. A tokenizer with no bos token gets none (Qwen2).
    ``generation=False`` (a model with no image head) adds no generation tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, generation: bool = True):
        self.tokenizer = tokenizer
        self.source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        self.chat_note = ""
        self.chat = self._usable_chat_template()
        roles = {k: getattr(tokenizer, attr, None) for k, attr in OWN_TOKENS.items()}
        roles["bos"] = roles["bos"] if roles["bos"] or not self._has(BOS) else BOS  # our tiny tokenizers name it
        need = ["eos", "pad", "image", "boi", "eoi"] + ([] if self.chat else ["user", "assistant"])
        need += ["bog", "gen"] if generation else []
        self.own = {k: v for k, v in roles.items() if v}
        tokens = {k: self.own.get(k) or OURS[k] for k in need} | ({"bos": self.own["bos"]} if "bos" in self.own else {})
        self.added = [t for k, t in tokens.items() if not self._has(t)]
        if self.added:
            tokenizer.add_special_tokens({"additional_special_tokens": self.added}, replace_extra_special_tokens=False)
        ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in tokens.items()}
        self.bos: int | None = ids.get("bos")
        self.pad, self.eos = ids["pad"], ids["eos"]
        self.user, self.assistant = ids.get("user"), ids.get("assistant")
        self.boi, self.eoi, self.image = ids["boi"], ids["eoi"], ids["image"]
        self.bog, self.gen = ids.get("bog"), ids.get("gen")
        self._turns: dict[tuple[int, bool], tuple[list[str], list[int]]] = {}
        self.stop_ids = sorted({self.eos} | set(self._turn_end_ids()))

    def _has(self, token: str) -> bool:
        return token in self.tokenizer.get_vocab()

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @property
    def prefix(self) -> list[int]:
        """What opens every sequence of our template: <bos>, or nothing for a tokenizer without one."""
        return [] if self.bos is None else [self.bos]

    def describe(self) -> str:
        """One line: whose tokens and template the sequences use (printed at start and by the converters)."""
        own = ", ".join(f"{k} {v}" for k, v in self.own.items())
        chat = "its own chat template" if self.chat else f"our chat template ({self.chat_note or 'it has none'})"
        added = f"added ours: {', '.join(self.added)}" if self.added else "nothing added"
        return f"tokenizer {self.source}: its own {own or 'no special tokens'}; {chat}; {added}"

    # ---- the tokenizer's chat template --------------------------------------------------------
    def _usable_chat_template(self) -> bool:
        """Whether the tokenizer's chat template renders string contents we can find again (append-only turns)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return False
        try:
            self.chat = True
            self._turns = {}
            self.turn_literals(2, generation_prompt=True)
            self.turn_literals(2, generation_prompt=False)
            return True
        except Exception as e:  # noqa: BLE001 - any template failure falls back to ours, said in describe()
            self.chat_note = f"its chat template cannot be used: {str(e).splitlines()[0][:120]}"
            return False

    def _render(self, n: int, generation_prompt: bool) -> str:
        roles = [ROLE_USER if i % 2 == 0 else ROLE_ASSISTANT for i in range(n)]
        messages = [{"role": r, "content": PROBE.format(i)} for i, r in enumerate(roles)]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def turn_literals(self, n: int, generation_prompt: bool) -> tuple[list[str], list[int]]:
        """The chat template's text around ``n`` alternating messages (user first): ``n + 1`` literals (before
        message 0, between messages, after the last) and, per assistant message, how many characters of the
        literal after it close its turn (supervised with the answer)."""
        key = (n, generation_prompt)
        if key not in self._turns:
            text = self._render(n, generation_prompt)
            literals, pos = [], 0
            for i in range(n):
                at = text.find(PROBE.format(i), pos)
                if at < 0 or text.count(PROBE.format(i)) != 1:
                    raise TemplateError(f"the chat template does not render message {i}'s content once, as given")
                literals.append(text[pos:at])
                pos = at + len(PROBE.format(i))
            literals.append(text[pos:])
            closes = []
            for i in range(1, n, 2):  # assistant messages: their turn ends where the conversation up to them ends
                upto = self._render(i + 1, False)
                end = len("".join(literals[: i + 1])) + sum(len(PROBE.format(j)) for j in range(i + 1))
                if not text.startswith(upto) or len(upto) < end:
                    raise TemplateError("the chat template rewrites earlier turns (a conversation is not its prefix)")
                closes.append(len(upto) - end)
            self._turns[key] = (literals, closes)
        return self._turns[key]

    def _turn_end_ids(self) -> list[int]:
        """The token that closes an assistant turn in the chat template (a stop token besides eos)."""
        if not self.chat:
            return []
        literals, closes = self.turn_literals(2, generation_prompt=False)
        ids = self.encode(literals[2][: closes[0]].strip())
        return ids[:1]


def load_vocab(path: str | Path, generation: bool = True) -> Vocab:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    return Vocab(AutoTokenizer.from_pretrained(str(path), local_files_only=True), generation)


def build_word_tokenizer(texts: list[str], out_dir: str | Path, lowercase: bool = True) -> Vocab:
    """Train a word-level tokenizer on ``texts`` and save it (tiny configs only); ``lowercase=False`` keeps case
    (option letters "A".."D" are then not the article "a")."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    if lowercase:
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
    if vocab.chat:  # the tokenizer's chat template: one conversation turn (what conversation_sample builds)
        turns = [(ROLE_USER, f"{IMAGE_MARKER}\n{question}")]
        turns += [(ROLE_ASSISTANT, answer)] if answer is not None else []
        return conversation_sample(vocab, turns, [image], n_image_tokens, key=key)
    ids = vocab.prefix + [vocab.user, vocab.boi] + [vocab.image] * n_image_tokens + [vocab.eoi]
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

    ``<bos> <|user|> prompt <|assistant|> begin <gen_placeholder>*sum(blocks) [<end_of_image>]``, or with the
    tokenizer's chat template ``<its user turn with the prompt> <its assistant opening> begin ...``, or with a
    head's own ``prompt_format`` (Janus: ``<bos> "<|User|>: {prompt}..." begin ...``, encoded as one string as the
    head's reference does; prompt dropout then pads everything between <bos> and begin, as its sampler's
    unconditional row). ``blocks`` are the token counts of the image's successive blocks (NFIG: one per stage);
    with ``full_blocks`` the tokens of one block see each other (block-causal attention), else every image
    token is an ordinary causal token.

    A *plan* is text the model writes before it draws (BAGEL's thinking before generating; here a layout):
    ``... prompt <|assistant|> plan begin <gen_placeholder>*...``. Its tokens, and the begin token after
    them, are next-token targets; they are part of the prompt for classifier-free guidance (dropped with
    it), so the guided velocity follows the plan. An empty plan teaches the model to draw at once.
    """

    head: str
    image_size: int
    image_channels: int
    blocks: tuple[int, ...]
    full_blocks: bool = False
    begin: str = "bog"  # the Vocab attribute of the token that opens the image: bog | boi
    end: bool = False  # close the image with <end_of_image>
    prompt_format: str = ""  # the head's own prompt text around "{prompt}"; "" = the vocab's chat layout
    bos_token: str = ""  # with prompt_format: the token before it ("" = the vocab's bos)
    plan_tokens: int = 0  # the most text tokens the model writes between the prompt and the image (0: none)

    @property
    def image_tokens(self) -> int:
        return sum(self.blocks)


def generation_prompt(vocab: Vocab, template: ImageTemplate, prompt: str) -> tuple[list[int], list[bool]]:
    """The ids before a generation sample's plan and begin token, and which of them are the prompt (CFG)."""
    if template.begin not in ("bog", "boi"):
        raise ValueError(f"ImageTemplate.begin={template.begin!r}; known: bog, boi")
    t = template
    if t.prompt_format:
        bos = vocab.tokenizer.convert_tokens_to_ids(t.bos_token) if t.bos_token else vocab.bos
        text = vocab.encode(t.prompt_format.format(prompt=prompt))
        first = [] if bos is None else [bos]
        return first + text, [False] * len(first) + [True] * len(text)
    if vocab.chat:
        literals, _ = vocab.turn_literals(1, generation_prompt=True)
        before, text, after = vocab.encode(literals[0]), vocab.encode(prompt), vocab.encode(literals[1])
        return before + text + after, [False] * len(before) + [True] * len(text) + [False] * len(after)
    text = vocab.encode(prompt)
    ids = vocab.prefix + [vocab.user] + text + [vocab.assistant]
    return ids, [False] * (len(vocab.prefix) + 1) + [True] * len(text) + [False]


def image_generation_sample(
    vocab: Vocab,
    template: ImageTemplate,
    image: torch.Tensor | None,
    prompt: str,
    key: str = "",
    plan: str | None = None,
) -> Sample:
    """Prompt -> image in ``template``'s layout; ``image=None`` builds the inference sequence (slots unfilled).

    ``plan``: the text the model writes before the image (``""``: none, it learns to draw at once), supervised
    up to the begin token; ``None``: no text targets (a template without plans)."""
    t = template
    head_ids, prompt_mask = generation_prompt(vocab, t, prompt)
    plan_ids = vocab.encode(plan) if plan else []
    if plan is not None and len(plan_ids) > t.plan_tokens:
        raise ValueError(f"a plan of {len(plan_ids)} tokens; the {t.head!r} head writes at most {t.plan_tokens} "
                         f"(its plan_tokens): {plan!r}")  # fmt: skip
    written = len(head_ids)  # the plan and the begin token are what the model writes
    head_ids = head_ids + plan_ids + [getattr(vocab, t.begin)]
    prompt_mask = prompt_mask + [True] * len(plan_ids) + [False]
    s = _image_sample(vocab, t.head, t.blocks, t.full_blocks, head_ids, prompt_mask, t.end, image, key)
    if plan is not None:
        for i in range(written - 1, len(head_ids) - 1):  # logits at i predict token i + 1
            s.targets[i] = head_ids[i + 1]
    return s


def _image_sample(
    vocab: Vocab,
    head: str,
    blocks: tuple[int, ...],
    full_blocks: bool,
    head_ids: list[int],
    prompt_mask: list[bool],
    end: bool,
    image: torch.Tensor | None,
    key: str,
) -> Sample:
    n = sum(blocks)
    tail = [vocab.eoi] if end else []
    ids = head_ids + [vocab.gen] * n + tail
    block_ids = [-1] * len(head_ids)
    for b, size in enumerate(blocks):
        block_ids += [b if full_blocks else -1] * size
    block_ids += [-1] * len(tail)
    prompt_mask = prompt_mask + [False] * (n + len(tail))
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
    user. User text holds one ``<image>`` marker per entry of ``images``, in order. Layout (ours)::

        <bos> (<user> text|<begin_of_image> <image_placeholder>*n <end_of_image> ... <assistant> answer <eos>)*

    With the tokenizer's chat template its own text surrounds each turn instead (the answer is supervised with
    the text that closes its turn, e.g. Qwen2's ``<|im_end|>``). Text around a marker is stripped: the image
    tokens already delimit it (so "<image>\nq" is exactly :func:`understanding_sample`'s prompt). A trailing
    user turn ends in the assistant's opening with no answer: the inference prompt.
    """
    if not turns or turns[0][0] != ROLE_USER:
        raise TemplateError(f"conversation {key!r} must start with a user turn")
    for i, (role, text) in enumerate(turns):
        expected = ROLE_USER if i % 2 == 0 else ROLE_ASSISTANT
        if role != expected:
            raise TemplateError(f"conversation {key!r}: turn {i} is {role!r}, expected {expected!r} (turns alternate)")
        if role == ROLE_ASSISTANT and IMAGE_MARKER in text:
            raise TemplateError(f"conversation {key!r}: an image marker in assistant turn {i}")
    n_markers = sum(text.count(IMAGE_MARKER) for role, text in turns if role == ROLE_USER)
    if n_markers != len(images):
        raise TemplateError(f"conversation {key!r} has {n_markers} image marker(s) for {len(images)} image(s)")
    build = _chat_turns if vocab.chat else _our_turns
    ids, supervised = build(vocab, turns, n_image_tokens)
    targets = [IGNORE] * len(ids)
    for start, end in supervised:
        for i in range(start - 1, end - 1):  # logits at i predict token i+1
            targets[i] = ids[i + 1]
    kinds = [TOKEN_UND_IMAGE if t == vocab.image else TOKEN_TEXT for t in ids]
    return Sample(
        ids, targets, TASK_UND, und_images=list(images), prompt_mask=[False] * len(ids), key=key, token_kinds=kinds
    )


def _user_ids(vocab: Vocab, text: str, n_image_tokens: int) -> list[int]:
    """A user turn's content: its text segments, and each ``<image>`` marker as the image's tokens."""
    ids: list[int] = []
    for j, segment in enumerate(text.split(IMAGE_MARKER)):
        if j > 0:  # an image sits between two segments
            ids += [vocab.boi] + [vocab.image] * n_image_tokens + [vocab.eoi]
        if segment.strip():
            ids += vocab.encode(segment.strip())
    return ids


def _our_turns(vocab: Vocab, turns: list[tuple[str, str]], n_image_tokens: int):
    """(ids, supervised [start, end) spans) in our layout."""
    ids, supervised = list(vocab.prefix), []
    for role, text in turns:
        if role == ROLE_ASSISTANT:
            start = len(ids)
            ids += vocab.encode(text.strip()) + [vocab.eos]
            supervised.append((start, len(ids)))
        else:
            ids += [vocab.user] + _user_ids(vocab, text, n_image_tokens) + [vocab.assistant]
    return ids, supervised


def _chat_turns(vocab: Vocab, turns: list[tuple[str, str]], n_image_tokens: int):
    """(ids, supervised spans) in the tokenizer's chat template: its literal text between the contents, each
    answer supervised with the literal text that closes its turn."""
    open_ended = turns[-1][0] == ROLE_USER
    literals, closes = vocab.turn_literals(len(turns), generation_prompt=open_ended)
    ids, supervised = vocab.encode(literals[0]), []
    for i, (role, text) in enumerate(turns):
        after = literals[i + 1]
        if role == ROLE_USER:
            ids += _user_ids(vocab, text, n_image_tokens) + vocab.encode(after)
            continue
        close = closes[i // 2]
        start = len(ids)
        ids += vocab.encode(text.strip()) + vocab.encode(after[:close])
        supervised.append((start, len(ids)))
        ids += vocab.encode(after[close:])
    return ids, supervised


def text_document_samples(vocab: Vocab, text: str, max_tokens: int, key: str = "") -> list[Sample]:
    """A text-only document -> LM samples of at most ``max_tokens`` tokens (loss on every next token).

    ``<bos> text <eos>`` is cut into consecutive chunks, as LLM pretraining does; the last
    token of a chunk still predicts the first token of the next one.
    """
    body = vocab.encode(text.strip())
    if not body:
        raise TemplateError(f"document {key!r} has no tokens")
    ids = vocab.prefix + body + [vocab.eos]
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
