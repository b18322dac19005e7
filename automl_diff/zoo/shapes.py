"""The built-in ``shapes`` dataset: coloured shapes on backgrounds, drawn procedurally, captioned
with every attribute, and the classifier that reads the attributes back.

A scene is five attributes (:data:`ATTRIBUTES`): a shape (circle, square, triangle, cross) in a
colour (red, green, blue, yellow), small or large, at one of five positions, on a black, grey or
white background; 480 combinations. Each image varies continuously around its attributes (the
position by up to 4% of the side, the size by 15%, a rotation of up to 15 degrees, the colours
by 0.08, a background gradient), so that no two images are equal and FID measures more than the
attributes. :func:`render` draws any scene at any resolution with anti-aliased edges; the
dataset is :data:`DATASET_SIZE` scenes drawn from seed 0 (:func:`load_shapes`), and any other seed
gives independent images from the same distribution (reference sets of any size).

:class:`ShapesClassifier` (shipped in ``automl_diff/zoo/shapes_t2i/classifier.safetensors``) has
one head per attribute and regresses each image's continuous parameters; its 128-d penultimate
layer is the ``shapes`` FID feature space. As a prompt judge its classes are the 480 combinations:
an image is read as the combination of its heads' answers, so ``prompt_accuracy`` counts an image
when every attribute its prompt names is right.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTRIBUTES",
    "CLASSIFIER_FILE",
    "DATASET_SIZE",
    "RESOLUTION",
    "TEMPLATES",
    "Scenes",
    "ShapesClassifier",
    "caption",
    "captioned_shapes",
    "combination",
    "combination_of",
    "draw_scenes",
    "load_classifier",
    "load_shapes",
    "prompt_set",
    "render",
    "shape_mask",
    "train_classifier",
]

CLASSIFIER_FILE = Path(__file__).resolve().parent / "shapes_t2i" / "classifier.safetensors"

#: The images' side in pixels.
RESOLUTION = 64

#: The scenes of the built-in dataset (seed 0).
DATASET_SIZE = 10_000

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.85, 0.12, 0.12), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.9), "yellow": (0.95, 0.85, 0.15)}
SIZES = {"small": 0.12, "large": 0.2}  # radius, a share of the side
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.28, 0.72),
    "bottom left": (0.72, 0.28),
    "bottom right": (0.72, 0.72),
    "centre": (0.5, 0.5),
}  # (row, column), a share of the side
BACKGROUNDS = {"black": (0.06, 0.06, 0.06), "grey": (0.5, 0.5, 0.5), "white": (0.94, 0.94, 0.94)}

#: The attributes a scene is made of, in the order of a combination's digits, with their words.
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shape", SHAPES),
    ("colour", tuple(COLOURS)),
    ("size", tuple(SIZES)),
    ("position", tuple(POSITIONS)),
    ("background", tuple(BACKGROUNDS)),
)

#: Phrasings of a scene: every one names all five attributes.
TEMPLATES = (
    "a {size} {colour} {shape} at the {position} on a {background} background",
    "a {colour} {shape}, {size}, {position}, {background} background",
    "{background} background with a {size} {colour} {shape} in the {position}",
    "a picture of a {size} {colour} {shape} at the {position}, on {background}",
)

#: Continuous parameters the classifier regresses: centre row and column, radius, the shape's
#: and the background's colours.
_REGRESSED = 9


@dataclass(frozen=True)
class Scenes:
    """``N`` scenes: each attribute's index ``(N, 5)`` and each image's continuous parameters."""

    attributes: torch.Tensor  # (N, 5) int64, in the order of ATTRIBUTES
    centre: torch.Tensor  # (N, 2) row, column as shares of the side
    radius: torch.Tensor  # (N,) share of the side
    angle: torch.Tensor  # (N,) radians
    colour: torch.Tensor  # (N, 3) in [0, 1]
    background: torch.Tensor  # (N, 3) in [0, 1]
    gradient: torch.Tensor  # (N, 2) background brightness change across the image, rows and columns

    def __len__(self) -> int:
        return len(self.attributes)

    def targets(self) -> torch.Tensor:
        """``(N, 9)`` the continuous parameters the classifier regresses."""
        return torch.cat([self.centre, self.radius[:, None], self.colour, self.background], 1)


def draw_scenes(count: int, *, seed: int, attributes: torch.Tensor | None = None) -> Scenes:
    """``count`` scenes drawn uniformly over the combinations (or with ``attributes`` given), each
    with its own jitter, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    sizes = [len(words) for _, words in ATTRIBUTES]
    drawn = torch.stack([torch.randint(0, n, (count,), generator=g) for n in sizes], 1)
    attrs = drawn if attributes is None else attributes.to(torch.int64).reshape(count, len(ATTRIBUTES))
    base_centre = torch.tensor(list(POSITIONS.values()))[attrs[:, 3]]
    base_radius = torch.tensor(list(SIZES.values()))[attrs[:, 2]]
    base_colour = torch.tensor(list(COLOURS.values()))[attrs[:, 1]]
    base_background = torch.tensor(list(BACKGROUNDS.values()))[attrs[:, 4]]

    def jitter(shape: tuple[int, ...], scale: float) -> torch.Tensor:
        return (torch.rand(shape, generator=g) * 2 - 1) * scale

    return Scenes(
        attributes=attrs,
        centre=base_centre + jitter((count, 2), 0.04),
        radius=base_radius * (1 + jitter((count,), 0.15)),
        angle=jitter((count,), math.radians(15)),
        colour=(base_colour + jitter((count, 3), 0.08)).clamp(0, 1),
        background=(base_background + jitter((count, 3), 0.04)).clamp(0, 1),
        gradient=jitter((count, 2), 0.08),
    )


def _signed_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Distance outside each shape (negative inside) in units of its radius, at local coordinates
    ``(u, v)`` (``(N, H, W)``, rotated, scaled by the radius; ``v`` points up)."""
    circle = torch.sqrt(u * u + v * v) - 1.0
    square = torch.maximum(u.abs(), v.abs()) - 0.82
    edges = [u * math.cos(a) + v * math.sin(a) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    triangle = torch.stack(edges).amax(0) - 0.65
    cross = torch.minimum(torch.maximum(u.abs() - 1.0, v.abs() - 0.32), torch.maximum(u.abs() - 0.32, v.abs() - 1.0))
    table = torch.stack([circle, square, triangle, cross])  # (4, N, H, W)
    return table.gather(0, shape.view(1, -1, 1, 1).expand(1, *u.shape))[0]


#: Scenes drawn at once (the drawing's intermediate maps are a few times the images' size).
_RENDER_CHUNK = 1000


def render(scenes: Scenes, *, resolution: int = RESOLUTION) -> torch.Tensor:
    """The scenes as ``(N, 3, resolution, resolution)`` float32 images in [-1, 1]."""
    if len(scenes) > _RENDER_CHUNK:
        parts = [
            _render(Scenes(*(getattr(scenes, f)[i : i + _RENDER_CHUNK] for f in Scenes.__dataclass_fields__)), resolution)
            for i in range(0, len(scenes), _RENDER_CHUNK)
        ]
        return torch.cat(parts)
    return _render(scenes, resolution)


def _render(scenes: Scenes, resolution: int) -> torch.Tensor:
    n = len(scenes)
    axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    rows, cols = axis.view(1, -1, 1).expand(n, -1, resolution), axis.view(1, 1, -1).expand(n, resolution, -1)
    dy = (rows - scenes.centre[:, 0].view(-1, 1, 1)) / scenes.radius.view(-1, 1, 1)
    dx = (cols - scenes.centre[:, 1].view(-1, 1, 1)) / scenes.radius.view(-1, 1, 1)
    cos, sin = torch.cos(scenes.angle).view(-1, 1, 1), torch.sin(scenes.angle).view(-1, 1, 1)
    u, v = cos * dx - sin * dy, -(sin * dx + cos * dy)
    distance = _signed_distance(scenes.attributes[:, 0], u, v) * scenes.radius.view(-1, 1, 1) * resolution
    coverage = (0.5 - distance).clamp(0, 1).unsqueeze(1)  # one pixel of anti-aliasing
    shade = scenes.gradient[:, 0].view(-1, 1, 1) * (rows - 0.5) + scenes.gradient[:, 1].view(-1, 1, 1) * (cols - 0.5)
    background = (scenes.background.view(n, 3, 1, 1) + shade.unsqueeze(1)).clamp(0, 1)
    image = background * (1 - coverage) + scenes.colour.view(n, 3, 1, 1) * coverage
    return (image * 2 - 1).contiguous()


def shape_mask(scenes: Scenes, images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` 1.0 on the shape's pixels of the scenes' ``images`` (:func:`render`'s): those
    more than 0.25 away from the scene's background colour in some channel (the background's
    gradient stays within 0.08, every colour is at least 0.3 away from every background)."""
    background = (scenes.background * 2 - 1).view(-1, 3, 1, 1)
    return ((images - background).abs().amax(1, keepdim=True) > 0.25).float()


def caption(attributes: torch.Tensor | tuple[int, ...], template: int = 0) -> str:
    """Template ``template`` of :data:`TEMPLATES` filled in with a scene's attribute indices."""
    words = {name: options[int(i)] for (name, options), i in zip(ATTRIBUTES, attributes)}
    return TEMPLATES[template].format(**words)


#: Spellings a prompt may use for the captions' words.
_ALIASES = {"center": "centre", "gray": "grey"}

_PATTERNS = [
    re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(options, key=len, reverse=True)) + r")\b") for _, options in ATTRIBUTES
]


def combination_of(prompt: str) -> int | None:
    """The combination a prompt asks for (the mixed-radix number of its attribute indices, shape
    first), or None where it does not name all five attributes. Colours and backgrounds are
    named from disjoint words, so the order of the words does not matter."""
    text = re.sub(r"\b(" + "|".join(_ALIASES) + r")\b", lambda m: _ALIASES[m.group(1)], prompt.lower())
    index = 0
    for (_, options), pattern in zip(ATTRIBUTES, _PATTERNS):
        found = pattern.search(text)
        if found is None:
            return None
        index = index * len(options) + options.index(found.group(1))
    return index


def combination(index: int) -> tuple[int, ...]:
    """The attribute indices of combination ``index`` (:func:`combination_of`'s numbering)."""
    digits = []
    for _, options in reversed(ATTRIBUTES):
        index, digit = divmod(index, len(options))
        digits.append(digit)
    return tuple(reversed(digits))


def prompt_set(*, templates: tuple[int, ...], seed: int, count: int | None = None) -> list[str]:
    """Captions of ``count`` combinations (default: all 480) in a random order of ``seed``, the
    phrasing cycling through ``templates``: the shipped prompt files."""
    total = math.prod(len(options) for _, options in ATTRIBUTES)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: count or total]
    return [caption(combination(int(i)), templates[k % len(templates)]) for k, i in enumerate(order)]


def load_shapes(*, resolution: int = RESOLUTION, count: int = DATASET_SIZE, seed: int = 0) -> torch.Tensor:
    """The built-in dataset: ``count`` scenes of ``seed`` rendered at ``resolution``."""
    return render(draw_scenes(count, seed=seed), resolution=resolution)


def captioned_shapes(*, resolution: int = RESOLUTION, count: int = DATASET_SIZE, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The built-in dataset's images with their first phrasing each."""
    scenes = draw_scenes(count, seed=seed)
    return render(scenes, resolution=resolution), [caption(a) for a in scenes.attributes]


class ShapesClassifier(nn.Module):
    """A small CNN for 64x64 RGB scenes: a head per attribute and a regression of the continuous
    parameters over a 128-d feature layer (:meth:`features`, the FID feature space). Its forward
    gives the log-probability of every combination (:func:`combination_of`'s numbering), the
    sum of its heads' log-probabilities, so the most likely combination is every head's answer."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()

        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),  # 32x32
            nn.ReLU(),
            nn.Conv2d(32, 48, 3, stride=2, padding=1),  # 16x16
            nn.ReLU(),
            nn.Conv2d(48, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 16, 256),
            nn.ReLU(),
            nn.Linear(256, self.feature_dim),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, len(options)) for _, options in ATTRIBUTES)
        self.regression = nn.Linear(self.feature_dim, _REGRESSED)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 64, 64)`` images in [-1, 1] -> ``(N, 128)`` features."""
        return self.body(x)

    def attribute_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each attribute's logits, in the order of :data:`ATTRIBUTES`."""
        h = self.features(x)
        return [head(h) for head in self.heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joint: torch.Tensor | None = None
        for logits in self.attribute_logits(x):
            part = F.log_softmax(logits, 1)
            joint = part if joint is None else (joint.unsqueeze(2) + part.unsqueeze(1)).flatten(1)
        assert joint is not None
        return joint


def load_classifier(path: Path | str = CLASSIFIER_FILE) -> ShapesClassifier:
    """The shipped classifier (eval mode, CPU)."""
    from safetensors.torch import load_file

    model = ShapesClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@dataclass(frozen=True)
class ClassifierResult:
    model: ShapesClassifier
    accuracy: dict[str, float]  # each attribute's, and "all": every attribute right
    seconds: float


def train_classifier(*, seed: int = 0, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, held_out: int = 4000) -> ClassifierResult:
    """Train the classifier on fresh scenes every step (seeds ``seed + 1000 + step``: never the
    dataset's), and measure its accuracy on ``held_out`` scenes of another seed."""
    from automl_diff.zoo.digits import warmup_cosine

    torch.manual_seed(seed)
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        scenes = draw_scenes(batch_size, seed=seed + 1000 + step)
        x = render(scenes)
        h = model.features(x)
        loss = sum(F.cross_entropy(head(h), scenes.attributes[:, k]) for k, head in enumerate(model.heads))
        loss = loss + 10 * F.mse_loss(model.regression(h), scenes.targets())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_sched.step()
    model.eval()
    scenes = draw_scenes(held_out, seed=seed + 999)
    with torch.no_grad():
        answers = torch.stack([logits.argmax(1) for logits in model.attribute_logits(render(scenes))], 1)
    right = answers == scenes.attributes
    accuracy = {name: right[:, k].float().mean().item() for k, (name, _) in enumerate(ATTRIBUTES)}
    accuracy["all"] = right.all(1).float().mean().item()
    return ClassifierResult(model, accuracy, time.perf_counter() - start)
