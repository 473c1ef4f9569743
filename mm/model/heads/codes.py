"""Heads that predict the codes of a frozen frequency-band tokenizer (``mm/model/freq_tokenizer.py``).

``nextfreq`` (NFIG, next-frequency image generation): the image is the tokenizer's stages from low to
high frequency, ``prompt <begin_of_image> [stage 1] ... [stage n] <end_of_image>``. As in VAR, the
inputs of stage k+1's slots are the upsampled sum of stages 1..k sampled on stage k+1's grid (teacher
forcing from the image's own codes in training); stage 1's slots hold a learned start vector. Each
slot's output predicts its own code (cross-entropy over the codebook). Attention inside the image is
block-causal: a stage's slots see each other and every earlier stage, nothing later. Sampling runs one
LLM pass per stage and draws all of a stage's codes at once: n passes per image (the prompt's prefill
is the first stage's pass).

``raster``: the baseline of Janus/LlamaGen on the same tokenizer (its single-scale mode: one code per
cell of the finest s_n x s_n grid), causal, one code per pass: slot i holds the embedding of code i-1
(slot 1 the start vector) and predicts code i, so s_n^2 passes per image.

Both heads are one implementation: a head is a sequence of blocks (NFIG: one block per stage; raster:
s_n^2 blocks of one token) and two hooks, the inputs of block k+1 given the codes of block k, and the
images from all codes. Classifier-free guidance: prompts are dropped (pad) in training; sampling
mixes conditional and unconditional logits, u + w (c - u), with w constant or growing linearly from 1
at the first block to ``cfg_scale`` at the last (VAR).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
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
from mm.model.image_tokenizers import ImageTokenizerConfig, load_image_tokenizer
from mm.profiling import forward_flops
from mm.schema import ConfigError
from mm.sequence import ImageTemplate, image_generation_sample

# w_k of block k of n: constant, or VAR's linear ramp (no guidance on the first block, full on the last)
CFG_SCHEDULES: dict[str, Callable[[float, int, int], float]] = {
    "constant": lambda w, k, n: w,
    "linear": lambda w, k, n: 1.0 + (w - 1.0) * k / max(1, n - 1),
}


@dataclass
class CodeHeadConfig:
    """A head that predicts the codes of a frozen image tokenizer: ``nextfreq`` (NFIG: one forward pass per
    frequency stage) or ``raster`` (one code per pass)."""

    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    loss_weight: float = 1.0
    prompt_dropout: float = 0.1  # share of prompts replaced by pad (CFG)
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    cfg_scale: float = 2.0  # logits = u + w (c - u); 1 = no guidance
    cfg_schedule: str = "constant"  # key of CFG_SCHEDULES: constant | linear (VAR)

    def __post_init__(self) -> None:
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ConfigError(f"code head cfg_schedule={self.cfg_schedule!r}; known: {sorted(CFG_SCHEDULES)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("code head: temperature must be > 0, top_p in (0, 1], top_k >= 0")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"code head prompt_dropout={self.prompt_dropout} must be in [0, 1)")


def sample_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one code per row of ``logits`` [..., V] after temperature, top-k and top-p (nucleus) cuts."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # the most likely code always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1]).cpu()  # a CPU generator draws on CPU
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]).to(logits.device)


@dataclass
class CodeState:
    inputs: ImageInputs
    codes: torch.Tensor  # [N, T] targets
    mask: torch.Tensor


class CodeHead(ImageHead):
    Config = CodeHeadConfig
    kind: str  # the sampler's name in recipes
    single_scale: bool = False  # raster: the tokenizer's single-scale codes

    def __init__(self, name: str, cfg: CodeHeadConfig, ctx: HeadContext):
        super().__init__(name, cfg, ctx)
        # frozen; its weights load from cfg.tokenizer.path (or, in a release, from the release's weights)
        self.tokenizer = load_image_tokenizer(cfg.tokenizer, f"model.heads.{name}.tokenizer")
        self.blocks = self.block_sizes(self.tokenizer)
        d = ctx.hidden_size
        self.in_proj = nn.Linear(self.tokenizer.code_dim, d)
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        # which slot (stage and cell) a token is: RoPE alone orders slots but does not say where a stage begins
        self.slot_embed = nn.Parameter(torch.randn(sum(self.blocks), d) * 0.02)
        self.out = nn.Linear(d, self.tokenizer.codebook_size)
        tok = self.tokenizer
        self.template = ImageTemplate(
            name, tok.image_size, tok.image_channels, self.blocks, full_blocks=not self.single_scale, begin="boi",
            end=True,
        )  # fmt: skip
        starts = [0]
        for b in self.blocks:
            starts.append(starts[-1] + b)
        self.starts = starts

    @classmethod
    def recipe(cls, cfg: CodeHeadConfig) -> dict:
        return {"sampler": cls.kind, "cfg_scale": cfg.cfg_scale, "cfg_schedule": cfg.cfg_schedule,
                "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                "cfg_rule": "u + w(c - u) on logits"}  # fmt: skip

    @staticmethod
    @abstractmethod
    def block_sizes(tok: nn.Module) -> tuple[int, ...]:
        """Tokens per block (one LLM pass each when sampling): NFIG's stages, raster's single codes."""

    @property
    def tokens_per_image(self) -> int:
        return self.starts[-1]

    @property
    def passes_per_image(self) -> int:
        return len(self.blocks)

    def loss_weights(self) -> dict[str, float]:
        return {self.name: self.cfg.loss_weight}

    def loss_counts(self, inputs: ImageInputs | None) -> dict[str, float]:
        return {self.name: float(len(inputs) * self.tokens_per_image) if inputs is not None else 0.0}

    def pretrained_sources(self) -> dict[str, tuple[str, str]]:
        path = self.cfg.tokenizer.path
        return {"tokenizer": (f"model.heads.{self.name}.tokenizer.path", path)} if path else {}

    def costs(self, llm_out_needs_grad: bool) -> dict[str, PartCost]:
        d, t = self.in_proj.out_features, self.tokens_per_image
        out_bwd = float(self.out.weight.requires_grad) + float(llm_out_needs_grad)
        return {
            "in_proj": PartCost(forward_flops(self.in_proj, (1, t, self.tokenizer.code_dim)), 1.0),
            "out": PartCost(forward_flops(self.out, (1, t, d)), out_bwd),
        }

    def trains_before_llm(self) -> bool:
        return self.in_proj.weight.requires_grad

    # ---- codes <-> slot inputs: what NextFreqHead and RasterHead each define ---------------------
    @abstractmethod
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[0,1] images -> codes of each block [N, block size]."""

    @abstractmethod
    def block_vectors(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Teacher forcing: the code-space inputs of blocks 2..n [N, T - blocks[0], D] from the codes."""

    @abstractmethod
    def begin_sampling(self, n: int, device: torch.device) -> object:
        """The sampler's state before block 1 (what :meth:`advance` and :meth:`images` read)."""

    @abstractmethod
    def advance(self, state: object, k: int, codes_k: torch.Tensor) -> tuple[object, torch.Tensor | None]:
        """Block k's sampled codes [N, size] -> (state, code-space inputs of block k+1 or None)."""

    @abstractmethod
    def images(self, state: object) -> torch.Tensor:
        """The finished sampler state -> [0,1] images."""

    def slot_inputs(self, vectors: torch.Tensor | None, first: int, n: int) -> torch.Tensor:
        """LLM-width inputs of the slots from ``first`` on: the start vector in block 1, else projected vectors."""
        parts = []
        n0 = self.blocks[0]
        if first < n0:
            parts.append(self.start.expand(n, n0 - first, -1))
        if vectors is not None:
            parts.append(self.in_proj(vectors.to(self.in_proj.weight.dtype)))
        x = torch.cat(parts, 1)
        return x + self.slot_embed[first : first + x.shape[1]]

    # ---- training -----------------------------------------------------------------
    def embed(self, host: HeadHost, embeds: torch.Tensor, batch: Batch, inputs: ImageInputs, draws: dict):
        images = as_unit_float(inputs.images)
        with torch.no_grad():
            codes = self.encode(images)
        x = self.slot_inputs(self.block_vectors(codes), 0, len(images))
        mask = slot_mask(batch, inputs, self.vocab.gen)
        embeds = place(embeds, mask, x.flatten(0, 1), inputs, f"{self.name} image tokens")
        return embeds, CodeState(inputs, torch.cat(codes, 1), mask)

    def losses(self, host: HeadHost, hidden: torch.Tensor, decoder_out: DecoderOutput, state: CodeState) -> dict:
        k, (n, t) = self.name, state.codes.shape
        h = take_slots(hidden, state.mask, (t, hidden.shape[-1]), state.inputs)
        logits = self.out(h).float().flatten(0, 1)
        per_token = F.cross_entropy(logits, state.codes.reshape(-1), reduction="none")
        zero = hidden.new_zeros((), dtype=torch.float32)
        per_image = per_token.view(n, t).mean(1)
        count = len(state.inputs) * t
        return {
            f"{k}_sum": loss_weight(state.inputs) * per_token.sum(), f"{k}_count": zero + count,
            f"{k}_per_image": per_image.detach(),
            f"{k}_accuracy": (logits.argmax(-1) == state.codes.reshape(-1)).float().mean().detach(),
        }  # fmt: skip

    # ---- sampling -----------------------------------------------------------------
    @torch.no_grad()
    def sample_codes(
        self,
        host: HeadHost,
        prompts: list[str],
        generator: torch.Generator | None = None,
        cfg_scale: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
    ) -> tuple[object, list[torch.Tensor], list[torch.Tensor]]:
        """(sampler state, codes per block [N, size], guided logits per block [N, size, V]).

        One LLM pass per block: the first runs the prompt and block 1's slots (prefill, into a KV
        cache), each later one only that block's slots against the cache. ``use_cache=False``
        recomputes the sequence so far every block (the reference the cached path is tested against).
        """
        c = self.cfg
        w = c.cfg_scale if cfg_scale is None else cfg_scale
        schedule = CFG_SCHEDULES[cfg_schedule or c.cfg_schedule]
        temperature = c.temperature if temperature is None else temperature
        top_k = c.top_k if top_k is None else top_k
        top_p = c.top_p if top_p is None else top_p
        dev = host.device
        n = len(prompts)
        guided = w != 1.0
        cond = [image_generation_sample(self.vocab, self.template, None, p) for p in prompts]
        rows = cond + unconditional(cond, self.vocab.pad) if guided else cond
        batch = left_padded(rows, self.vocab.pad).to(dev)
        ids, pos, kinds = batch.input_ids, batch.position_ids, batch.token_kinds
        spec = batch.attention()
        first = ids.shape[1] - 1 - self.tokens_per_image  # the first slot (<end_of_image> closes the row)
        seq = host.embed_tokens(ids[:, :first])  # grows by one block per pass
        cache = KVCache() if use_cache else None
        state = self.begin_sampling(n, dev)
        vectors, all_codes, all_logits = None, [], []
        for k, size in enumerate(self.blocks):
            a, b = first + self.starts[k], first + self.starts[k + 1]
            x = self.slot_inputs(vectors, self.starts[k], n)
            x = torch.cat([x, x]) if guided else x
            seq = torch.cat([seq, x.to(seq.dtype)], 1)
            q0 = (0 if k == 0 else a) if use_cache else 0
            # this pass's queries (the block, after the prompt on the first pass); the cache holds the rest
            step = _slice_spec(spec, q0, b)
            h = host.decode(seq[:, q0:b], pos[:, q0:b], step, kinds[:, q0:b], cache=cache).last_hidden_state
            h = h[:, -size:]
            logits = self.out(h).float()
            if guided:
                wk = schedule(w, k, len(self.blocks))
                logits = logits[n:] + wk * (logits[:n] - logits[n:])
            codes_k = sample_logits(logits, temperature, top_k, top_p, generator)
            state, vectors = self.advance(state, k, codes_k)
            all_codes.append(codes_k)
            all_logits.append(logits)
        return state, all_codes, all_logits

    @torch.no_grad()
    def generate(
        self, host: HeadHost, prompts: list[str], generator: torch.Generator | None = None, **kwargs
    ) -> torch.Tensor:
        """Text -> [0,1] images; ``kwargs``: cfg_scale, cfg_schedule, temperature, top_k, top_p, use_cache."""
        state, _, _ = self.sample_codes(host, prompts, generator, **kwargs)
        return self.images(state)


@register_head("nextfreq")
class NextFreqHead(CodeHead):
    """NFIG: one block per frequency stage, full attention inside a stage."""

    kind = "nextfreq"
    single_scale = False

    @staticmethod
    def block_sizes(tok: nn.Module) -> tuple[int, ...]:
        return tuple(s * s for s in tok.stages)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [c.flatten(1) for c in self.tokenizer.encode(images)]

    def _grids(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c.view(c.shape[0], s, s) for c, s in zip(codes, self.tokenizer.stages)]

    def block_vectors(self, codes: list[torch.Tensor]) -> torch.Tensor | None:
        vecs = self.tokenizer.stage_inputs(self._grids(codes))
        return torch.cat(vecs, 1) if vecs else None

    def begin_sampling(self, n: int, device: torch.device) -> torch.Tensor:
        return self.tokenizer.empty_accumulator(n, device)

    def advance(self, state: torch.Tensor, k: int, codes_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.tokenizer.stages[k]
        return self.tokenizer.next_stage_input(state, codes_k.view(-1, s, s), k)

    def images(self, state: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_features(state)


@register_head("raster")
class RasterHead(CodeHead):
    """Raster-order baseline: the finest grid's single-scale codes, one causal token per pass."""

    kind = "raster"
    single_scale = True

    @staticmethod
    def block_sizes(tok: nn.Module) -> tuple[int, ...]:
        return (1,) * tok.feature_size**2

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.tokenizer.encode(images, single_scale=True)[0].flatten(1).split(1, dim=1))

    def block_vectors(self, codes: list[torch.Tensor]) -> torch.Tensor | None:
        flat = torch.cat(codes, 1)
        return self.tokenizer.code_embedding(flat[:, :-1]) if flat.shape[1] > 1 else None

    def begin_sampling(self, n: int, device: torch.device) -> list[torch.Tensor]:
        return []

    def advance(self, state: list, k: int, codes_k: torch.Tensor) -> tuple[list, torch.Tensor | None]:
        state = state + [codes_k]
        return state, self.tokenizer.code_embedding(codes_k)

    def images(self, state: list[torch.Tensor]) -> torch.Tensor:
        h = self.tokenizer.feature_size
        grid = torch.cat(state, 1).view(-1, h, h)
        return self.tokenizer.decode([grid], single_scale=True)


def _slice_spec(spec: AttentionSpec, a: int, b: int) -> AttentionSpec:
    """The self-attention spec of columns [a, b) (a KV cache supplies the keys before ``a``)."""
    cut = lambda t: None if t is None else t[:, a:b]  # noqa: E731
    seg, idx = spec.q_segments[:, a:b], spec.q_index[:, a:b]
    return AttentionSpec(seg, seg, idx, idx, cut(spec.q_blocks), cut(spec.k_blocks), self_attention=True)
