"""FID: pytorch-fid's Fréchet distance between feature statistics (lower is better).

Features come from a small registry: ``inception`` (pytorch-fid's InceptionV3 pool3, 2048-d, the
standard for RGB images; weights from the torch hub cache), ``clip`` (a CLIP model's projected
image embeddings, the Fréchet CLIP distance of clean-fid and later work; the study's CLIP model,
from the local cache or a folder) or one the package ships for its built-in teachers
(:data:`automl_diff.zoo.FEATURES`: the digits classifier's 64-d features). Reference statistics
of a dataset are computed once and cached on disk, keyed by dataset, extractor (and its weights),
resolution and channels.

Features are accumulated batch by batch (:class:`FeatureStats`: running float64 sums of the
features and of their outer products), so memory does not grow with the number of images: a
30,000-image FID holds one batch of images at a time. FID depends on the number of samples;
compare models only at the same ``fid_samples``.
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
from automl_diff.zoo import FEATURES, dataset_batches

__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "FeatureStats",
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


class FeatureStats:
    """Mean and covariance of features added batch by batch: running float64 sums of the
    features and of their outer products (the covariance is ``(S - n mu mu^T) / (n - 1)``).

    Args:
        keep: also keep the features themselves (float32), for what needs them (FID's interval,
            KID); only their statistics otherwise.
    """

    def __init__(self, *, keep: bool = False) -> None:
        self.count = 0
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None
        self.keep = keep
        self._kept: list[np.ndarray] = []

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if self.total is None:
            self.total, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.count += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        if self.keep:
            self._kept.append(f.astype(np.float32))

    @property
    def mu(self) -> np.ndarray:
        if self.total is None:
            raise ValueError("no features added")
        return self.total / self.count

    @property
    def sigma(self) -> np.ndarray:
        if self.outer is None or self.count < 2:
            raise ValueError("a covariance needs at least two features")
        mu = self.mu
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    @property
    def features(self) -> np.ndarray:
        """The features added (``keep=True`` only), in order."""
        if not self.keep:
            raise ValueError("these statistics did not keep their features")
        return np.concatenate(self._kept) if self._kept else np.zeros((0, 0), dtype=np.float32)


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
    """The features of a whole dataset and their statistics, computed batch by batch once and
    cached as ``.npz`` (the features in float32, for KID)."""
    from automl_diff.records import stable_key

    key = stable_key([dataset, extractor.fingerprint, resolution, channels, "centre-crop"])
    safe = "".join(c if c.isalnum() else "_" for c in dataset)[-40:]
    path = (directory or cache_dir()) / "fid_stats" / f"{safe}-{extractor.name}-{resolution}px-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return ReferenceSet(data["mu"], data["sigma"], data["features"])
    stats = FeatureStats(keep=True)
    for images in dataset_batches(dataset, resolution=resolution, channels=channels):
        stats.add(extractor(images))
    features = stats.features
    reference = ReferenceSet(stats.mu, stats.sigma, features)
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
