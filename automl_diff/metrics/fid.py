"""FID: pytorch-fid's Fréchet distance between feature statistics (lower is better).

Features come from a small registry: ``inception`` (pytorch-fid's InceptionV3 pool3, 2048-d, the
standard for RGB images; weights from the torch hub cache), ``clip`` (a CLIP model's projected
image embeddings, the Fréchet CLIP distance of clean-fid and later work; the study's CLIP model,
from the local cache or a folder) or one the package ships for its built-in teachers
(:data:`automl_diff.zoo.FEATURES`: the digits classifier's 64-d features). Reference statistics
of a dataset are computed once and cached on disk, keyed by dataset, extractor (and its weights),
resolution and channels.

FID depends on the number of samples; compare models only at the same ``fid_samples``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.metrics.clip import CLIP_MODEL, load_clip
from automl_diff.zoo import FEATURES, dataset_images

__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "ReferenceSet",
    "cache_dir",
    "feature_statistics",
    "fid_from_features",
    "fid_from_images",
    "frechet_distance",
    "get_extractor",
    "reference_set",
    "reference_statistics",
]


def cache_dir() -> Path:
    """Where reference statistics are cached: ``$AUTOML_DIFF_CACHE`` or ``~/.cache/automl_diff``."""
    return Path(os.environ.get("AUTOML_DIFF_CACHE", Path.home() / ".cache" / "automl_diff"))


@dataclass
class FeatureExtractor:
    """Maps images in [-1, 1] to feature vectors.

    Attributes:
        name: registry name.
        fingerprint: identifies the weights (part of the cache key).
        model: ``(N, C, H, W)`` in [-1, 1] -> ``(N, D)``.
    """

    name: str
    fingerprint: str
    model: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, batch_size: int = 200) -> np.ndarray:
        feats = [self.model(images[i : i + batch_size].to(self.device)).double().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(feats).numpy()


def inception_weights_path() -> Path:
    """Where pytorch-fid looks for its Inception weights (the torch hub checkpoint cache)."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(FID_WEIGHTS_URL)


def _builtin_extractor(name: str) -> Callable[..., FeatureExtractor]:
    """A feature space the package ships (:data:`automl_diff.zoo.FEATURES`)."""

    def make(device: torch.device, **_: str) -> FeatureExtractor:
        fingerprint, model = FEATURES[name].model(device)
        return FeatureExtractor(name, fingerprint, model, device)

    return make


def _inception_extractor(device: torch.device, **_: str) -> FeatureExtractor:
    import functools

    import pytorch_fid.inception as fid_inception
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    weights = inception_weights_path()
    # pytorch-fid loads the cached checkpoint with torch.hub's default weights_only=False, which
    # unpickles arbitrary objects: load it with weights_only=True (tensors and plain containers)
    original = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = functools.partial(original, weights_only=True)
    try:
        model: nn.Module = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise UserError(
            f"FID Inception weights are missing and could not be downloaded ({type(exc).__name__}): "
            f"put {weights.name} from {FID_WEIGHTS_URL} at {weights}"
        ) from None
    finally:
        fid_inception.load_state_dict_from_url = original

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        # pytorch-fid expects [0, 1] and resizes to 299 itself.
        return model((x.float() + 1) / 2)[0].flatten(1)

    return FeatureExtractor("inception", f"inception-{weights.name}", run, device)


def _clip_extractor(device: torch.device, *, clip_model: str = CLIP_MODEL, **_: str) -> FeatureExtractor:
    clip = load_clip(clip_model, device=device)
    weights = clip.model.visual_projection.weight.detach().float().cpu().numpy().tobytes()
    digest = hashlib.sha256(weights).hexdigest()[:12]
    return FeatureExtractor("clip", f"clip-{digest}", clip.image_embeddings, device)


#: Feature extractors by name; each takes the device and the study's ``clip_model``.
FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "inception": _inception_extractor,
    "clip": _clip_extractor,
    **{name: _builtin_extractor(name) for name in FEATURES},
}


def get_extractor(name: str, *, device: str | torch.device = "cpu", clip_model: str = CLIP_MODEL) -> FeatureExtractor:
    """The feature extractor registered as ``name`` (``clip``: the CLIP model ``clip_model``)."""
    if name not in FEATURE_EXTRACTORS:
        raise UserError(f"unknown FID features '{name}'; known: {', '.join(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](torch.device(device), clip_model=clip_model)


def feature_statistics(images: torch.Tensor, extractor: FeatureExtractor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the features of ``images`` (in [-1, 1])."""
    feats = extractor(images)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's Fréchet distance between two Gaussians."""
    import warnings

    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        # Features that are constant over a set (dead ReLUs) make the covariances singular;
        # pytorch-fid's sqrtm still returns the right value for the other dimensions.
        warnings.filterwarnings("ignore", message="Matrix is singular")
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


@dataclass(frozen=True)
class ReferenceSet:
    """A dataset's features for FID (their mean and covariance) and KID (the features themselves)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray

    @property
    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def reference_set(
    dataset: str,
    extractor: FeatureExtractor,
    *,
    resolution: int,
    channels: int,
    directory: Path | None = None,
) -> ReferenceSet:
    """The features of a whole dataset and their statistics, computed once and cached as ``.npz``."""
    from automl_diff.records import stable_key

    key = stable_key([dataset, extractor.fingerprint, resolution, channels])
    safe = "".join(c if c.isalnum() else "_" for c in dataset)[-40:]
    path = (directory or cache_dir()) / "fid_stats" / f"{safe}-{extractor.name}-{resolution}px-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return ReferenceSet(data["mu"], data["sigma"], data["features"])
    features = extractor(dataset_images(dataset, resolution=resolution, channels=channels))
    reference = ReferenceSet(features.mean(axis=0), np.cov(features, rowvar=False), features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mu=reference.mu, sigma=reference.sigma, features=features, dataset=dataset, extractor=extractor.fingerprint)
    tmp.replace(path)
    return reference


def reference_statistics(
    dataset: str,
    extractor: FeatureExtractor,
    *,
    resolution: int,
    channels: int,
    directory: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a whole dataset's features (:func:`reference_set`, cached)."""
    return reference_set(dataset, extractor, resolution=resolution, channels=channels, directory=directory).statistics


def fid_from_features(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """FID of generated images' ``features`` against reference statistics."""
    return frechet_distance(features.mean(axis=0), np.cov(features, rowvar=False), *reference)


def fid_from_images(images: torch.Tensor, reference: tuple[np.ndarray, np.ndarray], extractor: FeatureExtractor) -> float:
    """FID of generated ``images`` (in [-1, 1]) against reference statistics."""
    return fid_from_features(extractor(images), reference)
