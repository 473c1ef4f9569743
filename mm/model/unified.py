"""The unified model: one LLM that reads images (text out) and draws them (image heads).

Training forward on a packed :class:`mm.batch.Batch`:
  text ids -> token embeddings
  und images -> understanding encoder -> aligner -> scattered at <image_placeholder>
  each image head (mm/model/heads: flow, nextfreq, raster, ...) fills its own placeholders
  -> our decoder loop (causal within each sample; full blocks inside an image where a head asks; p-MoD)
  -> text CE on answer targets | each head's losses (velocity MSE + REPA, code cross-entropy)

ZeRO-3 gathers a module's weights with a collective each time it runs, so every rank must run the same
modules in the same order. An engine that needs this calls :meth:`UnifiedModel.require_every_module`;
a part with no input in a batch then runs on its placeholder input (``ImageHead.placeholder``), whose
outputs join the loss times zero (the LLaVA-on-ZeRO-3 remedy), and routers run on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mm.batch import Batch, ImageInputs, SampleShapes, left_padded
from mm.images import match_images, zero_images
from mm.kernels.attention import AttentionSpec
from mm.kernels.dispatch import use_kernels
from mm.kernels.fused import linear_cross_entropy
from mm.model.backbone import build_llm
from mm.model.config import ModelConfig
from mm.model.decoder import DecoderOutput, KVCache, check_decoder, run_layers
from mm.model.heads import HeadContext, ImageHead, head_class
from mm.model.heads.base import place
from mm.model.heads.codes import sample_logits
from mm.model.routing import MoDRouters, Routing, plan_layers, routable_kind_ids, routable_mask
from mm.model.towers import UnderstandingEncoder
from mm.positions import PositionPolicy
from mm.schema import resolve_path
from mm.sequence import (
    IGNORE,
    IMAGE_MARKER,
    ROLE_USER,
    TASK_GEN,
    TOKEN_GEN_IMAGE,
    TOKEN_TEXT,
    TOKEN_UND_IMAGE,
    Sample,
    Vocab,
    conversation_sample,
    generation_prompt,
    load_vocab,
)


class UnifiedModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocab):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.llm = build_llm(cfg.llm, len(vocab))
        check_decoder(self.llm.get_decoder())
        d = self.llm.config.hidden_size
        # p-MoD routers (one per routed layer); None keeps the model and its state dict exactly dense
        self.mod_routers = MoDRouters(self.llm.config.num_hidden_layers, d, cfg.mod) if cfg.mod.enabled else None
        self.checkpointing = False
        self.every_module = False
        self.und = UnderstandingEncoder(cfg.und, d)
        tower, layers = self.und.tower, self.llm.config.num_hidden_layers
        ctx = HeadContext(vocab, d, layers, tower.width, tower.image_size // tower.patch_size)
        self.heads = nn.ModuleDict({name: head_class(name)(name, c, ctx) for name, c in cfg.heads.items()})
        # a head writes plans: their targets are the "plan" loss (FlowHead.loss_weights), not the answers' "text"
        self.writes_plans = any(h.template.plan_tokens for h in self.heads.values())
        self.position_policy = PositionPolicy.from_config(cfg.v2pe)
        # no parameters of its own: the fused text loss as a module, so ZeRO-3 gathers the LM head for it
        self.fused_text_loss = FusedLMHeadLoss()

    # ---- what the rest of the system reads ------------------------------------------------------
    def head(self, name: str | None = None) -> ImageHead:
        """An image head by name; None = the default (first configured) head."""
        if not self.heads:
            raise KeyError("this model has no image head (model.understanding_only=true): it only answers in text")
        name = name or next(iter(self.heads))
        if name not in self.heads:
            raise KeyError(f"image head {name!r} not in this model; it has {list(self.heads)} (model.heads)")
        return self.heads[name]

    def sample_shapes(self) -> SampleShapes:
        u = self.und
        return SampleShapes(
            und_preprocess=u.preprocess, und_tokens=u.tokens_per_image,
            gen_templates={n: h.template for n, h in self.heads.items()}, position_policy=self.position_policy,
        )  # fmt: skip

    @property
    def backend(self) -> str:
        return self.cfg.llm.attn_implementation

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the LLM layers in backward instead of keeping their activations (the engine calls this)."""
        self.checkpointing = enabled

    def require_every_module(self, enabled: bool = True) -> None:
        """Run every module on every step whatever the batch holds (ZeRO-3; see the module docstring)."""
        self.every_module = enabled

    def pretrained_sources(self) -> dict[str, tuple[str, str]]:
        """Module prefix -> (config key, local path) of every part that loaded weights from a path."""
        out = {}
        tower = self.und.tower.pretrained_source()
        if tower:
            out["und.tower"] = tower
        if self.cfg.llm.pretrained:
            out["llm"] = ("model.llm.pretrained", self.cfg.llm.pretrained)
        for name, head in self.heads.items():
            out |= {f"heads.{name}.{part}": src for part, src in head.pretrained_sources().items()}
        return out

    # ---- the interface heads use (mm.model.heads.base.HeadHost) --------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def und_features(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images of any size and channels -> the understanding tower's patch features."""
        return self.und.features(match_images(images, self.und.image_size, self.und.channels))

    def decode(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        spec: AttentionSpec,
        token_kinds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        write_cache: bool = True,
        output_hidden_states: bool = False,
        spans: Sequence | None = None,
    ) -> DecoderOutput:
        """The LLM's layers on ``embeds`` (our loop: packed attention, p-MoD routing, KV cache).

        ``spans``: the rows' host layout (``Batch.spans``); with it, routing reads nothing back from the device.
        """
        routing = None
        if self.mod_routers is not None and token_kinds is not None:
            routing = self._routing(token_kinds, spec, spans)
        return run_layers(
            self.llm.get_decoder(), embeds, positions, spec, self.backend, cache=cache, write_cache=write_cache,
            routing=routing, output_hidden_states=output_hidden_states,
            checkpointing=self.checkpointing and self.training, kernels=self.cfg.llm.kernels,
        )  # fmt: skip

    def _routing(self, token_kinds: torch.Tensor, spec: AttentionSpec, spans: Sequence | None) -> Routing | None:
        kinds = self.cfg.mod.routable_kinds
        routable = routable_mask(token_kinds, spec.q_segments, kinds)
        if spans is None:  # inference steps: a host read decides
            return Routing(self.mod_routers, routable) if self.every_module or bool(routable.any()) else None
        ids = routable_kind_ids(kinds)
        if not self.every_module and not any(s.kinds[k] for row in spans for s in row for k in ids):
            return None  # nothing routable: every layer dense (the routers' result would be the dense one)
        plans = plan_layers(spans, spec.q_segments.shape[1], ids, self.mod_routers.ratios)
        dev = token_kinds.device
        plans = {i: replace(p, varlen=p.varlen.to(dev, non_blocking=True)) for i, p in plans.items()}
        return Routing(self.mod_routers, routable, plans)

    # ---- training -----------------------------------------------------------------
    def add_draws(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Every head's seeded draws for its images (flow: t, noise; all: prompt dropout), heads in order.

        Draw before :meth:`loss_counts`: a dropped prompt takes its plan's text targets with it."""
        input_ids, targets, draws = batch.input_ids, batch.targets, dict(batch.draws)
        for name, head in self.heads.items():
            inputs = batch.images.get(name)
            if inputs is None or not len(inputs):
                continue
            d = head.draw(inputs, generator)
            dropped = inputs.sample_ids[d.pop("drop")]
            if len(dropped):  # classifier-free guidance: the dropped samples' prompts (and plans) become pad
                in_dropped = torch.isin(batch.sample_ids, dropped)
                input_ids = input_ids.masked_fill(batch.prompt_mask & in_dropped, self.vocab.pad)
                targets = targets.masked_fill(in_dropped, IGNORE)  # a plan is not predicted from pads
            draws[name] = d
        return replace(batch, input_ids=input_ids, targets=targets, draws=draws, _spec=None)

    def loss_weights(self) -> dict[str, float]:
        out = {"text": self.cfg.text_loss_weight}
        for head in self.heads.values():
            out.update(head.loss_weights())
        return out

    def loss_counts(self, batch: Batch) -> dict[str, float]:
        """Denominators of each loss in ``batch`` (on the host), known before the forward pass.

        The trainer sums them over ranks and accumulation steps so every loss is normalised by its
        global count (torchtitan, BAGEL), not a per-rank mean. Text: the summed per-token weights of
        supervised tokens (1 each for token-level reduction); flow and REPA: generated images; code
        heads: predicted codes.
        """
        mask = batch.targets != IGNORE
        plan = self._plan_targets(batch) & mask
        out = {"text": float(batch.loss_weights[mask & ~plan].sum())}
        for name, head in self.heads.items():
            out.update(head.loss_counts(batch.images.get(name)))
        return out | ({"plan": float(batch.loss_weights[plan].sum())} if self.writes_plans else {})

    def _plan_targets(self, batch: Batch) -> torch.Tensor:
        """[B, L] bool: the tokens of generation samples (their only targets are plans) when a head writes plans
        (they are then the ``plan`` loss, not the answers' ``text``); all False otherwise."""
        gen = [i.sample_ids for i in batch.images.values() if i is not None and len(i)]
        if not (self.writes_plans and gen):
            return torch.zeros_like(batch.targets, dtype=torch.bool)
        return torch.isin(batch.sample_ids, torch.cat(gen).to(batch.sample_ids.device))

    def combine(self, out: dict[str, torch.Tensor], counts: dict[str, float]) -> torch.Tensor:
        """sum_k weight_k * sum_k / count_k over the losses that have a count.

        A loss with no count anywhere still enters as 0 * sum when every module must run: its
        placeholder then takes part in the backward pass on every rank alike (ZeRO-3's collectives).
        """
        total = out["text_sum"].new_zeros(())
        for k, weight in self.loss_weights().items():
            if counts.get(k, 0) > 0 and weight != 0:
                total = total + weight * out[f"{k}_sum"] / counts[k]
            elif self.every_module and f"{k}_sum" in out:
                total = total + 0.0 * out[f"{k}_sum"]
        return total

    def _embed_und(self, embeds: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch.input_ids == self.vocab.image
        if batch.und_images is not None:
            # uint8 stays uint8: the encoder normalises it as the reference processors do (mm.images.normalize)
            inputs = ImageInputs(batch.und_images, batch.sample_ids.new_zeros(0))
        elif self.every_module:
            inputs = ImageInputs(zero_images(1, self.und.channels, self.und.image_size, embeds),
                                 batch.sample_ids.new_zeros(0), placeholder=True)  # fmt: skip
        else:
            return embeds
        embeds = self.und.place_begin(embeds, batch.input_ids, self.vocab.boi, self.vocab.image)
        return place(embeds, mask, self.und(inputs.images).flatten(0, 1), inputs, "understanding images")

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss sums and counts of a packed batch, and ``loss`` normalised by this batch's own counts.

        ``{k}_sum`` (k in :meth:`loss_weights`: text and each head's losses) are sums over supervised
        tokens/images; the trainer divides them by global counts (:meth:`loss_counts`). Per-token and
        per-image losses are returned too (packing tests).
        """
        self._check_images(batch)
        embeds = self._embed_und(self.embed_tokens(batch.input_ids), batch)
        states = {}
        for name, head in self.heads.items():
            inputs, draws = batch.images.get(name), batch.draws.get(name, {})
            if inputs is None:
                if not self.every_module:
                    continue
                inputs, draws = head.placeholder(embeds)
            embeds, states[name] = head.embed(self, embeds, batch, inputs, draws)
        need_hidden = any(self.heads[name].needs_hidden_states() for name in states)
        out = self.decode(embeds, batch.position_ids, batch.attention(), batch.token_kinds,
                          output_hidden_states=need_hidden, spans=batch.spans)  # fmt: skip
        losses = self._text_loss(out.last_hidden_state, batch)
        for name, state in states.items():
            losses.update(self.heads[name].losses(self, out.last_hidden_state, out, state))
        names = list(self.loss_weights())
        zero = losses["text_sum"].new_zeros(())
        for k in names:  # a head with nothing in this batch
            losses.setdefault(f"{k}_sum", zero)
            losses.setdefault(f"{k}_count", zero)
        counts = {k: float(losses[f"{k}_count"]) for k in names}
        for k in names:  # per-batch means, for logs and tests
            losses[k] = losses[f"{k}_sum"].detach() / max(counts[k], 1e-12)
        losses["loss"] = self.combine(losses, counts)
        return losses

    def _check_images(self, batch: Batch) -> None:
        """Host-side checks: every generation image has a head, every generation slot an image."""
        unknown = sorted(set(batch.images) - set(self.heads))
        if unknown:
            raise ValueError(f"the batch holds images for image heads {unknown}, which this model lacks "
                             f"(model.heads: {list(self.heads)})")  # fmt: skip
        und_slots = sum(s.kinds[TOKEN_UND_IMAGE] for row in batch.spans for s in row)
        und_images = 0 if batch.und_images is None else len(batch.und_images)
        if und_slots != und_images * self.und.tokens_per_image:
            raise ValueError(f"batch has {und_slots} understanding placeholders for {und_images} image(s) of "
                             f"{self.und.tokens_per_image} tokens")  # fmt: skip
        slots = sum(s.kinds[TOKEN_GEN_IMAGE] for row in batch.spans for s in row)
        filled = sum(len(i) * self.heads[n].tokens_per_image for n, i in batch.images.items())
        if slots != filled:
            raise ValueError(
                f"batch has {slots} generation placeholders but its images fill {filled}: a generation sample "
                f"without its image, or a sample laid out for another head"
            )

    def _text_loss(self, hidden: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The answers' next-token loss (``text``) and, where a head writes plans, the plans' (``plan``)."""
        zero = hidden.new_zeros((), dtype=torch.float32)
        out = {"text_sum": zero, "text_count": zero}
        supervised = any(s.supervised for row in batch.spans for s in row)
        if not (self.every_module or supervised):
            return out
        mask = batch.targets != IGNORE
        if not (self.writes_plans and batch.images):
            return out | self._lm_loss(hidden, batch, mask, supervised)
        plan = self._plan_targets(batch)
        spans = [s for row in batch.spans for s in row]  # on the host: which kind of sample has targets
        answered = any(s.supervised and not s.kinds[TOKEN_GEN_IMAGE] for s in spans)
        planned = any(s.supervised and s.kinds[TOKEN_GEN_IMAGE] for s in spans)
        plans = self._lm_loss(hidden, batch, mask & plan, planned)
        return (
            out
            | self._lm_loss(hidden, batch, mask & ~plan, answered)
            | {k.replace("text_", "plan_"): v for k, v in plans.items()}
        )

    def _lm_loss(self, hidden: torch.Tensor, batch: Batch, mask: torch.Tensor, supervised: bool) -> dict:
        """``text_sum``, ``text_count``, ``text_per_token`` of the targets in ``mask``."""
        if self.cfg.llm.kernels == "fused" and use_kernels("fused", hidden):
            return self._fused_text_loss(hidden, batch, mask, supervised)
        logits = self.llm.get_output_embeddings()(hidden[mask]).float()
        per_token = F.cross_entropy(logits, batch.targets[mask], reduction="none")
        w = batch.loss_weights[mask].float()
        return {"text_sum": (per_token * w).sum(), "text_count": w.sum().detach(), "text_per_token": per_token.detach()}

    def _fused_text_loss(
        self, hidden: torch.Tensor, batch: Batch, mask: torch.Tensor, supervised: bool
    ) -> dict[str, torch.Tensor]:
        """The text loss of :meth:`_text_loss` with the LM head fused in (no [N, V] logits): the same sum,
        per-token losses and count, gradients scaled by whatever ``combine`` divides by (the global count).

        A batch without text targets (ZeRO-3 runs every module on every rank) takes one ignored row: a zero
        loss and zero gradients, through the same collectives as the other ranks.
        """
        if supervised:
            h, targets, w = hidden[mask], batch.targets[mask], batch.loss_weights[mask].float()
        else:
            h = hidden.reshape(-1, hidden.shape[-1])[:1]
            targets, w = torch.full((1,), IGNORE, device=h.device), torch.zeros(1, device=h.device)
        ce = self.fused_text_loss(self.llm.get_output_embeddings(), h, targets, w)
        return {"text_sum": ce.loss_sum, "text_count": ce.weight_sum, "text_per_token": ce.per_token}

    # ---- inference --------------------------------------------------------------
    @torch.no_grad()
    def answer(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        questions: list[str],
        max_new_tokens: int = 8,
        on_token: Callable[[int, int], None] | None = None,
        use_cache: bool = True,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Answers to ``questions`` about images: uint8 squares of the tower's preprocessing
        (``UnifiedMMProcessor.und_images``, the loader's tensors), or [0,1] floats of the tower's size; greedy,
        or sampled with ``do_sample``.

        Sampling draws each token after ``temperature``, ``top_k`` and ``top_p`` (nucleus) cuts from the
        seeded ``generator`` (a CPU generator; the same seed and batch give the same answers).

        ``images``: a [N,C,H,W] tensor (one image per question), or one [k,C,H,W] tensor per question
        (k images each, placed at the question's ``<image>`` markers, else before the question).
        Positions follow the model's position policy (V2PE's inference delta when enabled).
        ``on_token(row, token_id)`` is called for every new token of an unfinished row as soon as it
        is chosen (streaming). The prompt runs once and each new token reads a KV cache (under p-MoD,
        routed layers cache only the image tokens they kept); ``use_cache=False`` recomputes the whole
        sequence per token (the reference).
        """
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise ValueError(f"answer: sampling needs temperature > 0, top_p in (0, 1], top_k >= 0; got "
                             f"temperature={temperature}, top_p={top_p}, top_k={top_k}")  # fmt: skip
        samples, flat = self._answer_samples(images, questions)
        sampling = (temperature, top_k, top_p, generator) if do_sample else None
        out = self._continue(samples, flat, self.vocab.stop_ids, max_new_tokens, on_token, use_cache, sampling)
        return [self.vocab.decode(o) for o in out]

    def _continue(
        self,
        samples: list,
        flat: list[torch.Tensor],
        stop_ids: Sequence[int],
        max_new_tokens: int,
        on_token: Callable[[int, int], None] | None = None,
        use_cache: bool = True,
        sampling: tuple | None = None,
    ) -> list[list[int]]:
        """The text tokens that follow each inference sample (which ends in text), up to a token of ``stop_ids``
        (not kept) or ``max_new_tokens``; greedy, or drawn with ``sampling`` (temperature, top_k, top_p,
        generator)."""
        dev = self.device
        batch = left_padded(samples, self.vocab.pad).to(dev)
        ids, pos, sid, kinds = batch.input_ids, batch.position_ids, batch.sample_ids, batch.token_kinds
        und = torch.stack(flat).to(dev) if flat else None
        embeds = self._embed_und(self.embed_tokens(ids), replace(batch, und_images=und))  # prompt embedded once
        spec = batch.attention()
        cache = KVCache() if use_cache else None
        h = self.decode(embeds, pos, spec, kinds, cache=cache, spans=batch.spans).last_hidden_state[:, -1]
        done = torch.zeros(len(samples), dtype=torch.bool, device=dev)
        stop = set(stop_ids)
        out: list[list[int]] = [[] for _ in samples]
        for step in range(max_new_tokens):
            logits = self.llm.get_output_embeddings()(h)
            nxt = sample_logits(logits, *sampling) if sampling else logits.argmax(-1)
            for i, tok in enumerate(nxt.tolist()):
                if not done[i]:
                    if tok in stop:  # <eos>, or the token that closes a turn of the tokenizer's chat template
                        done[i] = True
                    else:
                        out[i].append(tok)
                        if on_token is not None:
                            on_token(i, tok)
            if done.all() or step == max_new_tokens - 1:
                break
            # the new token: text, one past the last position (prompts end in text: <|assistant|>)
            new_embeds = self.embed_tokens(nxt[:, None])
            new_pos, new_sid = pos[:, -1:] + 1, sid[:, -1:].clamp(min=0)
            new_kinds = torch.zeros_like(new_sid, dtype=kinds.dtype)
            if use_cache:
                idx = spec.q_index[:, -1:] + 1
                step_spec = AttentionSpec(new_sid, new_sid, idx, idx, self_attention=True)
                h = self.decode(new_embeds, new_pos, step_spec, new_kinds, cache=cache).last_hidden_state[:, -1]
            embeds, pos = torch.cat([embeds, new_embeds], 1), torch.cat([pos, new_pos], 1)
            sid, kinds = torch.cat([sid, new_sid], 1), torch.cat([kinds, new_kinds], 1)
            spec = AttentionSpec.packed(sid)
            if not use_cache:  # the reference: the whole sequence again
                h = self.decode(embeds, pos, spec, kinds).last_hidden_state[:, -1]
        return out

    def _answer_samples(self, images, questions: list[str]) -> tuple[list, list[torch.Tensor]]:
        if len(images) != len(questions):
            raise ValueError(f"answer: {len(images)} image entries for {len(questions)} questions")
        per_question = [img[None] if isinstance(images, torch.Tensor) else img for img in images]
        samples = []
        for i, (imgs, q) in enumerate(zip(per_question, questions)):
            if imgs.ndim != 4:
                raise ValueError(f"answer: images of question {i} must be [k,C,H,W], got shape {tuple(imgs.shape)}")
            markers = q.count(IMAGE_MARKER)
            if markers and markers != len(imgs):
                raise ValueError(
                    f"answer: question {i} has {markers} {IMAGE_MARKER} marker(s) for {len(imgs)} image(s)"
                )
            text = q if markers else IMAGE_MARKER * len(imgs) + "\n" + q  # no markers: the images open the prompt
            s = conversation_sample(self.vocab, [(ROLE_USER, text)], list(imgs), self.und.tokens_per_image)
            if self.position_policy.enabled:  # V2PE: every image advances the position by the inference delta
                s.positions = self.position_policy.positions(s.kinds())
            samples.append(s)
        return samples, [im for imgs in per_question for im in imgs]  # row-major: the placeholders' order

    @torch.no_grad()
    def loglikelihood(
        self, images: torch.Tensor | Sequence[torch.Tensor], contexts: list[str], continuations: list[str]
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context, images), greedy) per question, by teacher forcing.

        Each row is the answer prompt of :meth:`answer` (same images, markers and V2PE positions) followed
        by the continuation's tokens where the answer would go: ``... context <|assistant|> continuation``
        (no ``<eos>``: a continuation need not end the answer). ``greedy`` says whether greedy decoding
        yields exactly those tokens. Rows are left padded into one batch, each with its own positions, so
        a row's value does not depend on the others. ``images`` as in :meth:`answer`; a question may have
        none (an empty ``[0,C,H,W]`` tensor), e.g. lmms-eval's unconditional requests.
        """
        if len(contexts) != len(continuations):
            raise ValueError(f"loglikelihood: {len(contexts)} contexts for {len(continuations)} continuations")
        prompts, flat = self._answer_samples(images, contexts)
        conts = [self.vocab.encode(c.strip()) for c in continuations]
        samples = []
        for s, cont in zip(prompts, conts):
            pos = s.position_ids()
            tail = pos[-1] + 1 + torch.arange(len(cont), dtype=torch.float32)  # text after <|assistant|>
            samples.append(replace(
                s, input_ids=s.input_ids + cont, targets=s.targets + [IGNORE] * len(cont),
                prompt_mask=s.prompt_mask + [False] * len(cont), token_kinds=s.kinds() + [TOKEN_TEXT] * len(cont),
                positions=torch.cat([pos, tail]),
            ))  # fmt: skip
        batch = left_padded(samples, self.vocab.pad).to(self.device)
        und = torch.stack(flat).to(self.device) if flat else None
        embeds = self._embed_und(self.embed_tokens(batch.input_ids), replace(batch, und_images=und))
        hidden = self.decode(embeds, batch.position_ids, batch.attention(), batch.token_kinds,
                             spans=batch.spans).last_hidden_state  # fmt: skip
        out, L = [], batch.input_ids.shape[1]
        for i, cont in enumerate(conts):
            if not cont:
                out.append((0.0, True))
                continue
            # logits at column j predict token j + 1: the continuation's tokens sit in the last len(cont) columns
            logits = self.llm.get_output_embeddings()(hidden[i, L - len(cont) - 1 : L - 1]).float()
            target = torch.tensor(cont, device=logits.device)
            logp = logits.log_softmax(-1).gather(-1, target[:, None]).sum()
            out.append((float(logp), bool((logits.argmax(-1) == target).all())))
        return out

    @torch.no_grad()
    def generate(
        self, prompts: list[str], generator: torch.Generator | None = None, head: str | None = None, **kwargs
    ) -> torch.Tensor:
        """Text -> [0,1] images with image head ``head`` (None: the first configured one).

        ``kwargs`` are the head's sampler settings: flow ``cfg_scale, steps, use_cache, noise, plans``;
        nextfreq/raster ``cfg_scale, cfg_schedule, temperature, top_k, top_p, use_cache``. A head with
        ``plan_tokens`` draws after the plan the model writes first (:meth:`plan`, at ``plan_temperature``, the
        head's by default, from ``generator``), unless ``plans`` are given.
        """
        h = self.head(head)
        temperature = kwargs.pop("plan_temperature", None)
        if h.template.plan_tokens and kwargs.get("plans") is None:
            temperature = h.plan_temperature if temperature is None else temperature
            kwargs["plans"] = self.plan(prompts, head, temperature, generator)
        return h.generate(self, prompts, generator=generator, **kwargs)

    @torch.no_grad()
    def plan(
        self, prompts: list[str], head: str | None = None, temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:  # fmt: skip
        """The text the model writes between each prompt and its image (the head's plan): up to the token that
        opens the image, or the head's ``plan_tokens`` (then the image opens after them); greedy at
        ``temperature`` 0, else drawn at that temperature from ``generator``."""
        t = self.head(head).template
        if not t.plan_tokens:
            raise ValueError(f"image head {t.head!r} writes no plan (its plan_tokens is 0)")
        samples = []
        for p in prompts:
            ids, mask = generation_prompt(self.vocab, t, p)
            samples.append(Sample(ids, [IGNORE] * len(ids), TASK_GEN, prompt_mask=mask))
        stop = [getattr(self.vocab, t.begin), *self.vocab.stop_ids]
        sampling = (temperature, 0, 1.0, generator) if temperature > 0 else None
        return [self.vocab.decode(o) for o in self._continue(samples, [], stop, t.plan_tokens, sampling=sampling)]


class FusedLMHeadLoss(nn.Module):
    """LM head + weighted cross-entropy in one fused op (``mm.kernels.fused.linear_cross_entropy``).

    The op reads the head's weight outside the head's own forward. DeepSpeed ZeRO-3 partitions weights and
    gathers them only around the forward and backward of a module that owns them or has them registered as
    external parameters; so the op runs as this module's forward, and a partitioned head's weights are
    registered here (DeepSpeed's ``register_external_parameter``) on first use: from then on DeepSpeed
    gathers them around this module's forward and its backward, where their gradients accumulate. The
    first call, whose gathering hook has already run, gathers them itself (as DeepSpeed does for a weight
    it finds used outside its module). No parameters of its own: the state dict is unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._external: set[int] = set()

    def forward(self, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
        """``head``: the LM head (nn.Linear); hidden [N, D], targets [N] (IGNORE = unsupervised), weights [N]."""
        self._register_partitioned([p for p in (head.weight, head.bias) if p is not None])
        return linear_cross_entropy(hidden, head.weight, targets, weights, head.bias, IGNORE, impl="fused")

    def _register_partitioned(self, params: list[nn.Parameter]) -> None:
        new = [p for p in params if hasattr(p, "ds_id") and id(p) not in self._external]  # ds_id: ZeRO-3 manages it
        if not new:
            return
        import deepspeed  # only once DeepSpeed manages the parameters (a heavy import)

        for p in new:
            deepspeed.zero.register_external_parameter(self, p)
            self._external.add(id(p))
        new[0].all_gather(param_list=new)  # this call's gathering hook ran before the registration


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level part (works on the meta device)."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
    counts["total"] = sum(counts.values())
    return counts


def build_model(cfg: ModelConfig) -> UnifiedModel:
    """The model of ``cfg``: the tokenizer and pretrained parts from their local paths."""
    if cfg.llm.pretrained and not resolve_path(cfg.llm.pretrained).is_dir():
        raise FileNotFoundError(f"model.llm.pretrained: no such directory {resolve_path(cfg.llm.pretrained)}")
    return UnifiedModel(cfg, load_vocab(resolve_path(cfg.llm.tokenizer_dir()), generation=bool(cfg.heads)))
