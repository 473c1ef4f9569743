"""JanusFlow's rectified-flow head, behind the image-head interface (behaviour unchanged).

Training: gen images -> frozen autoencoder -> z_t = t*x1 + (1-t)*x0 -> gen encoder (FiLM t) ->
scattered at <gen_placeholder>; time embedding at <begin_of_generation>; after the LLM the gen decoder
(long skip) predicts the velocity (MSE) and REPA aligns an early layer with the understanding tower.
Sampling: Euler steps with classifier-free guidance; the prompt prefix runs once into a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import FlowConfig, ModelConfig
from mm.kernels.attention import AttentionSpec
from mm.model.autoencoder import build_autoencoder
from mm.model.decoder import KVCache
from mm.model.flow import cfg_combine, euler_sample, interpolate, sample_t, target_velocity
from mm.model.gen_codec import GenDecoder, GenEncoder, TimeEmbedding
from mm.model.heads.base import ImageHead, drop_prompts, head_sample_mask, unconditional
from mm.model.vision import mlp
from mm.sequence import FLOW_HEAD, ImageTemplate, Vocab, image_generation_sample


@dataclass
class FlowState:
    x1: torch.Tensor | None  # clean latents (None: ZeRO-3 placeholder)
    x0: torch.Tensor | None
    skip: torch.Tensor
    temb: torch.Tensor
    images: torch.Tensor | None
    mask: torch.Tensor | None
    tokens: torch.Tensor | None = None  # placeholder: the gen encoder's output on a zero image


def flow_recipe(cfg: ModelConfig) -> dict:
    f = cfg.flow
    return {"sampler": "euler", "steps": f.sample_steps, "cfg_scale": f.cfg_scale, "cfg_rule": "u + w(c - u)"}


class FlowHead(ImageHead):
    name = FLOW_HEAD

    def __init__(self, cfg: ModelConfig, vocab: Vocab, hidden_size: int, und_width: int):
        self.cfg, self.vocab = cfg, vocab
        ae = cfg.autoencoder
        self.latent_shape = (ae.latent_channels, ae.image_size // ae.downsample, ae.image_size // ae.downsample)
        self._modules = {
            "autoencoder": build_autoencoder(ae),
            "time_embed": TimeEmbedding(cfg.gen.time_freq_dim, hidden_size),
            "gen_encoder": GenEncoder(cfg.gen, ae.latent_channels, hidden_size),
            "gen_decoder": GenDecoder(cfg.gen, ae.latent_channels, hidden_size),
            "repa_proj": mlp([hidden_size, cfg.flow.repa_hidden, cfg.flow.repa_hidden, und_width]),
        }
        self.autoencoder, self.time_embed = self._modules["autoencoder"], self._modules["time_embed"]
        self.gen_encoder, self.gen_decoder = self._modules["gen_encoder"], self._modules["gen_decoder"]
        self.repa_proj = self._modules["repa_proj"]
        self.template = ImageTemplate(
            FLOW_HEAD, ae.image_size, ae.image_channels, (self.tokens_per_image,), full_blocks=False, begin="bog"
        )

    @property
    def tokens_per_image(self) -> int:
        return (self.latent_shape[1] // self.cfg.gen.patch_size) ** 2

    def modules(self) -> dict[str, nn.Module]:
        return dict(self._modules)

    @property
    def repa(self) -> bool:
        return self.cfg.flow.repa_weight > 0

    def loss_weights(self) -> dict[str, float]:
        return {"flow": self.cfg.flow_loss_weight, "repa": self.cfg.flow.repa_weight}

    def loss_counts(self, batch: dict) -> dict[str, float]:
        n_gen = float(len(batch["gen_images"])) if "gen_images" in batch else 0.0
        return {"flow": n_gen, "repa": n_gen if self.repa else 0.0}

    @property
    def passes_per_image(self) -> int:
        return 1 + self.cfg.flow.sample_steps  # the prompt prefix once, then one pass per Euler step

    # ---- training -----------------------------------------------------------------
    def add_inputs(self, model, batch: dict, generator: torch.Generator) -> dict:
        n = len(batch["gen_sample_ids"])
        if n == 0:
            return batch
        f: FlowConfig = self.cfg.flow
        batch["gen_t"] = sample_t(n, f.logit_normal_mean, f.logit_normal_std, generator)
        batch["gen_noise"] = torch.randn((n, *self.latent_shape), generator=generator)
        return drop_prompts(batch, batch["gen_sample_ids"], f.prompt_dropout, self.vocab.pad, generator)

    def embed_latents(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from mm.sequence import scatter_placeholders

        temb = self.time_embed(t)
        tokens, skip = self.gen_encoder(z_t, temb)
        embeds = scatter_placeholders(embeds, mask, tokens.flatten(0, 1), "generation images")
        embeds = scatter_placeholders(embeds, input_ids == self.vocab.bog, temb, "time tokens")
        return embeds, skip, temb

    def embed(self, model, embeds: torch.Tensor, batch: dict) -> tuple[torch.Tensor, FlowState | None, int]:
        from mm.model.unified import as_unit_float

        gen_images = as_unit_float(batch.get("gen_images"))
        if gen_images is not None:
            with torch.no_grad():
                x1 = self.autoencoder.encode(gen_images)
            x0, t = batch["gen_noise"], batch["gen_t"]
            mask = head_sample_mask(batch, "gen_sample_ids", self.vocab.gen)
            embeds, skip, temb = self.embed_latents(embeds, batch["input_ids"], mask, interpolate(x1, x0, t), t)
            return embeds, FlowState(x1, x0, skip, temb, gen_images, mask), int(mask.sum())
        if model.run_every_module:  # the generation modules before the LLM on one zero image
            ae = self.cfg.autoencoder
            with torch.no_grad():
                x1 = self.autoencoder.encode(model._zero_image(ae.image_channels, ae.image_size, embeds))
            temb = self.time_embed(x1.new_zeros(1))
            tokens, skip = self.gen_encoder(x1, temb)
            return embeds + 0.0 * tokens.sum(), FlowState(None, None, skip, temb, None, None, tokens), 0
        return embeds, None, 0

    def needs_hidden_states(self, state: FlowState | None) -> bool:
        # the ZeRO-3 placeholder asks for them too: the decoder's outputs must not depend on the batch
        return state is not None and self.repa

    def losses(self, model, hidden: torch.Tensor, decoder_out, batch: dict, state: FlowState | None) -> dict:
        if state is None:
            return {}
        if state.x1 is None:
            return self._placeholder_tail(model, state, hidden, decoder_out)
        x1, x0, mask = state.x1, state.x0, state.mask
        n, m = x1.shape[0], self.tokens_per_image
        zero = hidden.new_zeros((), dtype=torch.float32)
        v = self.gen_decoder(hidden[mask].view(n, m, -1), state.skip, state.temb)
        per_image = (v.float() - target_velocity(x1, x0)).pow(2).flatten(1).mean(1)
        out = {"flow_sum": per_image.sum(), "flow_count": zero + n, "flow_per_image": per_image.detach()}
        if self.repa:
            layer_h = decoder_out.hidden_states[self.cfg.flow.repa_layer].reshape(hidden.shape)
            pred = self.repa_proj(layer_h[mask].view(n, m, -1))
            with torch.no_grad():
                target = model.und.features(model._to_und_images(state.images))
            per_image_repa = -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(1)
            out["repa_sum"], out["repa_count"] = per_image_repa.sum(), zero + n
        return out

    def _placeholder_tail(self, model, state: FlowState, hidden: torch.Tensor, decoder_out) -> dict:
        """The generation modules after the LLM, in the real path's order: zero losses with their gradients.

        Everything mirrors the real path, because ZeRO-3 traces the order of module calls and the
        number of outputs needing a gradient (its backward hooks), and every rank must agree: the
        inputs hang off the LLM's output (final and REPA layer, times 0), and flow and REPA come back
        as separate losses as the real path returns them.
        """
        ae = self.cfg.autoencoder
        stand_in = torch.zeros_like(state.tokens) + 0.0 * hidden.sum()
        out = {"flow_sum": 0.0 * self.gen_decoder(stand_in, state.skip, state.temb).float().sum()}
        if self.repa:
            layer_h = decoder_out.hidden_states[self.cfg.flow.repa_layer]
            repa_in = torch.zeros_like(state.tokens) + 0.0 * layer_h.sum()
            out["repa_sum"] = 0.0 * self.repa_proj(repa_in).float().sum()
            with torch.no_grad():
                zero = model._zero_image(ae.image_channels, ae.image_size, hidden)
                model.und.features(model._to_und_images(zero))
        return out

    # ---- sampling -----------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        model,
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
        tokens against that KV cache without extending it. ``use_cache=False`` recomputes
        the whole sequence every step (the reference the cached path is tested against).
        """
        f = self.cfg.flow
        cfg_scale = f.cfg_scale if cfg_scale is None else cfg_scale
        steps = steps or f.sample_steps
        dev = next(model.parameters()).device
        n, m = len(prompts), self.tokens_per_image
        cond = [image_generation_sample(self.vocab, self.template, None, p) for p in prompts]
        batch = {k: v.to(dev) for k, v in model._left_padded(cond + unconditional(cond, self.vocab.pad)).items()}
        ids, pos, sid = batch["input_ids"], batch["position_ids"], batch["sample_ids"]
        prefix = ids.shape[1] - (m + 1)  # everything before <begin_of_generation>
        kinds = batch["token_kinds"]
        spec = AttentionSpec.packed(sid)
        text_embeds = model.llm.get_input_embeddings()(ids)
        gen_mask = ids == self.vocab.gen
        cache = None
        if use_cache:
            cache = KVCache()
            model.decode(text_embeds[:, :prefix], pos[:, :prefix], AttentionSpec.packed(sid[:, :prefix]),
                         kinds[:, :prefix], cache=cache)  # fmt: skip
            # each step's tokens read the prefix cache and are not kept in it
            q_idx = spec.q_index[:, prefix:]
            step_spec = AttentionSpec(sid[:, prefix:], sid[:, prefix:], q_idx, q_idx)

        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            z2, t2 = torch.cat([z, z]), torch.cat([t, t]).to(dev)
            embeds, skip, temb = self.embed_latents(text_embeds, ids, gen_mask, z2, t2)
            if use_cache:
                h = model.decode(embeds[:, prefix:], pos[:, prefix:], step_spec, kinds[:, prefix:], cache=cache,
                                 write_cache=False).last_hidden_state  # fmt: skip
            else:
                h = model.decode(embeds, pos, spec, kinds).last_hidden_state[:, prefix:]
            v = self.gen_decoder(h[:, 1:], skip, temb)  # h[:, 0] is the time token
            return cfg_combine(v[:n], v[n:], cfg_scale)

        if noise is None:
            noise = torch.randn((n, *self.latent_shape), generator=generator)
        latents = euler_sample(velocity, noise.to(dev), steps)
        return self.autoencoder.decode(latents)
