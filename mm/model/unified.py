"""The unified model: one LLM that reads images (text out) and draws them (rectified flow).

Training forward on a packed batch (data/pack.py):
  text ids -> token embeddings
  und images -> understanding encoder -> aligner -> scattered at <image_placeholder>
  gen images -> frozen autoencoder -> z_t = t*x1 + (1-t)*x0 -> gen encoder (FiLM t)
             -> scattered at <gen_placeholder>; time embedding at <begin_of_generation>
  -> LLM (block-diagonal causal attention over samples)
  -> text CE on answer targets | gen decoder (long skip) -> velocity MSE | REPA cosine
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data.pack import collate
from data.stream import SampleShapes
from mm.config import FlowConfig, ModelConfig
from mm.kernels.attention import AttentionSpec
from mm.model.autoencoder import build_autoencoder
from mm.model.backbone import build_llm
from mm.model.decoder import DecoderOutput, KVCache, check_decoder, run_layers
from mm.model.flow import cfg_combine, euler_sample, interpolate, sample_t, target_velocity
from mm.model.gen_codec import GenDecoder, GenEncoder, TimeEmbedding
from mm.model.positions import PositionPolicy
from mm.model.routing import MoDRouters, routable_mask
from mm.model.vision import UnderstandingEncoder, mlp
from mm.sequence import (
    IGNORE,
    IMAGE_MARKER,
    ROLE_USER,
    TOKEN_KINDS,
    Vocab,
    conversation_sample,
    generation_sample,
    scatter_placeholders,
)


class UnifiedModel(nn.Module):
    # ZeRO-3 gathers a module's weights with a collective each time it runs, so every rank must run the
    # same modules in the same order. The DeepSpeed engine sets this: a batch without understanding
    # images, generation images or text targets then runs those modules on a zero placeholder whose
    # output enters the loss times 0 (the LLaVA-on-ZeRO-3 remedy).
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
        self.autoencoder = build_autoencoder(cfg.autoencoder)
        ae = cfg.autoencoder
        self.latent_shape = (ae.latent_channels, ae.image_size // ae.downsample, ae.image_size // ae.downsample)
        self.time_embed = TimeEmbedding(cfg.gen.time_freq_dim, d)
        self.gen_encoder = GenEncoder(cfg.gen, ae.latent_channels, d)
        self.gen_decoder = GenDecoder(cfg.gen, ae.latent_channels, d)
        self.repa_proj = mlp([d, cfg.flow.repa_hidden, cfg.flow.repa_hidden, self.und.tower.width])

    # ---- shapes -----------------------------------------------------------------
    @property
    def gen_tokens_per_image(self) -> int:
        return (self.latent_shape[1] // self.cfg.gen.patch_size) ** 2

    def sample_shapes(self) -> SampleShapes:
        u, ae = self.cfg.und, self.cfg.autoencoder
        return SampleShapes(
            und_size=u.image_size, und_channels=u.in_channels, und_tokens=self.und.tokens_per_image,
            gen_size=ae.image_size, gen_channels=ae.image_channels, gen_tokens=self.gen_tokens_per_image,
            position_policy=self.position_policy,
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
            checkpointing=self.checkpointing and self.training,
        )  # fmt: skip

    # ---- training -----------------------------------------------------------------
    def add_flow_inputs(self, batch: dict, generator: torch.Generator) -> dict:
        """Draw t, noise and prompt dropout for the batch's generation samples (seeded)."""
        batch = dict(batch)
        n = len(batch["gen_sample_ids"])
        if n == 0:
            return batch
        f: FlowConfig = self.cfg.flow
        batch["gen_t"] = sample_t(n, f.logit_normal_mean, f.logit_normal_std, generator)
        batch["gen_noise"] = torch.randn((n, *self.latent_shape), generator=generator)
        drop = torch.rand(n, generator=generator) < f.prompt_dropout
        dropped = batch["gen_sample_ids"][drop]
        if len(dropped):
            hit = batch["prompt_mask"] & torch.isin(batch["sample_ids"], dropped)
            batch["input_ids"] = batch["input_ids"].masked_fill(hit, self.vocab.pad)
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

    def _placeholder_gen_head(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generation modules before the LLM on one zero image (run_every_module)."""
        ae = self.cfg.autoencoder
        with torch.no_grad():
            x1 = self.autoencoder.encode(self._zero_image(ae.image_channels, ae.image_size, like))
        temb = self.time_embed(x1.new_zeros(1))
        tokens, skip = self.gen_encoder(x1, temb)
        return tokens, skip, temb

    def _placeholder_gen_tail(
        self, tokens: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, hidden: torch.Tensor, layer_h
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generation modules after the LLM, in the real path's order: (flow, repa) zeros with their gradients.

        Everything mirrors the real path, because ZeRO-3 traces the order of module calls and the
        number of outputs needing a gradient (its backward hooks) and every rank must agree: the
        inputs hang off the LLM's output (final and REPA layer, times 0), and flow and REPA come
        back as separate loss tensors as the real path returns them.
        """
        ae = self.cfg.autoencoder
        stand_in = torch.zeros_like(tokens) + 0.0 * hidden.sum()
        flow = 0.0 * self.gen_decoder(stand_in, skip, temb).float().sum()
        repa = None
        if layer_h is not None:
            repa = 0.0 * self.repa_proj(torch.zeros_like(tokens) + 0.0 * layer_h.sum()).float().sum()
            with torch.no_grad():
                self.und.features(self._to_und_images(self._zero_image(ae.image_channels, ae.image_size, tokens)))
        return flow, repa

    def _embed_gen(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        temb = self.time_embed(t)
        tokens, skip = self.gen_encoder(z_t, temb)
        embeds = scatter_placeholders(embeds, input_ids == self.vocab.gen, tokens.flatten(0, 1), "generation images")
        embeds = scatter_placeholders(embeds, input_ids == self.vocab.bog, temb, "time tokens")
        return embeds, skip, temb

    def loss_weights(self) -> dict[str, float]:
        c = self.cfg
        return {"text": c.text_loss_weight, "flow": c.flow_loss_weight, "repa": c.flow.repa_weight}

    def loss_counts(self, batch: dict) -> dict[str, float]:
        """Denominators of each loss in ``batch``, known before the forward pass.

        The trainer sums them over ranks and accumulation steps so every loss is
        normalised by its global count (torchtitan, BAGEL), not a per-rank mean.
        Text: the summed per-token weights of supervised tokens (1 each for
        token-level reduction); flow and REPA: the number of generated images.
        """
        mask = batch["targets"] != IGNORE
        w = batch.get("loss_weights")
        n_text = float(w[mask].sum()) if w is not None else float(mask.sum())
        n_gen = float(len(batch["gen_images"])) if "gen_images" in batch else 0.0
        repa = n_gen if self.cfg.flow.repa_weight > 0 else 0.0
        return {"text": n_text, "flow": n_gen, "repa": repa}

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

        ``{k}_sum`` (k in text, flow, repa) are sums over supervised tokens/images;
        the trainer divides them by global counts (:meth:`loss_counts`). Per-token
        and per-image losses are returned too (packing tests).
        """
        ids = batch["input_ids"]
        embeds = self._embed(ids, as_unit_float(batch.get("und_images")))
        gen_images = as_unit_float(batch.get("gen_images"))
        has_gen = gen_images is not None
        if has_gen:
            with torch.no_grad():
                x1 = self.autoencoder.encode(gen_images)
            x0, t = batch["gen_noise"], batch["gen_t"]
            embeds, skip, temb = self._embed_gen(embeds, ids, interpolate(x1, x0, t), t)
        elif (ids == self.vocab.gen).any():
            raise ValueError("batch has generation placeholders but no gen_images")
        elif self.run_every_module:
            placeholder = self._placeholder_gen_head(embeds)
            embeds = embeds + 0.0 * placeholder[0].sum()

        # under run_every_module the decoder returns the same outputs whatever the batch holds (ZeRO-3)
        need_repa = (has_gen or self.run_every_module) and self.cfg.flow.repa_weight > 0
        spec = AttentionSpec.packed(batch["sample_ids"], batch.get("block_ids"))
        out = self.decode(embeds, batch["position_ids"], spec, batch.get("token_kinds"), output_hidden_states=need_repa)
        hidden = out.last_hidden_state

        zero = embeds.new_zeros((), dtype=torch.float32)
        losses = {f"{k}_{s}": zero for k in ("text", "flow", "repa") for s in ("sum", "count")}
        targets = batch["targets"]
        text_mask = targets != IGNORE
        if text_mask.any() or self.run_every_module:
            logits = self.llm.get_output_embeddings()(hidden[text_mask]).float()
            per_token = F.cross_entropy(logits, targets[text_mask], reduction="none")
            w = batch.get("loss_weights")
            w = w[text_mask].float() if w is not None else torch.ones_like(per_token)
            losses["text_sum"], losses["text_count"] = (per_token * w).sum(), w.sum().detach()
            losses["text_per_token"] = per_token.detach()
        if has_gen:
            gen_mask = ids == self.vocab.gen
            n, m = x1.shape[0], self.gen_tokens_per_image
            v = self.gen_decoder(hidden[gen_mask].view(n, m, -1), skip, temb)
            per_image = (v.float() - target_velocity(x1, x0)).pow(2).flatten(1).mean(1)
            losses["flow_sum"], losses["flow_count"] = per_image.sum(), zero + n
            losses["flow_per_image"] = per_image.detach()
            if need_repa:
                layer_h = out.hidden_states[self.cfg.flow.repa_layer].reshape(embeds.shape)
                pred = self.repa_proj(layer_h[gen_mask].view(n, m, -1))
                with torch.no_grad():
                    target = self.und.features(self._to_und_images(gen_images))
                per_image_repa = -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(1)
                losses["repa_sum"], losses["repa_count"] = per_image_repa.sum(), zero + n
        elif self.run_every_module:
            layer_h = out.hidden_states[self.cfg.flow.repa_layer] if need_repa else None
            losses["flow_sum"], repa = self._placeholder_gen_tail(*placeholder, hidden, layer_h)
            if repa is not None:
                losses["repa_sum"] = repa
        counts = {k: float(losses[f"{k}_count"]) for k in ("text", "flow", "repa")}
        for k in ("text", "flow", "repa"):  # per-batch means, for logs and tests
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
            for k in ("input_ids", "targets", "position_ids", "sample_ids", "token_kinds"):
                rows[-1][k] = rows[-1][k].roll(pad, dims=1)
        keys = ("input_ids", "position_ids", "sample_ids", "token_kinds")
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
        self,
        prompts: list[str],
        generator: torch.Generator | None = None,
        cfg_scale: float | None = None,
        steps: int | None = None,
        use_cache: bool = True,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text -> [0,1] images with the Euler sampler and classifier-free guidance.

        The prompt prefix (conditional and unconditional rows together) runs
        through the LLM once; each step feeds only the time token and the latent
        tokens against a copy of that KV cache. ``use_cache=False`` recomputes
        the whole sequence every step (the reference the cached path is tested against).
        """
        f = self.cfg.flow
        cfg_scale = f.cfg_scale if cfg_scale is None else cfg_scale
        steps = steps or f.sample_steps
        dev = next(self.parameters()).device
        n, m = len(prompts), self.gen_tokens_per_image
        cond = [generation_sample(self.vocab, None, m, p) for p in prompts]
        uncond = []
        for s in cond:  # unconditional row: the prompt's tokens masked with pad, as in training
            u = copy.copy(s)
            u.input_ids = [self.vocab.pad if pm else t for t, pm in zip(s.input_ids, s.prompt_mask)]
            uncond.append(u)
        batch = {k: v.to(dev) for k, v in self._left_padded(cond + uncond).items()}
        ids, pos, sid = batch["input_ids"], batch["position_ids"], batch["sample_ids"]
        prefix = ids.shape[1] - (m + 1)  # everything before <begin_of_generation>
        kinds = batch["token_kinds"]
        spec = AttentionSpec.packed(sid)
        text_embeds = self.llm.get_input_embeddings()(ids)
        cache = None
        if use_cache:
            cache = KVCache()
            prefix_spec = AttentionSpec.packed(sid[:, :prefix])
            self.decode(text_embeds[:, :prefix], pos[:, :prefix], prefix_spec, kinds[:, :prefix], cache=cache)
            # each step's tokens read the prefix cache and are not kept in it
            step_spec = AttentionSpec(
                sid[:, prefix:], sid[:, prefix:], spec.q_index[:, prefix:], spec.q_index[:, prefix:]
            )

        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            z2, t2 = torch.cat([z, z]), torch.cat([t, t]).to(dev)
            embeds, skip, temb = self._embed_gen(text_embeds, ids, z2, t2)
            if use_cache:
                out = self.decode(
                    embeds[:, prefix:], pos[:, prefix:], step_spec, kinds[:, prefix:], cache=cache, write_cache=False
                )
                h = out.last_hidden_state
            else:
                h = self.decode(embeds, pos, spec, kinds).last_hidden_state[:, prefix:]
            v = self.gen_decoder(h[:, 1:], skip, temb)  # h[:, 0] is the time token
            return cfg_combine(v[:n], v[n:], cfg_scale)

        if noise is None:
            noise = torch.randn((n, *self.latent_shape), generator=generator)
        latents = euler_sample(velocity, noise.to(dev), steps)
        return self.autoencoder.decode(latents)


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
