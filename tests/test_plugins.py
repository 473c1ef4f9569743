"""Parts are plug-ins: a new image head, a new source kind and a new understanding tower, each defined here
(no library file edited) and registered by one line, train five steps together and sample.

* ``pixels``: an image head that regresses a coarse grey grid of the image from its slots in one pass;
* ``flipped``: a source kind that reads the generation shards and mirrors each image (an augmentation),
  with its own options (the axis, and the image head through the ``flipped:<head>`` shorthand);
* ``patch_mlp``: an understanding tower that embeds patches with a linear layer and an MLP.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data.images import load_image
from data.sources import SOURCE_KINDS, BuildContext, GenerationOptions, SourceKind, build_generation
from mm.batch import Batch, ImageInputs, left_padded
from mm.config import load_config
from mm.images import ImagePreprocess, as_unit_float, generation_preprocess
from mm.model.decoder import DecoderOutput
from mm.model.heads import HeadContext, HeadHost, ImageHead, register_head
from mm.model.heads.base import loss_weight, place, slot_mask, take_slots
from mm.model.towers import UND_TOWERS, Tower
from mm.schema import ConfigError
from mm.sequence import ImageTemplate, image_generation_sample
from tests.conftest import ROOT, SMALL


# ---- a new image head ----------------------------------------------------------------------------------------
@dataclass
class PixelHeadConfig:
    grid: int = 4  # the image is predicted as grid x grid grey cells, upsampled to the image size
    image_size: int = 8
    loss_weight: float = 1.0
    prompt_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ConfigError("model.heads.pixels: image_size must be a multiple of grid")


@register_head("pixels")
class PixelHead(ImageHead):
    Config = PixelHeadConfig

    def __init__(self, name: str, cfg: PixelHeadConfig, ctx: HeadContext):
        super().__init__(name, cfg, ctx)
        n = cfg.grid**2
        self.slots = nn.Parameter(torch.randn(n, ctx.hidden_size) * 0.02)
        self.out = nn.Linear(ctx.hidden_size, 1)
        self.template = ImageTemplate(name, cfg.image_size, 1, (n,), full_blocks=True, begin="boi", end=True)

    @staticmethod
    def recipe(cfg: PixelHeadConfig) -> dict:
        return {"sampler": "one pass", "grid": cfg.grid}

    @property
    def passes_per_image(self) -> int:
        return 1

    def loss_weights(self) -> dict[str, float]:
        return {"pixels": self.cfg.loss_weight}

    def loss_counts(self, inputs: ImageInputs | None) -> dict[str, float]:
        return {"pixels": float(len(inputs)) if inputs is not None else 0.0}

    def _targets(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(as_unit_float(images).mean(1, keepdim=True), self.cfg.grid).flatten(1)

    def embed(self, host: HeadHost, embeds: torch.Tensor, batch: Batch, inputs: ImageInputs, draws: dict):
        n = len(inputs.images)
        mask = slot_mask(batch, inputs, self.vocab.gen)
        embeds = place(embeds, mask, self.slots.expand(n, -1, -1).flatten(0, 1), inputs, "pixel slots")
        return embeds, (inputs, mask, self._targets(inputs.images))

    def losses(self, host: HeadHost, hidden: torch.Tensor, decoder_out: DecoderOutput, state) -> dict:
        inputs, mask, target = state
        pred = self.out(take_slots(hidden, mask, (self.cfg.grid**2, hidden.shape[-1]), inputs)).squeeze(-1)
        per_image = (pred.float() - target).pow(2).mean(1)
        zero = hidden.new_zeros((), dtype=torch.float32)
        return {"pixels_sum": loss_weight(inputs) * per_image.sum(), "pixels_count": zero + len(inputs)}

    @torch.no_grad()
    def generate(self, host: HeadHost, prompts: list[str], generator: torch.Generator | None = None, **kw):
        samples = [image_generation_sample(self.vocab, self.template, None, p) for p in prompts]
        batch = left_padded(samples, self.vocab.pad).to(host.device)
        embeds = host.embed_tokens(batch.input_ids)
        mask = batch.input_ids == self.vocab.gen
        embeds = embeds.masked_scatter(mask[..., None], self.slots.expand(len(prompts), -1, -1).to(embeds.dtype))
        h = host.decode(embeds, batch.position_ids, batch.attention(), batch.token_kinds).last_hidden_state
        cells = self.out(h[mask]).view(len(prompts), 1, self.cfg.grid, self.cfg.grid).clamp(0, 1)
        return F.interpolate(cells, size=self.cfg.image_size, mode="nearest")


# ---- a new source kind ----------------------------------------------------------------------------------------
@dataclass
class FlipOptions(GenerationOptions):
    axis: str = "horizontal"  # horizontal | vertical

    def __post_init__(self) -> None:
        if self.axis not in ("horizontal", "vertical"):
            raise ConfigError(f"flipped.axis={self.axis!r}; known: horizontal, vertical")


def build_flipped(raw: dict, ctx: BuildContext, options: FlipOptions):
    """A generation pair whose image is mirrored: the caption still holds (digit shapes are not symmetric,
    but the model learns the mirrored digit; enough to show a kind with its own options)."""
    samples = build_generation(raw, ctx, options)
    dim = -1 if options.axis == "horizontal" else -2
    for s in samples:
        s.gen_images = [img.flip(dim) for img in s.gen_images]
    return samples


SOURCE_KINDS["flipped"] = SourceKind(build_flipped, FlipOptions, argument="head")


# ---- a new understanding tower --------------------------------------------------------------------------------
@dataclass
class PatchMLPConfig:
    image_size: int = 8
    patch_size: int = 2
    width: int = 32
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


class PatchMLPTower(Tower):
    Config = PatchMLPConfig

    def __init__(self, cfg: PatchMLPConfig):
        super().__init__()
        self.image_size, self.patch_size, self.width, self.channels = cfg.image_size, cfg.patch_size, cfg.width, 3
        self.mean, self.std = tuple(cfg.mean) * 3, tuple(cfg.std) * 3
        self.embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.mlp = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, 2 * cfg.width), nn.GELU(),
                                 nn.Linear(2 * cfg.width, cfg.width))  # fmt: skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixels).flatten(2).transpose(1, 2)
        return x + self.mlp(x)


UND_TOWERS["patch_mlp"] = PatchMLPTower


# ---- together -----------------------------------------------------------------------------------------------
def _cfg(shard_dir, tmp_path):
    small = [o for o in SMALL if not o.startswith(("model.und.tower.", "model.heads.flow."))]  # other parts' keys
    return load_config(ROOT / "configs" / "tiny.yaml", small + [
        f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar",
        f"data.heldout_shards={shard_dir}/digits/heldout-000000.tar",
        "model.und.kind=patch_mlp", "model.und.tower={image_size: 8, patch_size: 2, width: 24}",
        "model.heads.flow=null", "model.heads.pixels={grid: 4}",
        "data.sources=[{name: vqa, kind: conversation},"
        " {name: mirrored, kind: 'flipped:pixels', options: {axis: vertical}}]",
        "train.max_steps=5", "train.ckpt_every=5", f"run.dir={tmp_path}/run",
    ])  # fmt: skip


def test_plug_ins_validate_their_own_config(shard_dir, tmp_path):
    cfg = _cfg(shard_dir, tmp_path)
    assert isinstance(cfg.model.und.tower, PatchMLPConfig) and isinstance(cfg.model.heads["pixels"], PixelHeadConfig)
    assert cfg.data.sources[1].options == FlipOptions(head="pixels", axis="vertical")
    with pytest.raises(ConfigError, match=r"model.und.tower.widht; did you mean model.und.tower.width\?"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.und.kind=patch_mlp", "model.und.tower.widht=3"])
    with pytest.raises(ConfigError, match="flipped.axis"):
        load_config(ROOT / "configs" / "tiny.yaml", ["data.sources=[{name: m, kind: flipped, options: {axis: up}}]"])
    with pytest.raises(ConfigError, match="multiple of grid"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.heads.pixels={grid: 3}"])


def test_new_head_kind_and_tower_train_five_steps_and_sample(shard_dir, tmp_path):
    from mm.load import load_run
    from mm.train.launch import launch

    trainer = launch(_cfg(shard_dir, tmp_path))
    model = trainer.model
    assert isinstance(model.und.tower, PatchMLPTower) and list(model.heads) == ["pixels"]
    assert {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("heads.")} == {"pixels"}
    trainer.train()
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[-1]["loss_names"] == ["text", "pixels"]
    assert all(r["pixels"] is None or r["pixels"] > 0 for r in recs) and any(r["pixels"] for r in recs)
    # the mirrored source fed the head: its images arrive flipped in a batch
    batch = next(iter(trainer.loader))
    assert "pixels" in batch.images and batch.images["pixels"].images.shape[1:] == (1, 8, 8)
    model.eval()
    images = model.generate(["draw the digit 3", "draw the digit 7"], head="pixels")
    assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    answers = model.answer(torch.rand(2, 3, 8, 8), ["what digit is this ?"] * 2, max_new_tokens=2)
    assert len(answers) == 2
    _, reloaded, _, step = load_run(tmp_path / "run")  # the checkpoint names the plug-ins; they rebuild
    assert step == 5 and torch.equal(reloaded.generate(["draw the digit 3"], head="pixels")[0], images[0])


def test_flipped_kind_mirrors_the_image(shard_dir, vocab):
    from data.sources import SourceConfig, build_samples
    from data.stream import read_samples
    from mm.batch import SampleShapes

    raw = next(iter(read_samples(f"{shard_dir}/digits/train-000000.tar")))
    t = ImageTemplate("pixels", 8, 1, (16,), full_blocks=True, begin="boi", end=True)
    shapes = SampleShapes(ImagePreprocess("crop", 8, 3), 16, {"pixels": t})
    ctx = BuildContext(vocab, shapes, 128, 10**6, random.Random(0))
    (flipped,) = build_samples(SourceConfig("f", "flipped", options={"axis": "horizontal"}), raw, ctx)
    plain = load_image(raw["png"], generation_preprocess(8, 1), 10**6)
    assert torch.equal(flipped.gen_images[0], plain.flip(-1)) and flipped.head == "pixels"
