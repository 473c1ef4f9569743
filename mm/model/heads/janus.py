"""Janus's image generation (Janus, Janus-Pro): raster-order VQ codes predicted by the LLM, one per pass.

Parts, named as transformers' ``JanusModel`` names them (the converter renames only the prefix):

* ``tokenizer``: the frozen VQ-16 tokenizer (``janus_vq``: transformers' ``JanusVQVAE``);
* ``generation_embeddings``: codebook size x 8 code embeddings (not the tokenizer's codebook);
* ``generation_aligner``: an MLP from 8 to the LLM width (``fc1``, then GELU + ``hidden_layers``);
* ``generation_head``: Linear -> GELU -> Linear over the codebook (``proj_out``, ``vision_head``).

Layout: ``... <begin_of_image> [code 1] ... [code n] <end_of_image>``. The hidden state at
``<begin_of_image>`` predicts code 1, the one at code i's slot (its aligned embedding) predicts code i+1.
Sampling runs the prompt once (prefill, which gives code 1), then one pass per code against a KV cache.
Classifier-free guidance mixes the logits, u + w (c - u), as Janus does; the unconditional prompt is
the conditional one with its prompt text replaced by pad (prompt dropout in training). With
``prompt_format`` set, prompts are written in Janus's own format, in training as in sampling, and the
unconditional row (and a dropped prompt in training) pads every token but the first and the last (<bos> and
<begin_of_image>), as Janus's reference and transformers do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mm.batch import Batch, ImageInputs, left_padded
from mm.images import as_unit_float
from mm.kernels.attention import AttentionSpec
from mm.model.decoder import DecoderOutput, KVCache
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
from mm.model.heads.codes import sample_logits
from mm.model.image_tokenizers import ImageTokenizerConfig, load_image_tokenizer
from mm.profiling import forward_flops, trains
from mm.schema import ConfigError
from mm.sequence import IGNORE, TASK_GEN, TOKEN_GEN_IMAGE, ImageTemplate, Sample, image_generation_sample


@dataclass
class JanusHeadConfig:
    """Janus's VQ-code head: its tokenizer (``kind: janus_vq``), sampling defaults and prompt format."""

    tokenizer: ImageTokenizerConfig = field(default_factory=lambda: ImageTokenizerConfig(kind="janus_vq"))
    loss_weight: float = 1.0
    prompt_dropout: float = 0.1  # share of prompts replaced by pad (CFG)
    temperature: float = 1.0
    top_k: int = 0  # 0 = no cut; 1 = greedy
    top_p: float = 1.0
    cfg_scale: float = 5.0  # Janus's default guidance
    # Janus's generation prompt, e.g. "<|User|>: {prompt}\n\n<|Assistant|>:", read after bos_token and
    # followed by <begin_of_image>; "" = our sequence template (mm.sequence.image_generation_sample)
    prompt_format: str = ""
    bos_token: str = ""  # the token before prompt_format; "" = the vocab's bos (the tokenizer's own where it has one)
    pad_token: str = ""  # the unconditional prompt's filler; "" = the vocab's pad (the tokenizer's own, else ours)

    def __post_init__(self) -> None:
        if self.tokenizer.kind != "janus_vq":
            raise ConfigError(f"model.heads.janus.tokenizer.kind={self.tokenizer.kind!r}; this head needs janus_vq")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("model.heads.janus: temperature must be > 0, top_p in (0, 1], top_k >= 0")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"model.heads.janus.prompt_dropout={self.prompt_dropout} must be in [0, 1)")
        if self.prompt_format and "{prompt}" not in self.prompt_format:
            raise ConfigError("model.heads.janus.prompt_format must contain {prompt}")


class GenerationAligner(nn.Module):
    """Janus's aligner MLP: fc1, then (GELU, Linear) per hidden layer."""

    def __init__(self, dim_in: int, dim: int, layers: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim)
        self.hidden_layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(1, layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(F.gelu(x))
        return x


class GenerationHead(nn.Module):
    def __init__(self, dim_in: int, dim: int, codebook: int):
        super().__init__()
        self.proj_out = nn.Linear(dim_in, dim)
        self.vision_head = nn.Linear(dim, codebook)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.proj_out(h)))


@dataclass
class JanusState:
    inputs: ImageInputs
    codes: torch.Tensor  # [N, n] targets
    pred_mask: torch.Tensor  # the positions that predict the codes: <begin_of_image> and slots 1..n-1


@register_head("janus")
class JanusHead(ImageHead):
    Config = JanusHeadConfig

    def __init__(self, name: str, cfg: JanusHeadConfig, ctx: HeadContext):
        super().__init__(name, cfg, ctx)
        self.tokenizer = load_image_tokenizer(cfg.tokenizer, f"model.heads.{name}.tokenizer")
        tok, d = self.tokenizer, ctx.hidden_size
        hf = tok.vq.config
        for key in ("projection_dim", "image_token_embed_dim"):
            if getattr(hf, key) != d:
                raise ConfigError(f"model.heads.{name}.tokenizer.config.hf_config.{key}={getattr(hf, key)} must equal "
                                  f"the LLM width {d}")  # fmt: skip
        self.generation_embeddings = nn.Embedding(tok.codebook_size, tok.embed_dim)
        self.generation_aligner = GenerationAligner(tok.embed_dim, d, int(hf.num_hidden_layers))
        self.generation_head = GenerationHead(d, d, tok.codebook_size)
        self.n = tok.grid**2
        self.template = ImageTemplate(name, tok.image_size, tok.image_channels, (1,) * self.n, begin="boi", end=True,
                                      prompt_format=cfg.prompt_format, bos_token=cfg.bos_token)  # fmt: skip

    @staticmethod
    def recipe(cfg: JanusHeadConfig) -> dict:
        return {"sampler": "raster", "cfg_scale": cfg.cfg_scale, "temperature": cfg.temperature, "top_k": cfg.top_k,
                "top_p": cfg.top_p, "cfg_rule": "u + w(c - u) on logits"}  # fmt: skip

    @property
    def passes_per_image(self) -> int:
        return self.n  # the prefill gives code 1, then one pass per further code

    def loss_weights(self) -> dict[str, float]:
        return {self.name: self.cfg.loss_weight}

    def loss_counts(self, inputs: ImageInputs | None) -> dict[str, float]:
        return {self.name: float(len(inputs) * self.n) if inputs is not None else 0.0}

    def pretrained_sources(self) -> dict[str, tuple[str, str]]:
        path = self.cfg.tokenizer.path
        return {"tokenizer": (f"model.heads.{self.name}.tokenizer.path", path)} if path else {}

    def costs(self, llm_out_needs_grad: bool) -> dict[str, PartCost]:
        d, n, t = self.generation_head.proj_out.in_features, self.n, self.tokenizer
        out_bwd = float(trains(self.generation_head)) + float(llm_out_needs_grad)
        return {
            "generation_aligner": PartCost(
                forward_flops(self.generation_aligner, (1, n, t.embed_dim)), float(trains(self.generation_aligner))
            ),  # fmt: skip
            "generation_head": PartCost(forward_flops(self.generation_head, (1, n, d)), out_bwd),
        }

    def trains_before_llm(self) -> bool:
        return trains(self.generation_embeddings) or trains(self.generation_aligner)

    def code_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, k] -> the LLM inputs of their slots [N, k, D]."""
        return self.generation_aligner(self.generation_embeddings(codes))

    # ---- training -----------------------------------------------------------------
    def embed(self, host: HeadHost, embeds: torch.Tensor, batch: Batch, inputs: ImageInputs, draws: dict):
        with torch.no_grad():
            codes = self.tokenizer.encode(as_unit_float(inputs.images))
        mask = slot_mask(batch, inputs, self.vocab.gen)
        embeds = place(embeds, mask, self.code_inputs(codes).flatten(0, 1), inputs, f"{self.name} image tokens")
        pred = torch.zeros_like(mask)
        pred[:, :-1] = mask[:, 1:]  # each slot's code is predicted one position earlier (<boi> predicts code 1)
        return embeds, JanusState(inputs, codes, pred)

    def losses(self, host: HeadHost, hidden: torch.Tensor, decoder_out: DecoderOutput, state: JanusState) -> dict:
        k, (n, t) = self.name, state.codes.shape
        h = take_slots(hidden, state.pred_mask, (t, hidden.shape[-1]), state.inputs)
        logits = self.generation_head(h).float().flatten(0, 1)
        per_token = F.cross_entropy(logits, state.codes.reshape(-1), reduction="none")
        zero = hidden.new_zeros((), dtype=torch.float32)
        return {
            f"{k}_sum": loss_weight(state.inputs) * per_token.sum(), f"{k}_count": zero + len(state.inputs) * t,
            f"{k}_per_image": per_token.view(n, t).mean(1).detach(),
            f"{k}_accuracy": (logits.argmax(-1) == state.codes.reshape(-1)).float().mean().detach(),
        }  # fmt: skip

    # ---- prompts ------------------------------------------------------------------
    def prompt_rows(self, prompts: list[str], guided: bool) -> list[Sample]:
        """Prefix rows (everything up to and including <begin_of_image>), conditional then unconditional: the
        training layout (``image_generation_sample``: Janus's ``prompt_format`` when set) without the slots; the
        unconditional row pads the prompt as prompt dropout does in training (with ``prompt_format``: every token
        between <bos> and <begin_of_image>, as Janus's reference and transformers do)."""
        v = self.vocab
        cond = []
        for p in prompts:
            s = image_generation_sample(v, self.template, None, p)
            cut = len(s) - self.n - 1  # drop the slots and <end_of_image>
            cond.append(Sample(s.input_ids[:cut], [IGNORE] * cut, TASK_GEN, prompt_mask=s.prompt_mask[:cut],
                               token_kinds=s.token_kinds[:cut], head=self.name))  # fmt: skip
        pad = v.tokenizer.convert_tokens_to_ids(self.cfg.pad_token) if self.cfg.pad_token else v.pad
        return cond + unconditional(cond, pad) if guided else cond

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """The conditional prefix token ids of ``prompts`` (what the LLM reads before code 1)."""
        return [s.input_ids for s in self.prompt_rows(prompts, guided=False)]

    # ---- sampling -----------------------------------------------------------------
    def code_logits(self, host: HeadHost, rows: Batch, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing without a cache: prefix rows + the slots of ``codes`` [B, k] -> logits [B, k+1, V]
        (position j predicts code j+1; the last predicts the code after ``codes``)."""
        k = codes.shape[1]
        ids, pos, sid = rows.input_ids, rows.position_ids, rows.sample_ids
        prefix = host.embed_tokens(ids)
        embeds = torch.cat([prefix, self.code_inputs(codes).to(prefix.dtype)], 1)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, k + 1, device=pos.device)], 1)
        sid = torch.cat([sid, sid[:, -1:].clamp(min=0).expand(-1, k)], 1)
        kinds = torch.cat([rows.token_kinds, torch.full_like(sid[:, :k], TOKEN_GEN_IMAGE, dtype=torch.int8)], 1)
        h = host.decode(embeds, pos, AttentionSpec.packed(sid), kinds).last_hidden_state
        return self.generation_head(h[:, -(k + 1) :]).float()

    @torch.no_grad()
    def sample_codes(
        self,
        host: HeadHost,
        prompts: list[str],
        generator: torch.Generator | None = None,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, n], guided logits [N, n, V]). The prompt runs once into a KV cache (its last position
        gives code 1), then each code's slot is one pass; ``use_cache=False`` recomputes everything per code."""
        c = self.cfg
        w = c.cfg_scale if cfg_scale is None else cfg_scale
        temperature = c.temperature if temperature is None else temperature
        top_k, top_p = (c.top_k if top_k is None else top_k), (c.top_p if top_p is None else top_p)
        n, guided = len(prompts), w != 1.0
        rows = left_padded(self.prompt_rows(prompts, guided), self.vocab.pad).to(host.device)
        cache = KVCache() if use_cache else None
        h = host.decode(host.embed_tokens(rows.input_ids), rows.position_ids, rows.attention(), rows.token_kinds,
                        cache=cache).last_hidden_state[:, -1:]  # fmt: skip
        sid, idx, pos = (
            rows.sample_ids[:, -1:].clamp(min=0),
            rows.attention().q_index[:, -1:],
            rows.position_ids[:, -1:],
        )
        kinds = torch.full_like(sid, TOKEN_GEN_IMAGE, dtype=torch.int8)
        codes, all_logits = [], []
        for step in range(self.n):
            if step and use_cache:  # the last code's slot against the cache
                prev = torch.cat([codes[-1], codes[-1]]) if guided else codes[-1]
                idx, pos = idx + 1, pos + 1
                spec = AttentionSpec(sid, sid, idx, idx, self_attention=True)
                h = host.decode(self.code_inputs(prev), pos, spec, kinds, cache=cache).last_hidden_state
            if step and not use_cache:  # the reference: prefix and every code so far again
                so_far = torch.cat(codes, 1)
                logits = self.code_logits(host, rows, torch.cat([so_far, so_far]) if guided else so_far)[:, -1:]
            else:
                logits = self.generation_head(h).float()
            if guided:
                logits = logits[n:] + w * (logits[:n] - logits[n:])
            codes.append(sample_logits(logits, temperature, top_k, top_p, generator))
            all_logits.append(logits)
        return torch.cat(codes, 1), torch.cat(all_logits, 1)

    @torch.no_grad()
    def generate(
        self, host: HeadHost, prompts: list[str], generator: torch.Generator | None = None, **kwargs
    ) -> torch.Tensor:
        """Text -> [0,1] images; ``kwargs``: cfg_scale, temperature, top_k, top_p, use_cache."""
        codes, _ = self.sample_codes(host, prompts, generator, **kwargs)
        return self.tokenizer.decode(codes)
