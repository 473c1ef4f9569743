"""One image preprocessing, equal to the reference processors, on every path.

Real non-square photos (scikit-image's), a grey-scale page, an RGBA logo and a flat grey image go through each
tower kind's default preprocessing (``mm.images.preprocess`` with the tower's spec, then the model's
normalisation) and through the processor that kind's published models ship with, built offline from its
config: transformers 5's default (torchvision-backed) ``JanusImageProcessor``, ``CLIPImageProcessor``,
``LlavaImageProcessor(do_pad=True)`` and ``SiglipImageProcessor``, open_clip's eval transform, and Janus's own
``VLMImageProcessor`` (JanusFlow) when its code is importable. The uint8 stage is equal exactly and the
normalised ``pixel_values`` to float rounding; the ``*Pil`` variants equal our ``backend: pil``. Then: the
loader's tensor for a picture (a real shard written by ``make_shards``, read by the conversation and generation
kinds) equals the processor's, and a converted LLaVA answers from our processor's pixels as the original does
from its own processor's.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mm.images import normalize, preprocess, to_channels
from mm.model.towers import UndConfig, UnderstandingEncoder
from mm.schema import ConfigError
from tests.conftest import ROOT, SMALL

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
NORM_TOL = 1e-6  # normalised pixel_values: float rounding only (the uint8 stage is compared exactly)


def photos() -> dict[str, Image.Image]:
    from skimage import data

    return {
        "astronaut_crop": Image.fromarray(data.astronaut()[40:400, 10:500]),  # 360 x 490
        "coffee": Image.fromarray(data.coffee()),  # 400 x 600
        "chelsea": Image.fromarray(data.chelsea()),  # 300 x 451 (odd width)
        "rocket": Image.fromarray(data.rocket()),  # 427 x 640
        "rocket_tall": Image.fromarray(np.ascontiguousarray(data.rocket()[:, 200:331])),  # 427 x 131
        "page_grey": Image.fromarray(data.page()),  # L, 191 x 384
        "logo_rgba": Image.fromarray(data.logo()),  # RGBA: transparency over white
        "flat_grey": Image.fromarray(np.full((37, 91, 3), 128, np.uint8)),
    }


def _tower(kind: str, size: int) -> dict:
    """A small tower of ``kind`` reading ``size`` px images, with its kind's default preprocessing."""
    if kind == "hf_janus_vision":
        cfg = dict(model_type="janus_vision_model", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   image_size=size, patch_size=16 if size % 16 == 0 else 8, projection_dim=16)  # fmt: skip
        return {"config": cfg, "mean": HALF, "std": HALF}
    if kind == "hf_clip":
        cfg = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, image_size=size, patch_size=14 if size % 14 == 0 else 8)  # fmt: skip
        return {"config": cfg}
    patch = 16 if size % 16 == 0 else 8
    shape = {"image_size": size, "patch_size": patch, "width": 16, "layers": 1, "heads": 2}
    return shape | ({"mean": CLIP_MEAN, "std": CLIP_STD} if kind == "open_clip" else {})


def _reference(kind: str, size: int, pil: bool = False):
    """The processor the kind's published models ship with (transformers 5's default class, or its *Pil variant)."""
    import transformers

    suffix = "Pil" if pil else ""
    if kind == "hf_janus_vision":
        cls = getattr(transformers, "JanusImageProcessor" + suffix)
        return cls(size={"height": size, "width": size}, image_mean=HALF, image_std=HALF)
    if kind == "hf_clip":  # LLaVA-1.5: expand2square with the mean colour, then CLIP's
        cls = getattr(transformers, "LlavaImageProcessor" + suffix)
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=True)
    cls = getattr(transformers, "SiglipImageProcessor" + suffix)  # hf_siglip
    return cls(size={"height": size, "width": size}, image_mean=HALF, image_std=HALF)


def _encoder(kind: str, size: int) -> UnderstandingEncoder:
    return UnderstandingEncoder(UndConfig(kind=kind, tower=_tower(kind, size)), llm_width=8)


def _ref_input(kind: str, img: Image.Image) -> Image.Image:
    """transformers' Janus converts no mode (a grey or RGBA picture fails there): it gets the RGB picture ours makes
    (transparency over white, as transformers' convert_to_rgb does for the others); the others get the picture."""
    return to_channels(img, 3) if kind == "hf_janus_vision" else img


@pytest.mark.parametrize("kind", ["hf_janus_vision", "hf_clip", "hf_siglip"])
@pytest.mark.parametrize("size", [384, 336, 32])
def test_tower_preprocessing_equals_the_reference_processor(kind, size):
    """Published sizes (Janus 384, CLIP/LLaVA 336, SigLIP 384: each kind at both) and a small one."""
    enc = _encoder(kind, size)
    spec = enc.preprocess
    ref = _reference(kind, size)
    worst = 0.0
    for name, img in photos().items():
        expected = ref(_ref_input(kind, img), return_tensors="pt").pixel_values[0]
        ours8 = preprocess(img, spec)
        assert ours8.dtype == torch.uint8 and ours8.shape == (3, size, size), name
        # the uint8 stage: the reference's values taken back to 0..255 are ours exactly
        mean, std = torch.tensor(ref.image_mean).view(3, 1, 1), torch.tensor(ref.image_std).view(3, 1, 1)
        assert (expected * std * 255 + mean * 255 - ours8.float()).abs().max() < 1e-3, name
        got = enc.normalize(ours8[None])[0]  # the model's own normalisation of the loader's uint8 tensor
        worst = max(worst, float((got - expected).abs().max()))
    assert worst <= NORM_TOL, worst


@pytest.mark.parametrize("kind", ["hf_janus_vision", "hf_clip", "hf_siglip"])
def test_pil_backend_equals_the_pil_variant_and_differs_from_the_default(kind):
    """``backend: pil`` equals transformers' *Pil classes; they differ from the default by a few uint8 levels."""
    size = 336 if kind == "hf_clip" else 384
    spec = dataclasses.replace(_encoder(kind, size).preprocess, backend="pil")
    ref_pil, ref_tv = _reference(kind, size, pil=True), _reference(kind, size)
    differs = 0
    for name, img in photos().items():
        expected = ref_pil(_ref_input(kind, img), return_tensors="pt").pixel_values[0]
        got = normalize(preprocess(img, spec)[None], tuple(ref_pil.image_mean), tuple(ref_pil.image_std))[0]
        assert (got - expected).abs().max() <= NORM_TOL, name
        differs += int(not torch.equal(expected, ref_tv(_ref_input(kind, img), return_tensors="pt").pixel_values[0]))
    assert differs >= 4  # the two backends are not interchangeable: which one we match matters


@pytest.mark.parametrize("size", [224, 8])
def test_open_clip_tower_equals_open_clip_s_eval_transform(size):
    from open_clip.transform import image_transform

    enc = _encoder("open_clip", size)
    ref = image_transform(size, is_train=False, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD))
    pics = {n: p for n, p in photos().items() if p.mode != "RGBA"}  # open_clip drops alpha (black under it)
    for name, img in pics.items():
        got = enc.normalize(preprocess(img, enc.preprocess)[None])[0]
        assert (got - ref(img)).abs().max() <= NORM_TOL, name
    # open_clip's centre crop rounds its offset (torchvision v1), transformers' floors it: the rocket's crop moves
    floor = dataclasses.replace(enc.preprocess, crop_offset="floor")
    assert not torch.equal(preprocess(pics["rocket"], floor), preprocess(pics["rocket"], enc.preprocess))


def _janus_reference_path() -> str | None:
    path = os.environ.get("JANUSFLOW_REF_PATH", "")
    probe = [sys.executable, "-c", "import janus.janusflow.models.image_processing_vlm"]
    ok = path and subprocess.run(probe, env=dict(os.environ, PYTHONPATH=path), capture_output=True).returncode == 0
    return path if ok else None


REFERENCE_VLM = """
import sys, glob, numpy as np
from PIL import Image
from janus.janusflow.models.image_processing_vlm import VLMImageProcessor
folder, size = sys.argv[1], int(sys.argv[2])
proc = VLMImageProcessor(image_size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
out = {}
for f in sorted(glob.glob(folder + "/*.png")):
    img = Image.open(f).convert("RGB")
    out[f] = np.asarray(proc.preprocess([img], return_tensors="pt").pixel_values[0])
np.savez(folder + "/ref.npz", **out)
"""


@pytest.mark.skipif(_janus_reference_path() is None, reason="Janus's reference code is not importable: set "
                    "JANUSFLOW_REF_PATH (scripts/janusflow_reference.py says how to make it)")  # fmt: skip
@pytest.mark.parametrize("size", [384, 32])
def test_timm_vit_tower_equals_janus_s_own_vlm_image_processor(tmp_path, size):
    """JanusFlow's SigLIP tower: the reference repository's VLMImageProcessor (transformers 4, run apart)."""
    enc = _encoder("timm_vit", size)
    pics = {n: p for n, p in photos().items() if p.mode == "RGB"}
    for name, img in pics.items():
        img.save(tmp_path / f"{name}.png")
    env = dict(os.environ, PYTHONPATH=_janus_reference_path())
    done = subprocess.run([sys.executable, "-c", REFERENCE_VLM, str(tmp_path), str(size)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ref = np.load(tmp_path / "ref.npz")
    for name, img in pics.items():
        got = enc.normalize(preprocess(img, enc.preprocess)[None])[0]
        assert (got - torch.from_numpy(ref[str(tmp_path / f"{name}.png")])).abs().max() <= NORM_TOL, name
    # transformers' Janus rounds the shorter side where the original int()s it: 1 px of the pad band moves
    rounded = dataclasses.replace(enc.preprocess, resize_rounding="round")
    assert any(not torch.equal(preprocess(p, rounded), preprocess(p, enc.preprocess)) for p in pics.values())


def test_processor_pixel_values_equal_the_reference_and_survive_save_and_load(vocab, tmp_path):
    from transformers import AutoProcessor

    import mm  # noqa: F401  (registers the Auto classes)
    from mm.hf import UnifiedMMProcessor

    enc = _encoder("hf_clip", 336)
    proc = UnifiedMMProcessor(vocab.tokenizer, und_preprocess=enc.preprocess.to_dict(), und_mean=CLIP_MEAN,
                              und_std=CLIP_STD)  # fmt: skip
    proc.save_pretrained(str(tmp_path))
    loaded = AutoProcessor.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.und_spec == enc.preprocess
    pics = list(photos().values())
    out = loaded(images=pics, text="what is this ?")
    expected = _reference("hf_clip", 336)(pics, return_tensors="pt").pixel_values
    assert out["pixel_values"].dtype == torch.float32 and (out["pixel_values"] - expected).abs().max() <= NORM_TOL
    assert torch.equal(loaded.und_images(pics), torch.stack([preprocess(p, enc.preprocess) for p in pics]))
    with pytest.raises(ValueError, match="no image head"):
        loaded.gen_images(pics)  # a processor saved without generation targets


def test_bad_preprocessing_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"model.und.tower.preprocess.mode='letterbox'; known"):
        UndConfig(kind="hf_siglip", tower={"preprocess": {"mode": "letterbox"}})
    with pytest.raises(ConfigError, match=r"model.und.tower.preprocess.resample='lanczos'"):
        UndConfig(kind="open_clip", tower={"preprocess": {"resample": "lanczos"}})
    with pytest.raises(ConfigError, match=r"model.und.tower.preprocess: .*fill=\(1, 2\)"):
        UnderstandingEncoder(UndConfig(kind="hf_siglip", tower={"preprocess": {"mode": "pad", "fill": [1, 2]},
                                                                 "image_size": 16, "patch_size": 8}), 8)  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.und.tower.preprocess.fill=\(300,\)"):
        UndConfig(kind="hf_siglip", tower={"preprocess": {"fill": [300]}})


# ---- the loader and the processor make the same tensor ----------------------------------------------------------
def _shards(tmp_path, pics: dict[str, Image.Image]):
    """A real conversation shard and a generation shard of JPEG photos, bytes kept as the files hold them."""
    import json

    from data.shards import ImageOptions, make_shards

    (tmp_path / "img").mkdir()
    for name, img in pics.items():
        img.convert("RGB").save(tmp_path / "img" / f"{name}.jpg", quality=90)
    turns = [{"from": "human", "value": "<image>\nwhat is this ?"}, {"from": "gpt", "value": "a photo"}]
    convs = [{"id": n, "image": f"img/{n}.jpg", "conversations": turns} for n in pics]
    (tmp_path / "convs.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    caps = [{"id": n, "image": f"img/{n}.jpg", "caption": "a photo"} for n in pics]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(c) for c in caps) + "\n")
    keep = ImageOptions(reencode="keep")
    for kind, src in (("conversation", "convs.jsonl"), ("generation", "caps.jsonl")):
        totals = make_shards(kind, tmp_path / src, tmp_path / kind, image_root=tmp_path, opts=keep, processes=1,
                             progress=False)  # fmt: skip
        assert totals["written"] == len(pics) and totals["rejected"] == 0
    return tmp_path / "img"


@pytest.mark.parametrize("mode", ["crop", "pad", "pad_crop", "squash"])
def test_the_loader_s_tensor_equals_the_processor_s(tmp_path, vocab, mode):
    """The tiny model's tower with each mode: conversation and generation kinds on a make_shards shard vs
    ``UnifiedMMProcessor.from_model`` on the same files (JPEG: decoded at full size on both paths)."""
    from data.sources import BuildContext, SourceConfig, build_samples
    from data.stream import read_samples
    from mm.config import load_config
    from mm.hf import UnifiedMMProcessor
    from mm.model.unified import UnifiedModel

    ae = "model.heads.flow.autoencoder"  # 16 px RGB generation targets
    overrides = SMALL + ["model.und.tower.image_size=32", "model.und.tower.patch_size=4",
                         f"model.und.tower.preprocess.mode={mode}", f"{ae}.image_size=16", f"{ae}.image_channels=3",
                         f"{ae}.latent_channels=3"]  # fmt: skip
    model = UnifiedModel(load_config(ROOT / "configs" / "tiny.yaml", overrides).model, vocab)
    processor = UnifiedMMProcessor.from_model(model)
    assert processor.und_spec == model.sample_shapes().und_preprocess and processor.und_spec.mode == mode
    pics = {n: p for n, p in photos().items() if n in ("coffee", "chelsea", "rocket_tall", "page_grey")}
    folder = _shards(tmp_path, pics)
    ctx = BuildContext(vocab, model.sample_shapes(), 512, 10**8, random.Random(0))
    for kind in ("conversation", "generation"):
        for raw in read_samples(f"{tmp_path}/{kind}/shard-000000.tar"):
            (sample,) = build_samples(SourceConfig(name=kind, kind=kind), raw, ctx)
            pic = [Image.open(folder / f"{raw['__key__']}.jpg")]
            if kind == "conversation":
                assert torch.equal(sample.und_images[0], processor.und_images(pic)[0]), raw["__key__"]
            else:
                assert torch.equal(sample.gen_images[0], processor.gen_images(pic)[0]), raw["__key__"]
    # the model reads the loader's uint8 tensor exactly as transformers' forward reads the processor's output
    u8 = processor.und_images([Image.open(folder / "coffee.jpg")])
    pv = processor(images=[Image.open(folder / "coffee.jpg")])["pixel_values"]
    assert torch.equal(model.und.normalize(u8), pv)


def test_an_understanding_only_model_has_a_processor(vocab):
    from mm.config import load_config
    from mm.hf import UnifiedMMProcessor
    from mm.model.unified import UnifiedModel

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", SMALL + ["model.understanding_only=true", "model.heads.flow=null"]
    )
    model = UnifiedModel(cfg.model, vocab)
    processor = UnifiedMMProcessor.from_model(model)
    assert processor.und_spec == model.und.preprocess and processor.gen_preprocess is None


# ---- a converted LLaVA: our processor + our model == the original's processor + model ---------------------------
def test_converted_llava_answers_our_processor_s_pixels_as_the_original_its_own(tmp_path):
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
    )

    import mm  # noqa: F401
    from mm.convert.llava import export_hf_llava, import_hf_llava
    from tests.convert_fixtures import tiny_llava

    src = tiny_llava(tmp_path / "hf")  # saves a plain CLIPImageProcessor: LLaVA-1.5's pad-to-square replaces it
    LlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                        do_pad=True).save_pretrained(str(src))  # fmt: skip
    import_hf_llava(src, tmp_path / "ours")
    ref = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True).eval()
    ours = AutoModel.from_pretrained(str(tmp_path / "ours"), local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(str(tmp_path / "ours"), local_files_only=True)
    assert proc.und_spec.mode == "pad_crop" and ours.unified.und.preprocess == proc.und_spec
    pic = photos()["chelsea"]
    ref_pixels = AutoImageProcessor.from_pretrained(str(src))(pic, return_tensors="pt").pixel_values
    pixels = proc(images=[pic])["pixel_values"]
    assert (pixels - ref_pixels).abs().max() <= NORM_TOL
    ids = torch.tensor([[1, 7, *[ours.config.image_token_id] * 16, 9, 11]])
    with torch.no_grad():
        a = ref(input_ids=ids, pixel_values=ref_pixels).logits
        b = ours(input_ids=ids, pixel_values=pixels).logits
        # answer()'s path: the processor's uint8 squares, normalised inside the encoder, give the same features
        u = ours.unified.und
        assert torch.equal(u(proc.und_images([pic])), u.aligner(u.tower(pixels)))
    assert (a - b).abs().max() <= 1e-4
    # exported back to transformers' format, the folder's own image processor preprocesses as ours
    export_hf_llava(ours.unified, tmp_path / "back", image_token_id=ours.config.image_token_id)
    back = AutoImageProcessor.from_pretrained(str(tmp_path / "back"))
    assert type(back).__name__ == "LlavaImageProcessor" and back.do_pad
    assert (back(pic, return_tensors="pt").pixel_values - pixels).abs().max() <= NORM_TOL


def test_converted_janus_preprocesses_as_its_processor_and_exports_it(tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor

    import mm  # noqa: F401
    from mm.convert.janus import export_hf_janus, import_hf_janus
    from mm.hf import UnifiedMMModel
    from tests.convert_fixtures import tiny_janus

    src = tiny_janus(tmp_path / "hf")  # JanusImageProcessor: 32 px, 0.5/0.5
    import_hf_janus(src, tmp_path / "ours")
    proc = AutoProcessor.from_pretrained(str(tmp_path / "ours"), local_files_only=True)
    pics = [p for p in photos().values() if p.mode == "RGB"]
    expected = AutoImageProcessor.from_pretrained(str(src))(pics, return_tensors="pt").pixel_values
    assert proc.und_spec.mode == "pad" and (proc(images=pics)["pixel_values"] - expected).abs().max() <= NORM_TOL
    ours = UnifiedMMModel.from_pretrained(str(tmp_path / "ours"), local_files_only=True)
    export_hf_janus(ours.unified, tmp_path / "back")
    back = AutoImageProcessor.from_pretrained(str(tmp_path / "back"))
    assert (back(pics, return_tensors="pt").pixel_values - expected).abs().max() <= NORM_TOL
