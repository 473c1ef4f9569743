"""Source kinds: what a raw webdataset sample means, as one registered builder per kind.

A *source* (:class:`SourceConfig`) is a shard pattern + a kind + a weight (+ the kind's own
``options``). A *kind* turns one raw sample (``{"__key__": ..., ext: bytes}``) into training
:class:`~mm.sequence.Sample` s with :mod:`mm.sequence`'s templates. Adding a kind is one entry in
:data:`SOURCE_KINDS` (a :class:`SourceKind`: its builder, its options class); the loader, packer and
config validation read the registry and need no edit. ``kind: "name:value"`` is shorthand for the
kind's one ``argument`` option (``generation:nextfreq`` = ``generation`` with ``head: nextfreq``).

Shard layouts the bundled kinds read (``make_shards.py`` writes them):

* ``generation``: one image (``jpg``/``png``/``webp``...) + caption (``txt``, or ``caption``
  in ``json``) -> prompt -> image sample in the layout of the model's first image head;
  ``generation:<head>`` (``generation:nextfreq``, ...) names the head that trains on it; with
  ``options.plan`` a ``plan.txt`` member is text the model learns to write before the image;
* ``conversation``: ``json`` with a LLaVA/InternVL ``conversations`` list (``from``/``value``
  or ``role``/``content``; ``human``/``user`` and ``gpt``/``assistant``), ``<image>`` markers
  in user turns, images as ``jpg`` or ``0.jpg``, ``1.jpg``, ... in marker order; loss on
  every assistant turn;
* ``text``: a document (``txt``, or ``text`` in ``json``), cut to the row budget; the
  packer may split the pieces further to fill rows.

A sample that cannot be used raises :class:`~data.stream.BadSample` with the reason it
is counted under; anything else is a bug and propagates.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data.images import IMAGE_EXTS, load_image
from data.stream import BadSample
from mm.batch import SampleShapes
from mm.images import generation_preprocess
from mm.positions import image_runs
from mm.schema import ConfigError, parse_part
from mm.sequence import (
    IMAGE_MARKER,
    ROLE_ASSISTANT,
    ROLE_USER,
    Sample,
    TemplateError,
    Vocab,
    conversation_sample,
    image_generation_sample,
    text_document_samples,
)


@dataclass
class BuildContext:
    """Everything a builder may use besides the raw sample."""

    vocab: Vocab
    shapes: SampleShapes
    max_tokens: int  # the packed row's token budget
    max_pixels: int  # larger images are refused as decompression bombs
    rng: random.Random  # seeded per raw sample: the same draws on resume and under any packing


@dataclass
class NoOptions:
    """A kind without options."""


SampleBuilder = Callable[[dict, BuildContext, Any], list[Sample]]  # (raw sample, context, the kind's options)


@dataclass(frozen=True)
class SourceKind:
    build: SampleBuilder
    Config: type = NoOptions  # the kind's options (a source's ``options`` section)
    splittable: bool = False  # its samples are text only and may be cut across packed rows
    argument: str = ""  # the option that ``kind: "name:value"`` sets


# ---- members --------------------------------------------------------------------
def _text(raw: dict, ext: str) -> str | None:
    data = raw.get(ext)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", f"{ext}: {e}") from None


def _json(raw: dict) -> dict | None:
    if "json" not in raw:
        return None
    if not raw["json"]:
        raise BadSample("empty_file", "json member has 0 bytes")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", str(e)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def image_members(raw: dict) -> list[bytes]:
    """Image payloads in order: ``jpg`` alone, or ``0.jpg``, ``1.png``, ... by index."""
    found: dict[int, bytes] = {}
    for ext, data in raw.items():
        if ext.startswith("__"):
            continue
        index, _, fmt = ext.rpartition(".")
        if fmt not in IMAGE_EXTS or (index and not index.isdigit()):
            continue
        i = int(index) if index else 0
        if i in found:
            raise BadSample("ambiguous_images", f"two images with index {i}")
        found[i] = data
    return [found[i] for i in sorted(found)]


# ---- kinds ------------------------------------------------------------------------
@dataclass
class GenerationOptions:
    head: str = ""  # the image head that trains on these samples; "" = the model's first
    # read each sample's plan (``plan.txt``): text the model learns to write before it draws (the head's
    # plan_tokens bounds it); a sample without one teaches it to draw at once. False: plans are not read
    plan: bool = False


def build_generation(raw: dict, ctx: BuildContext, options: GenerationOptions) -> list[Sample]:
    """One image + caption -> a generation sample in the layout of the options' image head."""
    images = image_members(raw)
    if len(images) != 1:
        raise BadSample("missing_image" if not images else "too_many_images", f"{len(images)} images")
    caption = _text(raw, "txt")
    if caption is None:
        caption = (_json(raw) or {}).get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("missing_caption", "no txt member and no json caption" if caption is None else "empty caption")
    s = ctx.shapes
    head = options.head or s.default_head
    if head not in s.gen_templates:
        raise ValueError(
            f"source kind generation:{head}: the model has no {head!r} head (it has {list(s.gen_templates)})"
        )
    t = s.gen_templates[head]
    plan = None
    if options.plan:
        if not t.plan_tokens:
            raise ValueError(f"source kind generation with options.plan: the {head!r} head writes no plan "
                             f"(set model.heads.{head}.plan_tokens)")  # fmt: skip
        plan = (_text(raw, "plan.txt") or "").strip()
        if (n := len(ctx.vocab.encode(plan))) > t.plan_tokens:
            raise BadSample("plan_too_long", f"{n} tokens > plan_tokens={t.plan_tokens}")
    image = load_image(images[0], generation_preprocess(t.image_size, t.image_channels), ctx.max_pixels)
    return [image_generation_sample(ctx.vocab, t, image, caption.strip(), key=raw["__key__"], plan=plan)]


ROLES = {"human": ROLE_USER, "user": ROLE_USER, "gpt": ROLE_ASSISTANT, "assistant": ROLE_ASSISTANT}


def parse_conversation(meta: dict, n_images: int) -> list[tuple[str, str]]:
    """LLaVA/InternVL ``conversations`` -> (role, text) turns; images without markers go first."""
    convs = meta.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BadSample("bad_conversation", "no 'conversations' list")
    turns = []
    for turn in convs:
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        text = turn.get("value", turn.get("content"))
        if role is None or not isinstance(text, str):
            raise BadSample("bad_conversation", f"unreadable turn {turn!r:.120}")
        turns.append((role, text))
    if n_images and not any(IMAGE_MARKER in t for _, t in turns):  # no markers: images open the first turn
        turns[0] = (turns[0][0], IMAGE_MARKER * n_images + "\n" + turns[0][1])
    if not any(role == ROLE_ASSISTANT for role, _ in turns):
        raise BadSample("bad_conversation", "no assistant turn to learn from")
    return turns


def build_conversation(raw: dict, ctx: BuildContext, options: NoOptions) -> list[Sample]:
    meta = _json(raw)
    if meta is None:
        raise BadSample("missing_json", "no json member")
    images = image_members(raw)
    turns = parse_conversation(meta, len(images))
    s = ctx.shapes
    pixels = [load_image(data, s.und_preprocess, ctx.max_pixels) for data in images]
    try:
        return [conversation_sample(ctx.vocab, turns, pixels, s.und_tokens, key=raw["__key__"])]
    except TemplateError as e:
        raise BadSample("bad_conversation", str(e)) from None


def build_text(raw: dict, ctx: BuildContext, options: NoOptions) -> list[Sample]:
    text = _text(raw, "txt")
    if text is None:
        text = (_json(raw) or {}).get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadSample("empty_text", "no txt member or json text" if text is None else "blank document")
    try:
        return text_document_samples(ctx.vocab, text, ctx.max_tokens, key=raw["__key__"])
    except TemplateError as e:
        raise BadSample("empty_text", str(e)) from None


SOURCE_KINDS: dict[str, SourceKind] = {
    "generation": SourceKind(build_generation, GenerationOptions, argument="head"),
    "conversation": SourceKind(build_conversation),
    "text": SourceKind(build_text, splittable=True),
}


def source_kind(kind: str) -> tuple[SourceKind, str]:
    """The registered kind of ``kind`` ("name" or "name:value") and the shorthand's value."""
    name, _, value = kind.partition(":")
    if name not in SOURCE_KINDS:
        raise ConfigError(f"source kind {kind!r}; known: {sorted(SOURCE_KINDS)}")
    found = SOURCE_KINDS[name]
    if value and not found.argument:
        raise ConfigError(f"source kind {name!r} takes no ':value' shorthand (got {kind!r})")
    return found, value


@dataclass
class SourceConfig:
    """One training source: shards of one sample kind, mixed in by weight (data/loader.py)."""

    name: str = "digits"
    kind: str = "conversation"  # key of SOURCE_KINDS, or "name:value" (generation:nextfreq)
    shards: str = ""  # brace pattern, several joined by '::'; "" = data.train_shards
    weight: float = 1.0  # share of drawn samples (JanusFlow stage 2: und:gen:text = 14:80:6)
    resample: bool = False  # False: exact epochs; True: shards drawn with replacement (open-ended pretraining)
    options: Any = field(default_factory=dict)  # the kind's own settings (its SourceKind.Config)

    def __post_init__(self) -> None:
        where = f"data.sources[{self.name}]"
        try:
            found, value = source_kind(self.kind)
        except ConfigError as e:
            raise ConfigError(f"{where}.kind: {e}") from None
        options = dict(self.options) if isinstance(self.options, dict) else self.options
        if value:
            options = (options if isinstance(options, dict) else {}) | {found.argument: value}
        self.options = parse_part(found.Config, options, f"{where}.options")
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ConfigError(f"{where}.weight={self.weight} must be >= 0")


def build_samples(source: SourceConfig, raw: dict, ctx: BuildContext) -> list[Sample]:
    """Run the source kind's builder, then draw the sample's image position deltas (V2PE hook)."""
    found, _ = source_kind(source.kind)
    samples = found.build(raw, ctx, source.options)
    policy = ctx.shapes.position_policy
    if policy is not None and policy.enabled:
        for sample in samples:
            n_images = len(image_runs(sample.kinds(), policy.visual_kinds))
            if n_images:
                sample.positions = policy.positions(sample.kinds(), policy.draw(n_images, ctx.rng))
    return samples
