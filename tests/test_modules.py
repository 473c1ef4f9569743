"""Every module alone: shapes, init, and the registries' switches."""

import pytest
import torch

from mm.model.autoencoder import AutoencoderConfig, DiffusersKL, IdentityAutoencoder, build_autoencoder
from mm.model.gen_codec import GRN, GenCodecConfig, GenDecoder, GenEncoder, TimeEmbedding
from mm.model.towers import UndConfig, UnderstandingEncoder
from mm.schema import ConfigError


@pytest.mark.parametrize("kind", ["open_clip", "hf_siglip"])
def test_understanding_encoder_registry(kind):
    cfg = UndConfig(kind=kind, tower=dict(image_size=16, patch_size=4, width=32, layers=1, heads=2))
    enc = UnderstandingEncoder(cfg, llm_width=48)
    x = torch.rand(3, 3, 16, 16)
    assert enc.features(x).shape == (3, 16, 32)
    assert enc(x).shape == (3, 16, 48)
    assert enc.tokens_per_image == 16


def test_unknown_encoder_kind_is_named():
    with pytest.raises(ConfigError, match="model.und.kind='nope'"):  # the config validates itself
        UndConfig(kind="nope")


def test_open_clip_tower_loads_local_weights(tmp_path):
    cfg = UndConfig(tower=dict(image_size=16, patch_size=4, width=32, layers=1, heads=2))
    a = UnderstandingEncoder(cfg, 8)
    torch.save(a.tower.visual.state_dict(), tmp_path / "tower.pt")
    cfg.tower.weights = str(tmp_path / "tower.pt")
    b = UnderstandingEncoder(cfg, 8)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(a.features(x), b.features(x))


def test_identity_autoencoder_round_trip():
    ae = IdentityAutoencoder(AutoencoderConfig())
    x = torch.rand(2, 1, 8, 8)
    assert ae.encode(x).min() >= -1 and ae.encode(x).max() <= 1
    torch.testing.assert_close(ae.decode(ae.encode(x)), x)


def test_diffusers_kl_loads_from_local_directory(tmp_path):
    from diffusers import AutoencoderKL

    tiny = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
        norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        scaling_factor=0.5,
    )  # fmt: skip
    tiny.save_pretrained(tmp_path / "vae")
    ae = build_autoencoder(AutoencoderConfig(kind="diffusers_kl", path=str(tmp_path / "vae"), image_size=16,
                                             image_channels=3, latent_channels=4, downsample=2))  # fmt: skip
    assert isinstance(ae, DiffusersKL) and ae.scaling == 0.5
    z = ae.encode(torch.rand(2, 3, 16, 16))
    assert z.shape == (2, 4, 8, 8)
    img = ae.decode(z)
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert not any(p.requires_grad for p in ae.parameters())


def test_missing_vae_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.heads\.flow\.autoencoder\.path: no such directory"):
        cfg = AutoencoderConfig(kind="diffusers_kl", path=str(tmp_path / "none"))
        build_autoencoder(cfg, "model.heads.flow.autoencoder")


def test_gen_codec_shapes_skip_and_zero_velocity_at_init():
    cfg = GenCodecConfig(channels=16, patch_size=2, encoder_blocks=2, decoder_blocks=2, time_freq_dim=32)
    temb = TimeEmbedding(32, 24)(torch.rand(3))
    assert temb.shape == (3, 24)
    enc, dec = GenEncoder(cfg, 4, 24), GenDecoder(cfg, 4, 24)
    tokens, skip = enc(torch.randn(3, 4, 8, 8), temb)
    assert tokens.shape == (3, 16, 24) and skip.shape == (3, 16, 4, 4)
    v = dec(torch.randn(3, 16, 24), skip, temb)
    assert v.shape == (3, 4, 8, 8) and v.abs().max() == 0  # zero-initialised output conv
    torch.nn.init.normal_(dec.out.weight)
    v = dec(torch.randn(3, 16, 24), skip, temb)
    v.sum().backward()
    assert enc.patchify.weight.grad is not None  # the long skip carries gradient to the encoder


def test_grn_is_identity_at_init_and_time_embedding_distinguishes_t():
    x = torch.randn(2, 4, 4, 8)
    torch.testing.assert_close(GRN(8)(x), x)
    te = TimeEmbedding(32, 16)
    e = te(torch.tensor([0.1, 0.9]))
    assert not torch.allclose(e[0], e[1])


def test_named_open_clip_arch_loads_a_local_checkpoint_file(tmp_path):
    import open_clip

    ref = open_clip.create_model("ViT-S-32", pretrained=None, load_weights=False)
    torch.save(ref.state_dict(), tmp_path / "vit_s32.pt")
    tower = dict(arch="ViT-S-32", weights=str(tmp_path / "vit_s32.pt"), image_size=224, patch_size=32)
    with pytest.raises(ConfigError, match=r"model.und.tower.mean=.*open_clip arch 'ViT-S-32' preprocesses with"):
        UnderstandingEncoder(UndConfig(tower=tower), llm_width=16)  # 0.5/0.5 is not the arch's normalisation
    pc = ref.visual.preprocess_cfg
    cfg = UndConfig(tower=tower | {"mean": list(pc["mean"]), "std": list(pc["std"])})
    enc = UnderstandingEncoder(cfg, llm_width=16)
    assert enc.preprocess.mode == "crop" and enc.preprocess.backend == "pil"  # open_clip's own eval transform
    x = torch.rand(1, 3, 224, 224)
    ref.visual.output_tokens = True
    torch.testing.assert_close(enc.tower(x), ref.visual(x)[1])
    assert enc(x).shape == (1, 49, 16) and enc.tower.width == 384
