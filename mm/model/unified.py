"""The unified model: one LLM that reads images (text out) and draws them (image heads).

Training forward on a packed batch (data/pack.py):
  text ids -> token embeddings
  und images -> understanding encoder -> aligner -> scattered at <image_placeholder>
  each image head (mm/model/heads: flow, nextfreq, raster) fills its own placeholders
  -> LLM (block-diagonal causal attention over samples; full blocks inside an image where a head asks)
  -> text CE on answer targets | each head's losses (velocity MSE + REPA, code cross-entropy)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data.pack import collate
from data.stream import SampleShapes
from mm.config import ModelConfig
from mm.kernels.attention import AttentionSpec
from mm.model.backbone import build_llm
from mm.model.decoder import DecoderOutput, KVCache, check_decoder, run_layers
from mm.model.heads import IMAGE_HEADS, FlowHead, ImageHead
from mm.model.positions import PositionPolicy
from mm.model.routing import MoDRouters, routable_mask
from mm.model.vision import UnderstandingEncoder
from mm.sequence import (
    FLOW_HEAD,
    IGNORE,
    IMAGE_MARKER,
    ROLE_USER,
    TOKEN_KINDS,
    Vocab,
    conversation_sample,
    scatter_placeholders,
)


class UnifiedModel(nn.Module):
    # ZeRO-3 gathers a module's weights with a collective each time it runs, so every rank must run the
    # same modules in the same order. The DeepSpeed engine sets this: a batch without understanding
    # images, generation images or text targets then runs those modules on a zero placeholder whose
    # output enters the loss times 0 (the LLaVA-on-ZeRO-3 remedy). Every image head does the same.
    run_every_module: bool = False

    def __init__(self, cfg: ModelConfig, vocab: Vocab):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.llm = build_llm(cfg.llm, len(vocab))
        check_decoder(self.llm.get_decoder())
        d = self.llm.config.hidden_size
        # p-MoD routers (one per routed layer); None keeps the model and its state dict exactly dense
        self.mod_routers = MoDRouters(self.llm.config.num_hidden_layers, d, cfg.mod) if cfg.mod.enabled else None
        self.checkpointing = False
        self.und = UnderstandingEncoder(cfg.und, d)
        # The heads' parts are registered on this module under the names the heads choose (the flow
        # head keeps its historical top-level names: autoencoder, time_embed, gen_encoder, ...).
        self.heads: dict[str, ImageHead] = {}
        for name in cfg.heads:
            if name not in IMAGE_HEADS:
                raise KeyError(f"model.heads: unknown image head {name!r}; known: {sorted(IMAGE_HEADS)}")
            head = IMAGE_HEADS[name](cfg, vocab, d, self.und.tower.width)
            for key, module in head.modules().items():
                self.add_module(key, module)
            self.heads[name] = head

    def head(self, name: str | None = None) -> ImageHead:
        """An image head by name; None = the default (first configured) head."""
        name = name or next(iter(self.heads))
        if name not in self.heads:
            raise KeyError(f"image head {name!r} not in this model; it has {list(self.heads)} (model.heads)")
        return self.heads[name]

    # ---- shapes -----------------------------------------------------------------
    @property
    def flow_head(self) -> FlowHead:
        if FLOW_HEAD not in self.heads:
            raise AttributeError(f"this model has no flow head (model.heads={list(self.heads)})")
        return self.heads[FLOW_HEAD]

    @property
    def gen_tokens_per_image(self) -> int:
        return self.flow_head.tokens_per_image

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.flow_head.latent_shape

    def sample_shapes(self) -> SampleShapes:
        u = self.cfg.und
        default = self.head().template
        return SampleShapes(
            und_size=u.image_size, und_channels=u.in_channels, und_tokens=self.und.tokens_per_image,
            gen_size=default.image_size, gen_channels=default.image_channels, gen_tokens=default.image_tokens,
            position_policy=self.position_policy, gen_templates={n: h.template for n, h in self.heads.items()},
        )  # fmt: skip

    @property
    def position_policy(self) -> PositionPolicy:
        """V2PE's deltas (training draws, inference fixed), or the standard positions when disabled."""
        v = self.cfg.v2pe
        if not v.enabled:
            return PositionPolicy()
        kinds = frozenset(TOKEN_KINDS[k] for k in v.kinds)
        return PositionPolicy(kinds, tuple(float(d) for d in v.train_deltas), float(v.infer_delta))

    @property
    def backend(self) -> str:
        return self.cfg.llm.attn_implementation

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the LLM layers in backward instead of keeping their activations (the engine calls this)."""
        self.checkpointing = enabled

    def decode(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        spec: AttentionSpec,
        token_kinds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        write_cache: bool = True,
        output_hidden_states: bool = False,
    ) -> DecoderOutput:
        """The LLM's layers on ``embeds`` (our loop: packed attention, p-MoD routing, KV cache)."""
        routable = None
        if self.mod_routers is not None and token_kinds is not None:
            routable = routable_mask(token_kinds, spec.q_segments, self.cfg.mod.routable_kinds)
        return run_layers(
            self.llm.get_decoder(), embeds, positions, spec, self.backend, cache=cache, write_cache=write_cache,
            routers=self.mod_routers, routable=routable, output_hidden_states=output_hidden_states,
            checkpointing=self.checkpointing and self.training, route_always=self.run_every_module,
        )  # fmt: skip

    # ---- training -----------------------------------------------------------------
    def add_flow_inputs(self, batch: dict, generator: torch.Generator) -> dict:
        """Every head's seeded draws for its samples (flow: t, noise; all: prompt dropout), heads in order."""
        batch = dict(batch)
        for head in self.heads.values():
            batch = head.add_inputs(self, batch, generator)
        return batch

    def _embed(self, input_ids: torch.Tensor, und_images: torch.Tensor | None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.vocab.image
        if und_images is not None or image_mask.any():
            feats = self.und(und_images) if und_images is not None else embeds.new_zeros(0, embeds.shape[-1])
            embeds = scatter_placeholders(embeds, image_mask, feats.flatten(0, 1), "understanding images")
        elif self.run_every_module:
            zero = self._zero_image(self.cfg.und.in_channels, self.cfg.und.image_size, embeds)
            embeds = embeds + 0.0 * self.und(zero).sum()
        return embeds

    @staticmethod
    def _zero_image(channels: int, size: int, like: torch.Tensor) -> torch.Tensor:
        # The device comes from a tensor at hand, not from a weight: under ZeRO-3 reading a module's
        # weight outside its forward gathers it with a collective that only this rank would run.
        return torch.zeros(1, channels, size, size, device=like.device)

    def loss_weights(self) -> dict[str, float]:
        out = {"text": self.cfg.text_loss_weight}
        for head in self.heads.values():
            out.update(head.loss_weights())
        return out

    def loss_counts(self, batch: dict) -> dict[str, float]:
        """Denominators of each loss in ``batch``, known before the forward pass.

        The trainer sums them over ranks and accumulation steps so every loss is
        normalised by its global count (torchtitan, BAGEL), not a per-rank mean.
        Text: the summed per-token weights of supervised tokens (1 each for
        token-level reduction); flow and REPA: the number of generated images;
        code heads: the number of predicted codes.
        """
        mask = batch["targets"] != IGNORE
        w = batch.get("loss_weights")
        out = {"text": float(w[mask].sum()) if w is not None else float(mask.sum())}
        for head in self.heads.values():
            out.update(head.loss_counts(batch))
        return out

    def combine(self, out: dict[str, torch.Tensor], counts: dict[str, float]) -> torch.Tensor:
        """sum_k weight_k * sum_k / count_k over the losses that have a count.

        A loss with no count anywhere still enters as 0 * sum: under ``run_every_module`` its
        placeholder then takes part in the backward pass on every rank alike (ZeRO-3's collectives).
        """
        total = out["text_sum"].new_zeros(())
        for k, weight in self.loss_weights().items():
            if counts.get(k, 0) > 0 and weight != 0:
                total = total + weight * out[f"{k}_sum"] / counts[k]
            elif self.run_every_module:
                total = total + 0.0 * out[f"{k}_sum"]
        return total

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss sums and counts of a packed batch, and ``loss`` normalised by this batch's own counts.

        ``{k}_sum`` (k in :meth:`loss_weights`: text and each head's losses) are sums over
        supervised tokens/images; the trainer divides them by global counts (:meth:`loss_counts`).
        Per-token and per-image losses are returned too (packing tests).
        """
        ids = batch["input_ids"]
        embeds = self._embed(ids, as_unit_float(batch.get("und_images")))
        states, claimed = {}, 0
        for name, head in self.heads.items():
            embeds, states[name], n = head.embed(self, embeds, batch)
            claimed += n
        n_slots = int((ids == self.vocab.gen).sum())
        if n_slots != claimed:
            raise ValueError(
                f"batch has {n_slots} generation placeholders but the image heads {list(self.heads)} filled "
                f"{claimed}: no gen_images (or {{head}}_images) for some generation samples"
            )

        need_hidden = any(head.needs_hidden_states(states[n]) for n, head in self.heads.items())
        spec = AttentionSpec.packed(batch["sample_ids"], batch.get("block_ids"))
        out = self.decode(
            embeds, batch["position_ids"], spec, batch.get("token_kinds"), output_hidden_states=need_hidden
        )
        hidden = out.last_hidden_state

        zero = embeds.new_zeros((), dtype=torch.float32)
        names = list(self.loss_weights())
        losses = {f"{k}_{s}": zero for k in names for s in ("sum", "count")}
        targets = batch["targets"]
        text_mask = targets != IGNORE
        if text_mask.any() or self.run_every_module:
            logits = self.llm.get_output_embeddings()(hidden[text_mask]).float()
            per_token = F.cross_entropy(logits, targets[text_mask], reduction="none")
            w = batch.get("loss_weights")
            w = w[text_mask].float() if w is not None else torch.ones_like(per_token)
            losses["text_sum"], losses["text_count"] = (per_token * w).sum(), w.sum().detach()
            losses["text_per_token"] = per_token.detach()
        for name, head in self.heads.items():
            losses.update(head.losses(self, hidden, out, batch, states[name]))
        counts = {k: float(losses[f"{k}_count"]) for k in names}
        for k in names:  # per-batch means, for logs and tests
            losses[k] = losses[f"{k}_sum"].detach() / max(counts[k], 1e-12)
        losses["loss"] = self.combine(losses, counts)
        return losses

    def _to_und_images(self, images: torch.Tensor) -> torch.Tensor:
        """Generation-space images -> the understanding encoder's size and channels (REPA)."""
        u = self.cfg.und
        if images.shape[-1] != u.image_size:
            images = F.interpolate(images, size=(u.image_size, u.image_size), mode="bilinear", antialias=True)
        if images.shape[1] != u.in_channels:
            images = images.mean(1, keepdim=True).expand(-1, u.in_channels, -1, -1)
        return images

    # ---- inference --------------------------------------------------------------
    def _left_padded(self, samples: list) -> dict[str, torch.Tensor]:
        """Right-align prompts of different lengths so generation continues at the same column.

        Each sample keeps its own float32 positions (``Sample.positions``, V2PE); padding sits
        on the left with sample id -1, which the attention mask excludes.
        """
        L = max(len(s) for s in samples)
        rows = []
        for s in samples:
            pad = L - len(s)
            rows.append(collate([[s]], L, self.vocab.pad))
            for k in ("input_ids", "targets", "position_ids", "sample_ids", "block_ids", "token_kinds"):
                rows[-1][k] = rows[-1][k].roll(pad, dims=1)
        keys = ("input_ids", "position_ids", "sample_ids", "block_ids", "token_kinds")
        batch = {k: torch.cat([r[k] for r in rows]) for k in keys}
        batch["sample_ids"] = batch["sample_ids"].clamp(max=0)  # one sample per row; padding stays -1
        return batch

    @torch.no_grad()
    def answer(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        questions: list[str],
        max_new_tokens: int = 8,
        on_token: Callable[[int, int], None] | None = None,
        use_cache: bool = True,
    ) -> list[str]:
        """Greedy answers to ``questions`` about [0,1] images.

        ``images``: a [N,C,H,W] tensor (one image per question), or one [k,C,H,W] tensor
        per question (k images each, placed at the question's ``<image>`` markers, else
        before the question). Positions follow the model's position policy (V2PE's
        inference delta when enabled). ``on_token(row, token_id)`` is called for every new
        token of an unfinished row as soon as it is chosen (streaming). The prompt runs once and
        each new token reads a KV cache (under p-MoD, routed layers cache only the image tokens they
        kept); ``use_cache=False`` recomputes the whole sequence per token (the reference).
        """
        if len(images) != len(questions):
            raise ValueError(f"answer: {len(images)} image entries for {len(questions)} questions")
        dev = next(self.parameters()).device
        per_question = [img[None] if isinstance(images, torch.Tensor) else img for img in images]
        for i, imgs in enumerate(per_question):
            if imgs.ndim != 4:
                raise ValueError(f"answer: images of question {i} must be [k,C,H,W], got shape {tuple(imgs.shape)}")
        policy, samples = self.position_policy, []
        for i, (imgs, q) in enumerate(zip(per_question, questions)):
            markers = q.count(IMAGE_MARKER)
            if markers and markers != len(imgs):
                raise ValueError(
                    f"answer: question {i} has {markers} {IMAGE_MARKER} marker(s) for {len(imgs)} image(s)"
                )
            text = q if markers else IMAGE_MARKER * len(imgs) + "\n" + q  # no markers: the images open the prompt
            s = conversation_sample(self.vocab, [(ROLE_USER, text)], list(imgs), self.und.tokens_per_image)
            if policy.enabled:  # V2PE: every image advances the position by the fixed inference delta
                s.positions = policy.positions(s.kinds())
            samples.append(s)
        batch = {k: v.to(dev) for k, v in self._left_padded(samples).items()}
        ids, pos, sid = batch["input_ids"], batch["position_ids"], batch["sample_ids"]
        flat = [im for imgs in per_question for im in imgs]  # row-major: the placeholders' order
        und = torch.stack(flat).to(dev) if flat else None
        embeds = self._embed(ids, und)  # prompt embedded once; new tokens are plain text
        kinds = batch["token_kinds"]
        spec = AttentionSpec.packed(sid)
        cache = KVCache() if use_cache else None
        h = self.decode(embeds, pos, spec, kinds, cache=cache).last_hidden_state[:, -1]
        done = torch.zeros(len(samples), dtype=torch.bool, device=dev)
        out: list[list[int]] = [[] for _ in samples]
        for step in range(max_new_tokens):
            nxt = self.llm.get_output_embeddings()(h).argmax(-1)
            for i, tok in enumerate(nxt.tolist()):
                if not done[i]:
                    if tok == self.vocab.eos:
                        done[i] = True
                    else:
                        out[i].append(tok)
                        if on_token is not None:
                            on_token(i, tok)
            if done.all() or step == max_new_tokens - 1:
                break
            # the new token: text, one past the last position (decoding continues from it)
            new_embeds = self.llm.get_input_embeddings()(nxt[:, None])
            new_pos = pos[:, -1:] + 1  # prompts end in text (<|assistant|>): next is +1
            new_sid = sid[:, -1:].clamp(min=0)
            new_kinds = torch.zeros_like(new_sid, dtype=kinds.dtype)
            if use_cache:
                step = AttentionSpec(new_sid, new_sid, spec.q_index[:, -1:] + 1, spec.q_index[:, -1:] + 1)
                h = self.decode(new_embeds, new_pos, step, new_kinds, cache=cache).last_hidden_state[:, -1]
            embeds, pos, sid = (
                torch.cat([embeds, new_embeds], 1),
                torch.cat([pos, new_pos], 1),
                torch.cat([sid, new_sid], 1),
            )
            kinds = torch.cat([kinds, new_kinds], 1)
            spec = AttentionSpec.packed(sid)
            if not use_cache:  # the reference: the whole sequence again
                h = self.decode(embeds, pos, spec, kinds).last_hidden_state[:, -1]
        return [self.vocab.decode(o) for o in out]

    @torch.no_grad()
    def generate(
        self, prompts: list[str], generator: torch.Generator | None = None, head: str | None = None, **kwargs
    ) -> torch.Tensor:
        """Text -> [0,1] images with image head ``head`` (None: the first configured one).

        ``kwargs`` are the head's sampler settings: flow ``cfg_scale, steps, use_cache, noise``;
        nextfreq/raster ``cfg_scale, cfg_schedule, temperature, top_k, top_p, use_cache``.
        """
        return self.head(head).generate(self, prompts, generator=generator, **kwargs)


def as_unit_float(images: torch.Tensor | None) -> torch.Tensor | None:
    """Images travel as uint8 from the loader to the model; the model works on [0,1] floats."""
    if images is None or images.is_floating_point():
        return images
    return images.float() / 255.0


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level part (works on the meta device)."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
    counts["total"] = sum(counts.values())
    return counts
