from __future__ import annotations

import numpy as np
import pytest
import torch

from automl_diff.errors import UserError
from automl_diff.metrics.fid import feature_statistics, fid_from_images, get_extractor, reference_statistics
from automl_diff.zoo.digits import load_digits


@pytest.fixture(scope="module")
def digits_extractor():
    return get_extractor("digits")


def test_fid_of_a_set_against_itself_is_zero_and_a_shifted_set_is_far(digits_extractor):
    images = load_digits(resolution=16)
    reference = reference_statistics("digits", digits_extractor, resolution=16, channels=1)
    assert fid_from_images(images, reference, digits_extractor) == pytest.approx(0.0, abs=1e-3)
    shifted = torch.roll(images, shifts=4, dims=-1)
    torch.manual_seed(0)
    noisy = (images + 0.6 * torch.randn_like(images)).clamp(-1, 1)
    far_shift = fid_from_images(shifted, reference, digits_extractor)
    far_noise = fid_from_images(noisy, reference, digits_extractor)
    half = fid_from_images(images[::2], reference, digits_extractor)
    assert far_shift > 20 * max(half, 1e-3)
    assert far_noise > 20 * max(half, 1e-3)


def test_reference_statistics_are_cached(digits_extractor, monkeypatch):
    first = reference_statistics("digits", digits_extractor, resolution=16, channels=1)

    def fail(*args, **kwargs):
        raise AssertionError("the dataset was read again")

    monkeypatch.setattr("automl_diff.metrics.fid.dataset_batches", fail)
    second = reference_statistics("digits", digits_extractor, resolution=16, channels=1)
    assert (first[0] == second[0]).all() and (first[1] == second[1]).all()


def test_features_of_digits_classifier():
    from automl_diff.zoo.digits import classifier_split, load_classifier

    images, labels = load_digits(resolution=16, with_labels=True)
    _, held_out = classifier_split(len(images))  # the 20% the shipped classifier never trained on
    with torch.no_grad():
        accuracy = (load_classifier()(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert len(held_out) == 360 and accuracy > 0.95
    mu, sigma = feature_statistics(images[:100], get_extractor("digits"))
    assert mu.shape == (64,) and sigma.shape == (64, 64)


def test_missing_inception_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("pytorch_fid.inception.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"pt_inception-2015-12-05-6726825d\.pth.*hub/checkpoints"):
        get_extractor("inception")


def test_unknown_extractor():
    with pytest.raises(UserError, match="unknown FID features 'dino'; known: inception, clip, digits"):
        get_extractor("dino")


def test_clip_features_come_from_a_local_clip_model_and_name_what_to_download(tmp_path):
    """``features: clip``: the projected image embeddings of the study's CLIP model; the same
    images give the same features, other images others."""
    from tests.conftest import build_tiny_clip

    extractor = get_extractor("clip", clip_model=str(build_tiny_clip(tmp_path / "clip")))
    images = load_digits(resolution=16)[:6]
    features = extractor(images)
    assert features.shape == (6, 8) and extractor.fingerprint.startswith("clip-")
    assert np.allclose(extractor(images[:3]), features[:3]) and not np.allclose(features[0], features[1])
    with pytest.raises(UserError, match="huggingface-cli download openai/not-a-cached-clip"):
        get_extractor("clip", clip_model="openai/not-a-cached-clip")
