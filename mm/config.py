"""Typed configuration schemas.

Every field has a type and a default here; YAML files in ``configs/`` and
``a.b=c`` command-line overrides only change values. OmegaConf's structured
mode rejects unknown keys and wrong types at load time, naming the key, so a
typo fails at start instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


@dataclass
class UndEncoderConfig:
    """Understanding encoder: a vision tower + aligner into the LLM width."""

    kind: str = "open_clip"  # key of mm.model.vision.UND_ENCODERS
    # open_clip: either an architecture built from the fields below, or a named
    # open_clip architecture (``open_clip_arch``) with weights from a local file.
    open_clip_arch: str = ""
    weights: str = ""  # local path (open_clip checkpoint file or HF directory); "" = random init
    image_size: int = 8
    patch_size: int = 2
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 2.0
    in_channels: int = 3
    mean: float = 0.5  # per-channel pixel normalisation applied to [0,1] images
    std: float = 0.5
    aligner_layers: int = 2  # 1 = Linear (JanusFlow), 2 = Linear-GELU-Linear (Janus)
    freeze: bool = False


@dataclass
class AutoencoderConfig:
    """Latent autoencoder of the generation path (frozen)."""

    kind: str = "identity"  # key of mm.model.autoencoder.AUTOENCODERS
    path: str = ""  # local diffusers AutoencoderKL directory for kind=diffusers_kl
    image_size: int = 8  # pixel size of generated images
    image_channels: int = 1
    latent_channels: int = 1
    downsample: int = 1  # pixels per latent cell
    scaling_factor: float = 1.0  # overridden by the VAE's own config when loaded
    dtype: str = "float32"  # SDXL-VAE overflows in fp16: use bfloat16 or float32


@dataclass
class GenCodecConfig:
    """ConvNeXt-v2 generation encoder/decoder with FiLM time conditioning."""

    channels: int = 64
    patch_size: int = 2
    encoder_blocks: int = 1
    decoder_blocks: int = 1
    time_freq_dim: int = 64  # sinusoidal embedding width of t*1000


@dataclass
class LLMConfig:
    """Autoregressive backbone from ``transformers``."""

    pretrained: str = ""  # local directory for from_pretrained; "" = from_config
    model_type: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    vocab_size: int = 0  # embedding rows; 0 = the tokenizer's size (must be >= it otherwise)
    attn_implementation: str = (
        "sdpa"  # key of mm.kernels.attention.ATTENTION_BACKENDS: sdpa | eager | flex | flash_attention_2
    )
    tokenizer: str = "configs/tokenizers/digits"  # local directory (tokenizer.json)


@dataclass
class FlowConfig:
    """Rectified-flow head (t=0 noise, t=1 data, z_t = t*x1 + (1-t)*x0)."""

    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    prompt_dropout: float = 0.1  # share of prompts replaced by pad (CFG)
    sample_steps: int = 30
    cfg_scale: float = 2.0
    repa_layer: int = 2  # LLM hidden state after this many blocks
    repa_weight: float = 1.0
    repa_hidden: int = 256


@dataclass
class FreqTokenizerConfig:
    """Frequency-band image tokenizer (NFIG's FR-VAE), ``mm.model.freq_tokenizer``; trained by
    ``scripts/train_tokenizer.py``. Defaults are the tiny digits tokenizer (8x8 grey -> 4x4 map)."""

    image_size: int = 8
    image_channels: int = 1
    channels: tuple[int, ...] = (64, 128)  # conv widths per resolution level, finest first; len - 1 = 2x downsamples
    blocks_per_level: int = 1  # residual blocks per level (encoder and decoder)
    code_dim: int = 16  # channels of the feature map = width of a code vector
    codebook_size: int = 256  # one codebook shared by every stage (and by single-scale mode)
    stages: tuple[int, ...] = (1, 2, 4)  # s_1..s_n: stage i has s_i x s_i tokens; s_n = side of the feature map
    residual_scope: str = "cumulative"  # key of freq_tokenizer.RESIDUAL_SCOPES
    lookup: str = "cosine"  # key of freq_tokenizer.CODE_LOOKUPS (cosine = l2-normalised matching)
    commitment: float = 0.25  # beta of ||f - sg(f_hat_k)||^2
    ema_decay: float = 0.99  # codebook EMA (k-means) decay
    dead_code_threshold: float = 1.0  # EMA assignments per step below which a code is restarted

    def __post_init__(self) -> None:
        s = list(self.stages)
        if not s or s[0] < 1 or any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"tokenizer stages must be strictly increasing positive sizes, got {s}")
        levels = len(self.channels)
        if levels < 1 or self.image_size % 2 ** (levels - 1) or self.image_size // 2 ** (levels - 1) != s[-1]:
            raise ValueError(
                f"tokenizer: image_size={self.image_size} with {levels} levels ({levels - 1} 2x downsamples) gives a "
                f"{self.image_size / 2 ** (levels - 1):g} map, but the last stage is {s[-1]}; they must be equal"
            )
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("tokenizer: codebook_size must be >= 2 and code_dim >= 1")


@dataclass
class MoDConfig:
    """p-MoD mixture-of-depths: routed layers skip low-scoring tokens of the routable kinds.

    Layer l of L keeps ``ratio_l = cos(l*pi/(L-1))/2 + 0.5 + shift`` of each sample's routable
    tokens (shifted cosine); layers with a ratio above ``dense_above`` stay dense; ratios clamp at
    ``min_ratio``. ``enabled=False`` (or every ratio 1.0) is the dense model exactly.
    """

    enabled: bool = False
    routable_kinds: tuple[str, ...] = ("und_image",)  # keys of mm.sequence.TOKEN_KINDS
    dense_above: float = 0.85
    min_ratio: float = 0.15
    shift: float = 0.0  # added to the cosine before clamping (the paper: 0)
    ratio: float = 0.0  # > 0: one fixed ratio for every layer instead of the schedule (tests, ablations)
    tanh_scale: float = 0.2  # TanhNorm: w = tanh_scale * tanh(r) + 1


@dataclass
class V2PEConfig:
    """V2PE: tokens of one image advance the position by delta (mm/model/positions.py).

    Training draws delta per image from ``train_deltas``; evaluation and inference use
    ``infer_delta``. ``enabled=False`` is the standard 0, 1, 2, ... positions.
    """

    enabled: bool = False
    kinds: tuple[str, ...] = ("und_image",)  # keys of mm.sequence.TOKEN_KINDS
    train_deltas: tuple[float, ...] = tuple(1.0 / 2**i for i in range(9))  # 1, 1/2, ..., 1/256
    infer_delta: float = 0.25


@dataclass
class CodeHeadConfig:
    """A head that predicts the codes of a frozen ``FreqTokenizer`` (``mm/model/heads/codes.py``):
    ``nextfreq`` (NFIG: one forward pass per frequency stage) or ``raster`` (one code per pass)."""

    tokenizer: str = "runs/tokenizer/tiny"  # FreqTokenizer.save_pretrained directory; "" = built from tokenizer_model
    build_config: str = ""  # scripts/train_tokenizer.py config that trains the tokenizer when the directory is missing
    tokenizer_model: FreqTokenizerConfig = field(default_factory=FreqTokenizerConfig)  # shapes when tokenizer == ""
    loss_weight: float = 1.0
    prompt_dropout: float = 0.1  # share of prompts replaced by pad (CFG)
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    cfg_scale: float = 2.0  # logits = u + w (c - u); 1 = no guidance
    cfg_schedule: str = "constant"  # key of mm.model.heads.codes.CFG_SCHEDULES: constant | linear (VAR)


@dataclass
class ModelConfig:
    und: UndEncoderConfig = field(default_factory=UndEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    gen: GenCodecConfig = field(default_factory=GenCodecConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)
    v2pe: V2PEConfig = field(default_factory=V2PEConfig)
    heads: list[str] = field(default_factory=lambda: ["flow"])  # keys of mm.model.heads.IMAGE_HEADS; first = default
    nextfreq: CodeHeadConfig = field(default_factory=CodeHeadConfig)
    raster: CodeHeadConfig = field(default_factory=CodeHeadConfig)
    text_loss_weight: float = 1.0
    flow_loss_weight: float = 1.0


@dataclass
class SourceConfig:
    """One training source: shards of one sample kind, mixed in by weight (data/sources.py, data/loader.py)."""

    name: str = "digits"
    # key of data.sources.SOURCE_KINDS: generation (the model's first image head), generation:<head>,
    # conversation or text
    kind: str = "conversation"
    shards: str = ""  # brace pattern, several joined by '::'; "" = data.train_shards
    weight: float = 1.0  # share of drawn samples (JanusFlow stage 2: und:gen:text = 14:80:6)
    resample: bool = False  # False: exact epochs; True: shards drawn with replacement (open-ended pretraining)


def _digits_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="digits_vqa", kind="conversation", weight=1.0),
        SourceConfig(name="digits_t2i", kind="generation", weight=1.0),
    ]


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=_digits_sources)
    train_shards: str = "data/shards/digits/train-{000000..000003}.tar"  # the shards of sources with shards: ""
    heldout_shards: str = "data/shards/digits/heldout-000000.tar"  # evaluation only
    build_if_missing: bool = True  # build the bundled digits shards on first run
    seq_len: int = 128  # tokens per packed row
    rows_per_batch: int = 8
    packer: str = "best_fit"  # key of data.pack.PACKERS
    pack_lookahead: int = 64  # samples the packer chooses from
    min_piece: int = 16  # a text document is cut only into pieces of at least this many tokens
    pack_slack: float = 0.02  # best_fit takes the oldest samples that fill a row within this share of the best fill
    loss_reduction: str = "token"  # token | sample (1/n) | square (1/sqrt n), per sample as InternVL
    shuffle_buffer: int = 512  # raw samples per source per worker
    num_workers: int = 2  # DataLoader worker processes per rank; 0 = read in the training process
    prefetch_factor: int = 4  # batches each worker keeps ready
    max_image_pixels: int = 64_000_000  # larger images are skipped as decompression bombs
    allow_shell_urls: bool = False  # allow 'pipe:COMMAND' shard URLs (they run shell commands)
    open_retries: int = 3  # a shard that cannot be opened is retried (backoff) then skipped
    retry_delay_s: float = 1.0
    skip_log_every_s: float = 60.0  # after the first skip of each reason, at most one summary line per interval
    # A DataLoader worker that produces no batch for this long (a stalled pipe: command, a hung mount) stops the run
    # with one line naming the rank, the worker and the shard it was reading; 0 waits forever.
    worker_timeout_s: float = 600.0
    seed: int = 0


@dataclass
class ParamGroupConfig:
    """Optimizer settings for the trainable parameters under some module prefixes (e.g. aligners vs LLM)."""

    modules: list[str] = field(default_factory=list)  # prefixes of UnifiedModel parameter names: und.aligner, llm
    lr: float = 0.0  # 0 = train.lr (the schedule scales every group alike)
    weight_decay: float = -1.0  # < 0 = train.weight_decay


@dataclass
class TrainConfig:
    max_steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # key of mm.train.trainer.LR_SCHEDULES
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each rank
    ema_decay: float = 0.0  # 0 disables the EMA of the trainable parameters
    # Stages: module-name prefixes of UnifiedModel to freeze (und.tower, llm, ...). A frozen module needs
    # weights to load (a local path in model.*, or init_from); modules the model freezes itself count too.
    frozen: list[str] = field(default_factory=list)
    param_groups: list[ParamGroupConfig] = field(default_factory=list)  # the rest trains at lr/weight_decay
    init_from: str = ""  # a checkpoint (or run) directory whose weights start this run (the previous stage)
    max_nonfinite_steps: int = 20  # NaN/inf loss or gradient: skip the step; stop after this many in a row
    log_every: int = 25
    metrics: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])  # mm.train.metrics.SINKS
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch default


@dataclass
class EngineConfig:
    """Who runs backward/step: torch DDP or DeepSpeed ZeRO (mm.train.engine.ENGINES)."""

    kind: str = "ddp"  # ddp | deepspeed
    precision: str = "fp32"  # key of mm.train.precision.PRECISIONS: fp32 | bf16_autocast | bf16 (DeepSpeed)
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # ZeRO stage and communication settings
    offload_optimizer: bool = False  # DeepSpeed: optimizer state and fp32 master weights in CPU memory
    activation_checkpointing: bool = False  # recompute the LLM layers in backward


@dataclass
class EvalConfig:
    """Benchmark evaluation (``eval.py``, ``mm/eval/harness.py``); tasks are YAML files (``mm/eval/tasks``)."""

    tasks: list[str] = field(default_factory=list)  # task or group names; [] = DEFAULT_TASKS of the harness
    task_dirs: list[str] = field(default_factory=list)  # extra folders of task YAMLs (the bundled one is always read)
    build_if_missing: bool = True  # build the bundled datasets (data/bench/<name>) on first use
    limit: int = 0  # documents per task; 0 = all
    images_per_prompt: int = 0  # generation tasks; 0 = each task's own generation_kwargs
    batch_size: int = 64  # questions (or images) per model call
    seed: int = 0  # generation noise: torch.Generator(seed + crc32(task))
    threads: int = 1  # torch intra-op threads; 0 = torch default. 1: on 2 shared cores the tiny benchmark took
    # 78-150 s with 1 thread and 400 s with 2 (other jobs running); raise it for big models evaluated on CPU
    grid_columns: int = 10
    inception_weights: str = ""  # local torchvision inception_v3 state dict (FID/KID); "" or missing = skipped
    clip_arch: str = "ViT-B-32"  # open_clip architecture of clip_weights
    clip_weights: str = ""  # local open_clip checkpoint (CLIP score); "" or missing = skipped


@dataclass
class RunConfig:
    name: str = "tiny"
    dir: str = ""  # "" = runs/<name>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def run_dir(self) -> Path:
        return resolve_path(self.run.dir or f"runs/{self.run.name}")


class ConfigError(ValueError):
    """A config file or override names an unknown key or has a wrong type."""


def resolve_path(path: str) -> Path:
    """Relative paths in configs are relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file (after its ``base`` files) <- dotlist overrides, validated.

    A YAML file may start with ``base: other.yaml`` (relative to itself): that file is
    applied first, so a stage config states only what differs from the model config.
    A wrong key or type raises a one-line :class:`ConfigError` naming the key, the
    file or the command line it came from, and the closest valid key.
    """
    merged = OmegaConf.structured(Config)
    layers: list[tuple[str, DictConfig]] = _yaml_layers(Path(path)) if path is not None else []
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(("the command line", OmegaConf.from_dotlist(overrides)))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:  # unknown key or wrong type
            raise ConfigError(_describe(e, source)) from None
    cfg: Config = OmegaConf.to_object(merged)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"config error: {e}") from None
    return cfg


def _yaml_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The YAML file's layers, its ``base`` chain first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"config base loop: {' -> '.join(map(str, chain + (path,)))}")
    layer = OmegaConf.load(path)
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {path} is not a mapping of keys")
    base = layer.pop("base", None)
    layers = _yaml_layers(path.parent / str(base), chain + (path.resolve(),)) if base else []
    return layers + [(str(path), layer)]


def _describe(e: OmegaConfBaseException, source: str) -> str:
    """One line: what is wrong with which key, where it came from, and the closest valid key."""
    key = getattr(e, "full_key", None) or "?"
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConfigKeyError) and dataclasses.is_dataclass(getattr(e, "object_type", None)):
        valid = [f.name for f in dataclasses.fields(e.object_type)]
        close = difflib.get_close_matches(str(e.key), valid, n=1, cutoff=0.5)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f"; did you mean {parent}{close[0]}?" if close else f"; valid keys here: {', '.join(valid)}"
        return f"config error in {source}: unknown key {key}{hint}"
    if first_line.startswith("Merge error:"):  # a section given a plain value, e.g. model: 3
        return f"config error in {source}: {first_line} (a section needs key: value pairs)"
    return f"config error in {source}: {key}: {first_line}"


def validate(cfg: Config) -> None:
    """Cross-field rules that types alone cannot express."""
    m = cfg.model
    validate_heads(m)
    und_grid = m.und.image_size // m.und.patch_size
    gen_grid = m.autoencoder.image_size // m.autoencoder.downsample // m.gen.patch_size
    if "flow" in m.heads and m.flow.repa_weight > 0 and und_grid != gen_grid:
        raise ConfigError(
            f"REPA needs the understanding grid ({und_grid}x{und_grid}) to equal the "
            f"generation token grid ({gen_grid}x{gen_grid})"
        )
    if not 0 < m.flow.repa_layer <= m.llm.num_layers:
        raise ConfigError(f"model.flow.repa_layer={m.flow.repa_layer} outside 1..{m.llm.num_layers}")
    if m.llm.hidden_size % m.llm.num_heads:
        raise ConfigError("model.llm.hidden_size must be divisible by model.llm.num_heads")
    from mm.kernels.attention import ATTENTION_BACKENDS
    from mm.sequence import TOKEN_KINDS  # mm.sequence builds on this module: import at use

    if m.llm.attn_implementation not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"model.llm.attn_implementation={m.llm.attn_implementation!r}; known: {sorted(ATTENTION_BACKENDS)}"
        )

    for key, kinds in (("model.mod.routable_kinds", m.mod.routable_kinds), ("model.v2pe.kinds", m.v2pe.kinds)):
        unknown = [k for k in kinds if k not in TOKEN_KINDS]
        if unknown:
            raise ConfigError(f"{key}: unknown token kinds {unknown}; known: {sorted(TOKEN_KINDS)}")
    if not 0 < m.mod.min_ratio <= 1 or not 0 <= m.mod.ratio <= 1:
        raise ConfigError("model.mod.min_ratio must be in (0, 1] and model.mod.ratio in [0, 1]")
    if not m.v2pe.train_deltas or any(not 0 < d <= 1 for d in (*m.v2pe.train_deltas, m.v2pe.infer_delta)):
        raise ConfigError("model.v2pe deltas must be in (0, 1] and train_deltas non-empty")
    validate_data(cfg.data)
    for s in cfg.data.sources:
        head = s.kind.partition(":")[2]
        if head and head not in m.heads:
            raise ConfigError(
                f"data.sources[{s.name}].kind={s.kind!r} trains image head {head!r}, which model.heads={m.heads} lacks"
            )
    t = cfg.train
    if t.max_steps < 1:
        raise ConfigError("train.max_steps must be >= 1")
    if t.grad_accum_steps < 1:
        raise ConfigError("train.grad_accum_steps must be >= 1")
    if t.max_nonfinite_steps < 1:
        raise ConfigError("train.max_nonfinite_steps must be >= 1")
    for i, group in enumerate(t.param_groups):
        if not group.modules:
            raise ConfigError(f"train.param_groups[{i}].modules is empty: name the module prefixes it sets")


def validate_heads(m: ModelConfig) -> None:
    from mm.model.heads import CFG_SCHEDULES, IMAGE_HEADS  # the heads build on this module: import at use

    if not m.heads:
        raise ConfigError(f"model.heads is empty: list at least one image head of {sorted(IMAGE_HEADS)}")
    unknown = [h for h in m.heads if h not in IMAGE_HEADS]
    if unknown or len(set(m.heads)) != len(m.heads):
        raise ConfigError(f"model.heads={m.heads}: each must be one of {sorted(IMAGE_HEADS)}, listed once")
    for name in m.heads:
        c = getattr(m, name, None)
        if not isinstance(c, CodeHeadConfig):
            continue
        if c.cfg_schedule not in CFG_SCHEDULES:
            raise ConfigError(f"model.{name}.cfg_schedule={c.cfg_schedule!r}; known: {sorted(CFG_SCHEDULES)}")
        if c.temperature <= 0 or not 0 < c.top_p <= 1 or c.top_k < 0:
            raise ConfigError(f"model.{name}: temperature must be > 0, top_p in (0, 1], top_k >= 0")
        if not 0 <= c.prompt_dropout < 1:
            raise ConfigError(f"model.{name}.prompt_dropout={c.prompt_dropout} must be in [0, 1)")


def validate_data(d: DataConfig) -> None:
    from data.pack import LOSS_REDUCTIONS, PACKERS  # data/ builds on this module: import at use
    from data.sources import SOURCE_KINDS

    if not d.sources:
        raise ConfigError("data.sources is empty: list at least one source")
    names = [s.name for s in d.sources]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"data.sources need distinct non-empty names, got {names}")
    for s in d.sources:
        if s.kind not in SOURCE_KINDS:
            raise ConfigError(f"data.sources[{s.name}].kind={s.kind!r}; known: {sorted(SOURCE_KINDS)}")
        if s.weight < 0 or not math.isfinite(s.weight):
            raise ConfigError(f"data.sources[{s.name}].weight={s.weight} must be >= 0")
        pattern = s.shards or d.train_shards
        if "pipe:" in pattern and not d.allow_shell_urls:
            raise ConfigError(
                f"data.sources[{s.name}] reads {pattern!r}, a shell command; set data.allow_shell_urls=true to allow it"
            )
    if sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("data.sources: no source has a positive weight")
    if d.packer not in PACKERS:
        raise ConfigError(f"data.packer={d.packer!r}; known: {sorted(PACKERS)}")
    if d.loss_reduction not in LOSS_REDUCTIONS:
        raise ConfigError(f"data.loss_reduction={d.loss_reduction!r}; known: {list(LOSS_REDUCTIONS)}")
    for key in ("seq_len", "rows_per_batch", "pack_lookahead", "min_piece", "shuffle_buffer", "max_image_pixels"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key}={getattr(d, key)} must be >= 1")
    if not 0 <= d.pack_slack < 1:
        raise ConfigError(f"data.pack_slack={d.pack_slack} must be in [0, 1)")
    if d.num_workers < 0 or d.prefetch_factor < 1 or d.open_retries < 0:
        raise ConfigError("data.num_workers and data.open_retries must be >= 0, data.prefetch_factor >= 1")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
