"""JanusFlow's rectified-flow head.

Training: gen images -> frozen autoencoder -> z_t = t*x1 + (1-t)*x0 -> gen encoder (FiLM t) ->
scattered at <gen_placeholder>; time embedding at <begin_of_generation>; after the LLM the gen decoder
(long skip) predicts the velocity (MSE) and REPA aligns an early layer with the understanding tower.
Sampling: Euler steps with classifier-free guidance; the prompt prefix runs once into a KV cache.
Diffusion Forcing (Chen et al. 2024), optional: ``slot_times`` of the training images draw one time per
slot instead of one per image, and ``stagger`` > 0 samples the slots in raster order, each starting while
the earlier ones are already nearly clean; with causal attention a slot then reads what the earlier ones
became (the two digits of "a 3 left of a 7" are drawn one after the other, not both at once).

The encoder/decoder is a codec kind (``mm.model.gen_codec.GEN_CODECS``: ``convnext``, ours; ``uvit``,
JanusFlow-1.3B's released layout); its parts are this head's children under the names the kind gives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mm.batch import Batch, ImageInputs, left_padded
from mm.images import as_unit_float
from mm.kernels.attention import AttentionSpec
from mm.model.autoencoder import AutoencoderConfig, build_autoencoder
from mm.model.decoder import DecoderOutput, KVCache
from mm.model.flow import (
    cfg_combine,
    euler_sample,
    euler_sample_slots,
    interpolate,
    sample_t,
    slot_map,
    staggered_times,
    target_velocity,
)
from mm.model.gen_codec import GEN_CODECS, GenCodec, GenCodecConfig, time_token
from mm.model.heads.base import (
    HeadContext,
    HeadHost,
    ImageHead,
    PartCost,
    loss_weight,
    place,
    register_head,
    slot_mask,
    take_slots,
    unconditional,
)
from mm.model.towers import mlp
from mm.profiling import forward_flops, trains
from mm.schema import ConfigError
from mm.sequence import ImageTemplate, image_generation_sample, scatter_placeholders


@dataclass
class FlowHeadConfig:
    """Rectified flow (t=0 noise, t=1 data, z_t = t*x1 + (1-t)*x0) with REPA, on a frozen autoencoder."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    codec: GenCodecConfig = field(default_factory=GenCodecConfig)  # the generation encoder/decoder
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    prompt_dropout: float = 0.1  # share of prompts replaced by pad (CFG)
    sample_steps: int = 30
    cfg_scale: float = 2.0
    repa_layer: int = 2  # LLM hidden state after this many blocks
    repa_weight: float = 1.0
    repa_hidden: int = 256
    loss_weight: float = 1.0
    # the image's tokens see each other (as Transfusion and BAGEL do) instead of only earlier ones (JanusFlow):
    # every slot of a layout then reads every other while they are drawn together, which prompts about several
    # objects need (counts, relations)
    full_attention: bool = False
    # Diffusion Forcing: the share of training images whose slots draw independent times (0: one per image,
    # JanusFlow), and the sampler's stagger (0: every slot together; 1: one slot after another in raster order;
    # between: slot k starts stagger*k after slot 0). Staggered sampling reads a causal model's earlier slots once
    # they are nearly clean; it needs a model trained with slot_times > 0 and costs ~(1 + stagger*(m-1)) x steps.
    slot_times: float = 0.0
    stagger: float = 0.0
    # the most text tokens the model writes before it draws: its plan (mm.sequence.ImageTemplate), trained by
    # generation sources with options.plan and written by UnifiedModel.generate (greedily at plan_temperature 0,
    # else drawn at that temperature: plans as varied as the training data's); 0: it draws at once
    plan_tokens: int = 0
    plan_temperature: float = 0.0
    # the plan's next-token loss, apart from the answers' text loss (each normalised by its own count, so plans
    # do not dilute the answers' share; a plan of random layouts carries ~0.4 nats per token that nothing can learn)
    plan_loss_weight: float = 0.5

    def __post_init__(self) -> None:
        self.autoencoder.fill_shapes()  # channels and downsampling from the autoencoder's folder
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"model.heads.flow.prompt_dropout={self.prompt_dropout} must be in [0, 1)")
        if min(self.plan_tokens, self.plan_temperature, self.plan_loss_weight) < 0:
            raise ConfigError(f"model.heads.flow: plan_tokens={self.plan_tokens}, plan_temperature="
                              f"{self.plan_temperature}, plan_loss_weight={self.plan_loss_weight}: each must be "
                              f">= 0")  # fmt: skip
        for key in ("slot_times", "stagger"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"model.heads.flow.{key}={getattr(self, key)} must be in [0, 1]")
        if (self.slot_times or self.stagger) and not GEN_CODECS[self.codec.kind].SLOT_TIMES:
            able = sorted(k for k, c in GEN_CODECS.items() if c.SLOT_TIMES)
            raise ConfigError(f"model.heads.flow: slot_times and stagger need a codec that takes one time per slot; "
                              f"codec.kind={self.codec.kind!r} conditions on one time per image (kinds that do: "
                              f"{able})")  # fmt: skip
        if self.sample_steps < 1:
            raise ConfigError(f"model.heads.flow.sample_steps={self.sample_steps} must be >= 1")
        side = self.autoencoder.image_size // self.autoencoder.downsample
        if side % self.codec.patch_size:
            raise ConfigError(f"model.heads.flow: the {side}x{side} latent is not a multiple of "
                              f"codec.patch_size={self.codec.patch_size}")  # fmt: skip


@dataclass
class FlowState:
    inputs: ImageInputs
    x1: torch.Tensor  # clean latents
    x0: torch.Tensor
    skip: torch.Tensor
    temb: torch.Tensor
    images: torch.Tensor
    mask: torch.Tensor


@register_head("flow")
class FlowHead(ImageHead):
    Config = FlowHeadConfig
    codec: GenCodec  # the encoder/decoder kind; its parts are this head's children

    def __init__(self, name: str, cfg: FlowHeadConfig, ctx: HeadContext):
        super().__init__(name, cfg, ctx)
        ae, d = cfg.autoencoder, ctx.hidden_size
        self.latent_shape = ae.latent_shape
        if cfg.repa_weight > 0 and ctx.und_grid != self.grid:
            raise ConfigError(repa_grid_error(name, cfg, ctx.und_grid))
        if not 0 < cfg.repa_layer <= ctx.num_layers:
            raise ConfigError(f"model.heads.{name}.repa_layer={cfg.repa_layer} outside 1..{ctx.num_layers}")
        self.autoencoder = build_autoencoder(ae, f"model.heads.{name}.autoencoder")
        codec = GEN_CODECS[cfg.codec.kind](cfg.codec, ae.latent_channels, d)
        for part in codec.PART_NAMES:  # the codec's parts are ours: heads.<name>.<part> in the state dict
            self.add_module(part, getattr(codec, part))
        object.__setattr__(self, "codec", codec)  # not a child: its modules are registered above
        # REPA's projector exists only when REPA trains (a released JanusFlow holds none)
        self.repa_proj = mlp([d, cfg.repa_hidden, cfg.repa_hidden, ctx.und_width]) if cfg.repa_weight > 0 else None
        self.template = ImageTemplate(
            name, ae.image_size, ae.image_channels, (self.grid**2,), full_blocks=cfg.full_attention, begin="bog",
            plan_tokens=cfg.plan_tokens,
        )  # fmt: skip
        self.plan_temperature = cfg.plan_temperature

    @property
    def grid(self) -> int:
        return self.latent_shape[1] // self.cfg.codec.patch_size

    @property
    def cell(self) -> int:
        """Latent cells per slot side."""
        return self.cfg.codec.patch_size

    @staticmethod
    def recipe(cfg: FlowHeadConfig) -> dict:
        out = {"sampler": "euler", "steps": cfg.sample_steps, "cfg_scale": cfg.cfg_scale, "cfg_rule": "u + w(c - u)"}
        out |= {"stagger": cfg.stagger} if cfg.stagger else {}
        return out | (
            {"plan_tokens": cfg.plan_tokens, "plan_temperature": cfg.plan_temperature} if cfg.plan_tokens else {}
        )

    def euler_steps(self, steps: int) -> int:
        """LLM passes of the Euler loop: ``steps``, or the staggered schedule's length."""
        return len(staggered_times(steps, self.grid**2, self.cfg.stagger)) - 1 if self.cfg.stagger else steps

    @property
    def passes_per_image(self) -> int:
        return 1 + self.euler_steps(self.cfg.sample_steps)  # the prompt prefix once, then one pass per Euler step

    @property
    def repa(self) -> bool:
        return self.cfg.repa_weight > 0

    def loss_weights(self) -> dict[str, float]:
        plan = {"plan": self.cfg.plan_loss_weight} if self.cfg.plan_tokens else {}  # UnifiedModel computes it
        return {"flow": self.cfg.loss_weight, "repa": self.cfg.repa_weight} | plan

    def loss_counts(self, inputs: ImageInputs | None) -> dict[str, float]:
        n = float(len(inputs)) if inputs is not None else 0.0
        return {"flow": n, "repa": n if self.repa else 0.0}

    def pretrained_sources(self) -> dict[str, tuple[str, str]]:
        src = self.autoencoder.pretrained_source()
        return {"autoencoder": (f"model.heads.{self.name}.{src[0]}", src[1])} if src else {}

    # ---- training -----------------------------------------------------------------
    def draw(self, inputs: ImageInputs, generator: torch.Generator) -> dict[str, torch.Tensor]:
        n, f = len(inputs), self.cfg
        t = sample_t(n, f.logit_normal_mean, f.logit_normal_std, generator)
        noise = torch.randn((n, *self.latent_shape), generator=generator)
        if f.slot_times > 0:  # drawn after the noise: a config without slot times keeps its random stream
            m = self.grid**2
            # independent times, as Diffusion Forcing; drawing points of the staggered schedule itself (each
            # slot clean, in progress or noise) was tried and drew worse: 2000 steps on the trained generalist,
            # GenEval 0.51 (two objects 0.35) against 0.54 (0.50)
            own = sample_t(n * m, f.logit_normal_mean, f.logit_normal_std, generator).view(n, m)
            pick = torch.rand(n, generator=generator) < f.slot_times
            t = torch.where(pick[:, None], own, t[:, None].expand(n, m))
        return {"t": t, "noise": noise, **super().draw(inputs, generator)}

    def embed_latents(
        self,
        embeds: torch.Tensor,
        z_t: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor,
        time_mask: torch.Tensor,
        inputs: ImageInputs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, temb, skip = self.codec.embed(z_t, t)
        embeds = place(embeds, mask, tokens.flatten(0, 1), inputs, "generation images")
        if not inputs.placeholder:
            embeds = scatter_time(embeds, time_mask, time_token(temb))
        return embeds, skip, temb

    def embed(self, host: HeadHost, embeds: torch.Tensor, batch: Batch, inputs: ImageInputs, draws: dict):
        images = as_unit_float(inputs.images)
        with torch.no_grad():
            x1 = self.autoencoder.encode(images)
        x0 = draws.get("noise", torch.zeros_like(x1))
        t = draws.get("t", x1.new_zeros(len(x1)))
        mask = slot_mask(batch, inputs, self.vocab.gen)
        time_mask = slot_mask(batch, inputs, self.vocab.bog)
        z_t = interpolate(x1, x0, slot_map(t, self.grid, self.cell) if t.ndim == 2 else t)
        embeds, skip, temb = self.embed_latents(embeds, z_t, t, mask, time_mask, inputs)
        return embeds, FlowState(inputs, x1, x0, skip, temb, images, mask)

    def needs_hidden_states(self) -> bool:
        return self.repa

    def losses(self, host: HeadHost, hidden: torch.Tensor, decoder_out: DecoderOutput, state: FlowState) -> dict:
        inputs, m, d = state.inputs, self.grid**2, hidden.shape[-1]
        weight, n = loss_weight(inputs), len(inputs)
        v = self.codec.velocity(take_slots(hidden, state.mask, (m, d), inputs), state.skip, state.temb)
        per_image = (v.float() - target_velocity(state.x1, state.x0)).pow(2).flatten(1).mean(1)
        zero = hidden.new_zeros((), dtype=torch.float32)
        out = {"flow_sum": weight * per_image.sum(), "flow_count": zero + n, "flow_per_image": per_image.detach()}
        if self.repa:
            layer_h = decoder_out.hidden_states[self.cfg.repa_layer].reshape(hidden.shape)
            pred = self.repa_proj(take_slots(layer_h, state.mask, (m, d), inputs))
            with torch.no_grad():
                target = host.und_features(state.images)
            per_image_repa = -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(1)
            out["repa_sum"], out["repa_count"] = weight * per_image_repa.sum(), zero + n
        return out

    @property
    def und_targets_per_image(self) -> int:
        """Understanding-tower passes per training image (REPA's targets), counted by mm.train.flops."""
        return 1 if self.repa else 0

    def costs(self, llm_out_needs_grad: bool) -> dict[str, PartCost]:
        ae, d, g = self.cfg.autoencoder, self.codec.llm_width, self.grid
        fwd = {
            "autoencoder": forward_flops(self.autoencoder.encode, (1, ae.image_channels, ae.image_size, ae.image_size))
        }
        bwd = {"autoencoder": 0.0}  # frozen, under no_grad
        for part, (f, b) in self.codec.costs(self.latent_shape, g, llm_out_needs_grad).items():
            fwd[part], bwd[part] = f, b
        if self.repa:
            fwd["repa_proj"] = forward_flops(self.repa_proj, (1, g * g, d))
            bwd["repa_proj"] = float(trains(self.repa_proj)) + float(llm_out_needs_grad)
        return {k: PartCost(fwd[k], bwd[k]) for k in fwd}

    def trains_before_llm(self) -> bool:
        return self.codec.trains_before_llm()

    # ---- sampling -----------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        host: HeadHost,
        prompts: list[str],
        generator: torch.Generator | None = None,
        cfg_scale: float | None = None,
        steps: int | None = None,
        use_cache: bool = True,
        noise: torch.Tensor | None = None,
        plans: list[str] | None = None,
    ) -> torch.Tensor:
        """Text -> [0,1] images with the Euler sampler and classifier-free guidance.

        ``plans``: per prompt, the text the model wrote before drawing (``UnifiedModel.plan``); it joins the
        prompt (and leaves the unconditional rows with it). None: no plan.

        The prompt prefix (conditional and unconditional rows together; at ``cfg_scale`` 1 only the
        conditional ones, whose velocity is then the guided one) runs through the LLM once;
        each step feeds only the time token and the latent tokens against that KV cache without
        extending it. ``use_cache=False`` recomputes the whole sequence every step (the reference the
        cached path is tested against).
        """
        cfg_scale = self.cfg.cfg_scale if cfg_scale is None else cfg_scale
        steps = self.cfg.sample_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"flow sampling needs steps >= 1, got {steps}")
        dev, n, m = host.device, len(prompts), self.grid**2
        if plans is not None and len(plans) != n:
            raise ValueError(f"flow generate: {len(plans)} plans for {n} prompts")
        cond = [image_generation_sample(self.vocab, self.template, None, p, plan=None if plans is None else plans[i])
                for i, p in enumerate(prompts)]  # fmt: skip
        guided = cfg_scale != 1.0  # w = 1 is the conditional velocity alone: no unconditional rows to run
        rows = cond + unconditional(cond, self.vocab.pad) if guided else cond
        batch = left_padded(rows, self.vocab.pad).to(dev)
        ids, pos, kinds = batch.input_ids, batch.position_ids, batch.token_kinds
        prefix = ids.shape[1] - (m + 1)  # everything before <begin_of_generation>
        spec = batch.attention()
        text_embeds = host.embed_tokens(ids)
        gen_mask, time_mask = ids == self.vocab.gen, ids == self.vocab.bog
        inputs = ImageInputs(text_embeds.new_zeros(0), batch.sample_ids.new_zeros(0))
        cache = None
        if use_cache:
            cache = KVCache()
            host.decode(text_embeds[:, :prefix], pos[:, :prefix], AttentionSpec.packed(batch.sample_ids[:, :prefix]),
                        kinds[:, :prefix], cache=cache)  # fmt: skip
            sid, q_idx = batch.sample_ids[:, prefix:], spec.q_index[:, prefix:]
            blocks = None if spec.q_blocks is None else spec.q_blocks[:, prefix:]
            # the step's tokens read the prefix, are not kept
            step_spec = AttentionSpec(sid, sid, q_idx, q_idx, blocks, blocks)

        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            z2, t2 = (torch.cat([z, z]), torch.cat([t, t]).to(dev)) if guided else (z, t.to(dev))
            embeds, skip, temb = self.embed_latents(text_embeds, z2, t2, gen_mask, time_mask, inputs)
            if use_cache:
                h = host.decode(embeds[:, prefix:], pos[:, prefix:], step_spec, kinds[:, prefix:], cache=cache,
                                write_cache=False).last_hidden_state  # fmt: skip
            else:
                h = host.decode(embeds, pos, spec, kinds).last_hidden_state[:, prefix:]
            v = self.codec.velocity(h[:, 1:], skip, temb)  # h[:, 0] is the time token
            return cfg_combine(v[:n], v[n:], cfg_scale) if guided else v

        if noise is None:
            noise = torch.randn((n, *self.latent_shape), generator=generator)
        if self.cfg.stagger:
            times = staggered_times(steps, m, self.cfg.stagger)
            latents = euler_sample_slots(velocity, noise.to(dev), times, lambda v: slot_map(v, self.grid, self.cell))
        else:
            latents = euler_sample(velocity, noise.to(dev), steps)
        return self.autoencoder.decode(latents)


def repa_grid_error(name: str, cfg: FlowHeadConfig, und_grid: int) -> str:
    """REPA compares each generation token with the understanding token at the same place: the grids must match.
    The message gives the numbers and the values of the keys that would make them match."""
    ae, patch, key = cfg.autoencoder, cfg.codec.patch_size, f"model.heads.{name}"
    grid = ae.image_size // ae.downsample // patch
    fixes = [f"{key}.autoencoder.image_size={und_grid * ae.downsample * patch}"]
    if (ae.image_size // ae.downsample) % und_grid == 0:
        fixes.append(f"{key}.codec.patch_size={ae.image_size // ae.downsample // und_grid}")
    fixes.append(f"{key}.repa_weight=0 (no REPA)")
    return (
        f"REPA needs the generation token grid ({grid}x{grid}: {key}.autoencoder.image_size={ae.image_size} / the "
        f"autoencoder's downsample {ae.downsample} / {key}.codec.patch_size={patch}) to equal the understanding "
        f"tower's ({und_grid}x{und_grid}: model.und.tower image_size / patch_size); set " + ", or ".join(fixes)
    )


def scatter_time(embeds: torch.Tensor, time_mask: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """JanusFlow's time token: the time embedding at each image's <begin_of_generation> slot."""
    return scatter_placeholders(embeds, time_mask, temb, "time tokens")
