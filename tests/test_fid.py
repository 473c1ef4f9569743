"""FID/KID: the standard FID Inception (torch-fidelity's network), loaded strictly from a local file, never downloaded.

The real weights (pt_inception-2015-12-05-6726825d.pth, 91 MB) are not shipped: the tests save the
architecture's own randomly initialised state dict, which checks the pipeline and the loading rules,
not the numbers of the real network.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mm.eval.generation import FIDInceptionFeatures, distance_metrics, inception_metrics


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(fe, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> Path:
    """A state dict with the FID Inception's keys and shapes (random He-initialised convolutions)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    tmp = tmp_path_factory.mktemp("fid")
    torch.save({}, tmp / "empty.pth")
    with pytest.MonkeyPatch.context() as mp:  # build the bare architecture: skip its own weight loading once
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        empty = str(tmp / "empty.pth")
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for m in net.modules():  # default init shrinks activations to ~1e-8 over 90 layers; He init keeps them O(1)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), tmp / "fid_inception.pth")
    return tmp / "fid_inception.pth"


def _images(seed: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, *shape)).astype(np.float32)


def test_no_weights_file_is_skipped_not_an_error(tmp_path):
    imgs = _images(0, 2, (1, 8, 8))
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    assert inception_metrics(imgs, imgs, str(missing)) == {
        "fid": f"skipped: weights not found at {missing}",
        "kid": f"skipped: weights not found at {missing}",
    }
    assert inception_metrics(imgs, imgs, "") == {
        "fid": "skipped: weights not found at <unset: eval.inception_weights>",
        "kid": "skipped: weights not found at <unset: eval.inception_weights>",
    }


def test_fid_and_kid_from_a_local_file_equal_torch_fidelitys_own_pipeline(fid_weights):
    import torch_fidelity

    fake, real = _images(1, 6, (1, 8, 8)), _images(2, 6, (3, 16, 16)) ** 3  # grey 8 px vs darker RGB 16 px
    ours = inception_metrics(fake, real, fid_weights)
    assert set(ours) == {"fid", "kid"} and all(np.isfinite(v) for v in ours.values()) and ours["fid"] > 1

    class Uint8Images(torch.utils.data.Dataset):  # what torch-fidelity reads: 8-bit RGB tensors
        def __init__(self, x: np.ndarray):
            self.x = torch.as_tensor(x)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> torch.Tensor:
            return (self.x[i].expand(3, -1, -1) * 255).round().to(torch.uint8)

    ref = torch_fidelity.calculate_metrics(
        input1=Uint8Images(fake), input2=Uint8Images(real), fid=True, kid=True, kid_subset_size=6, cuda=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(fid_weights), cache=False,
        verbose=False, save_cpu_ram=True,
    )  # fmt: skip
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
    assert ours["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-6)
    same = inception_metrics(fake, fake, fid_weights)
    assert abs(same["fid"]) < 1e-3 * ours["fid"]


def test_only_the_fid_inception_is_called_fid(fid_weights):
    from mm.eval.generation import FEATURE_EXTRACTORS, DigitFeatures

    imgs = _images(3, 4, (1, 8, 8))
    feats = FIDInceptionFeatures(fid_weights)(imgs)
    assert feats.shape == (4, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert set(distance_metrics(imgs, imgs[::-1], DigitFeatures(), kid_subset=4)) == {"fd_digit_mlp", "kd_digit_mlp"}
    assert set(FEATURE_EXTRACTORS) == {"fid_inception", "digit_mlp"}  # torchvision's ImageNet Inception is gone


def test_a_file_with_other_keys_or_shapes_fails_naming_them(fid_weights, tmp_path):
    from torchvision.models import inception_v3

    state = torch.load(fid_weights, weights_only=True)
    renamed = dict(state)
    renamed["Mixed_5b.branch1x1.conv.weightX"] = renamed.pop("Mixed_5b.branch1x1.conv.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"(?s)not the FID Inception.*Missing key.*Mixed_5b\.branch1x1\.conv\.weight"):
        FIDInceptionFeatures(tmp_path / "renamed.pth")
    resized = {**state, "fc.weight": torch.zeros(1000, 2048)}
    torch.save(resized, tmp_path / "resized.pth")
    with pytest.raises(ValueError, match=r"size mismatch for fc\.weight"):
        inception_metrics(_images(0, 2, (1, 8, 8)), _images(1, 2, (1, 8, 8)), tmp_path / "resized.pth")
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(ValueError, match=r"torchvision's ImageNet inception_v3"):  # what eval.inception_weights held
        FIDInceptionFeatures(tmp_path / "tv.pth")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        FIDInceptionFeatures(tmp_path / "list.pth")
