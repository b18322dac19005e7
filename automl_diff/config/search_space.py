"""Student search spaces: per-block choices declared in ``search_spaces/*.yaml``.

Schema (every key is optional except ``blocks``)::

    family: unet2d            # unet2d: diffusers UNet2DModel (+ per-level depths);
                              # unet2d_condition: UNet2DConditionModel (text-to-image)
    fixed:                    # config keys copied onto the teacher's config (e.g. norm_num_groups: 8)
      norm_num_groups: 8
    blocks:
      down.0: {channels: [16, 32], layers: [1, 2]}
      down.2: {channels: [32, 64], layers: [1, 2], attention: [true, false]}
      mid:    {attention: [true, false]}
      up.0:   {attention: [true, false]}

A block's choices become Optuna parameters with stable dotted names (``down.2.channels``,
``down.2.layers``, ``down.2.attention``, ``mid.attention``, ``up.0.attention``). A level's
``channels`` and ``layers`` are declared on its ``down.i`` block: the mirrored up block follows it,
as in diffusers (``up.j`` mirrors ``down.{K-1-j}``). ``up.j.attention`` defaults to the mirrored
down block's choice. What a file does not declare keeps the teacher's value.

``family: dit`` declares students of a ``DiTTransformer2DModel`` teacher: how many transformer
blocks they keep and how many attention heads (of the teacher's head size, so fewer heads is a
narrower model)::

    family: dit
    transformer: {layers: [2, 3, 4], heads: [2, 4]}

The same family declares DiT students of an unconditional UNet teacher, with ``student:`` giving
their layout (each is a one-class ``StudentDiTTransformer2DModel`` that a ``DDIMPipeline`` calls as
it calls a UNet)::

    family: dit
    student: {patch_size: 2, attention_head_dim: 32, num_attention_heads: 4, num_layers: 6}
    transformer: {layers: [4, 6]}

A ``family: unet2d`` space can also declare UNet students of a DiT teacher (another
architecture, as DKDM allows): the teacher has no UNet config to edit, so ``student:`` gives the
students' layout, and each is a class-conditional ``UNet2DModel`` on the teacher's latents (its
classes and null class as ``num_class_embeds``)::

    family: unet2d
    student: {block_out_channels: [64, 128], down_block_types: [DownBlock2D, AttnDownBlock2D],
              up_block_types: [AttnUpBlock2D, UpBlock2D], layers_per_block: 1, norm_num_groups: 16}
    blocks:
      down.0: {channels: [32, 64]}

``family: unet2d_condition`` is the same schema for text-conditioned students: a level with
attention is a ``CrossAttnDownBlock2D``/``CrossAttnUpBlock2D`` (its transformers keep the teacher's
cross attention to the text), one without a ``DownBlock2D``/``UpBlock2D``, and ``mid.attention``
chooses ``UNetMidBlock2DCrossAttn`` or ``UNetMidBlock2D``. Every student is a stock
``UNet2DConditionModel`` (per-level depths included) that ``StableDiffusionPipeline`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from automl_diff.config._reader import Section, load_yaml, positive
from automl_diff.errors import UserError

__all__ = [
    "ALL_BLOCKS",
    "DROP_ORDERS",
    "FAMILIES",
    "BlockChoices",
    "SearchSpace",
    "SupernetBlock",
    "SupernetSpace",
    "TransformerSpace",
    "computing_resnets",
    "load_search_space",
]

#: Search-space families: ``unet2d`` and ``unet2d_condition`` (whole student architectures,
#: DKDM; unconditional and text-conditioned), ``dit`` (DiT students of a DiT teacher, DKDM) and
#: ``supernet`` (per-block subnet choices of the teacher's blocks, DiffNAS).
FAMILIES = ("unet2d", "unet2d_condition", "dit", "supernet")

#: The ``family: supernet`` entry whose choices every block without its own entry takes.
ALL_BLOCKS = "all"

#: Which of a supernet block's resnets stop computing first (:class:`SupernetBlock`'s ``drop``).
DROP_ORDERS = ("end", "middle")


def computing_resnets(count: int, layers: int, drop: str = "end") -> frozenset[int]:
    """The indices of a block's ``count`` resnets that compute when ``layers`` of them do, in the
    ``drop`` order (:data:`DROP_ORDERS`)."""
    if drop == "middle" and 0 < layers < count:
        return frozenset([*range(layers - 1), count - 1])
    return frozenset(range(min(layers, count)))


@dataclass(frozen=True)
class _Family:
    """How a whole-architecture family spells attention per level in diffusers' config."""

    model: str
    down: dict[str, bool]
    up: dict[str, bool]
    mid: dict[str, bool] | None  # mid_block_type -> attention (None: ``add_attention``)


_ARCHITECTURES = {
    "unet2d": _Family("UNet2DModel", {"DownBlock2D": False, "AttnDownBlock2D": True}, {"UpBlock2D": False, "AttnUpBlock2D": True}, None),
    "unet2d_condition": _Family(
        "UNet2DConditionModel",
        {"DownBlock2D": False, "CrossAttnDownBlock2D": True},
        {"UpBlock2D": False, "CrossAttnUpBlock2D": True},
        {"UNetMidBlock2D": False, "UNetMidBlock2DCrossAttn": True},
    ),
}


def _is_dit(config: dict[str, Any]) -> bool:
    """A transformer teacher: DiT, or SD3's MMDiT (:func:`_is_sd3`)."""
    return config.get("_class_name") in ("DiTTransformer2DModel", "SD3Transformer2DModel")


def _is_sd3(config: dict[str, Any]) -> bool:
    return config.get("_class_name") == "SD3Transformer2DModel"


def _type_for(types: dict[str, bool], attention: bool) -> str:
    return next(name for name, attends in types.items() if attends == attention)


class _Choices:
    """What every space of whole-student choices offers, from its :meth:`parameters`."""

    def parameters(self) -> dict[str, tuple[Any, ...]]:
        raise NotImplementedError

    def size(self) -> int:
        """Number of distinct architectures."""
        n = 1
        for values in self.parameters().values():
            n *= len(values)
        return n

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial (or ``FixedTrial``) for one value per parameter."""
        return {name: trial.suggest_categorical(name, list(choices)) for name, choices in self.parameters().items()}


@dataclass(frozen=True)
class BlockChoices:
    """The choices declared for one block; None means "keep the teacher's"."""

    name: str
    channels: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    attention: tuple[bool, ...] | None = None

    def parameters(self) -> dict[str, tuple[Any, ...]]:
        """Optuna parameter name -> choices."""
        out: dict[str, tuple[Any, ...]] = {}
        for key in ("channels", "layers", "attention"):
            values = getattr(self, key)
            if values is not None:
                out[f"{self.name}.{key}"] = values
        return out


@dataclass(frozen=True)
class SearchSpace(_Choices):
    """A validated search space over student architectures.

    Attributes:
        path: the YAML file it came from.
        family: the student family (``unet2d`` or ``unet2d_condition``).
        blocks: declared choices, in block order.
        fixed: config keys set on every student.
        student: the students' own layout, for a teacher of another architecture (a DiT), whose
            config the students cannot edit.
    """

    path: str
    family: str
    blocks: tuple[BlockChoices, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict[str, tuple[Any, ...]]:
        """Every Optuna parameter of the space: dotted name -> choices."""
        out: dict[str, tuple[Any, ...]] = {}
        for block in self.blocks:
            out.update(block.parameters())
        return out

    @property
    def architecture(self) -> _Family:
        return _ARCHITECTURES[self.family]

    def _mid_attention(self, base: dict[str, Any]) -> bool:
        mid = self.architecture.mid
        if mid is None:
            return bool(base.get("add_attention", True))
        return mid.get(base.get("mid_block_type") or "", False)

    def validate_for(self, teacher_config: dict[str, Any]) -> None:
        """Check that every declared block exists in the teacher and every choice builds a valid model.

        Raises:
            UserError: naming the file and the key.
        """
        import inspect

        import diffusers

        arch = self.architecture
        self._check_student(teacher_config)
        conditional = teacher_config.get("cross_attention_dim") is not None
        if conditional != (self.family == "unet2d_condition"):
            kind, other = ("a text-conditioned", "unet2d_condition") if conditional else ("an unconditional", "unet2d")
            raise UserError(f"{self.path}: family: {self.family} does not fit {kind} teacher; use family: {other}")
        accepted = set(inspect.signature(getattr(diffusers, arch.model).__init__).parameters) - {
            "self",
            "layers_per_block",
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "mid_block_type",
        }
        for key in self.fixed:
            if key not in accepted:
                raise UserError(f"{self.path}: fixed.{key}: not a {arch.model} config key that a search space may fix")
        layout = set(inspect.signature(getattr(diffusers, arch.model).__init__).parameters) - {"self"}
        for key in self.student:
            if key not in layout:
                raise UserError(f"{self.path}: student.{key}: not a {arch.model} config key")
        base = self._base(teacher_config)
        for i, t in enumerate(base["down_block_types"]):
            if t not in arch.down:
                raise UserError(f"{self.path}: family {self.family} supports {', '.join(arch.down)} blocks; the teacher's down.{i} is {t}")
        for i, t in enumerate(base["up_block_types"]):
            if t not in arch.up:
                raise UserError(f"{self.path}: family {self.family} supports {', '.join(arch.up)} blocks; the teacher's up.{i} is {t}")
        if arch.mid is not None and base.get("mid_block_type") not in arch.mid:
            raise UserError(
                f"{self.path}: family {self.family} supports mid blocks {', '.join(arch.mid)}; "
                f"the teacher's is {base.get('mid_block_type')}"
            )
        levels = len(base["block_out_channels"])
        known = [f"down.{i}" for i in range(levels)] + ["mid"] + [f"up.{i}" for i in range(levels)]
        groups = int(base.get("norm_num_groups") or 32)
        head_dim = base.get("attention_head_dim")
        head_dim = head_dim[0] if isinstance(head_dim, (list, tuple)) else head_dim
        for block in self.blocks:
            key = f"blocks.{block.name}"
            if block.name not in known:
                raise UserError(f"{self.path}: {key}: unknown block; the teacher has blocks {', '.join(known)}")
            if block.name.startswith("up.") and (block.channels or block.layers):
                level = levels - 1 - int(block.name.split(".")[1])
                raise UserError(f"{self.path}: {key}: up blocks mirror down.{level}; declare channels and layers there")
            if block.name == "mid" and (block.channels or block.layers):
                raise UserError(f"{self.path}: {key}: mid keeps the last level's channels; only attention can be chosen")
            level = int(block.name.split(".")[1]) if block.name.startswith("down.") else None
            attends = (
                any(block.attention)
                if block.attention is not None
                else (
                    level is not None
                    and (
                        arch.down.get(base["down_block_types"][level], False)
                        or arch.up.get(base["up_block_types"][levels - 1 - level], False)
                    )
                )
            )
            if level == levels - 1:  # the mid block's attention runs at the last level's width
                mid = next((b for b in self.blocks if b.name == "mid"), None)
                attends = attends or (any(mid.attention) if mid and mid.attention is not None else self._mid_attention(base))
            for c in block.channels or ():
                if c % groups:
                    raise UserError(f"{self.path}: {key}.channels: {c} is not divisible by norm_num_groups={groups}")
                if head_dim and attends and c % int(head_dim):
                    raise UserError(f"{self.path}: {key}.channels: {c} is not divisible by attention_head_dim={head_dim}")

    def _check_student(self, teacher_config: dict[str, Any]) -> None:
        """``student:`` is given exactly when the teacher is of another architecture (a DiT), with its layout."""
        if not _is_dit(teacher_config):
            if self.student:
                raise UserError(f"{self.path}: student: only for a teacher of another architecture (a DiT); students edit this teacher's")
            return
        if _is_sd3(teacher_config):
            raise UserError(
                f"{self.path}: family: {self.family}: an SD3 teacher's students are shallower SD3 transformers; use family: dit"
            )
        if self.family != "unet2d":
            raise UserError(f"{self.path}: family: {self.family} does not fit a DiT teacher; use family: dit, or unet2d with student:")
        if not self.student:
            raise UserError(
                f"{self.path}: student: required for UNet students of a DiT teacher (their own layout: block_out_channels, "
                "down_block_types, up_block_types, layers_per_block); or use family: dit"
            )
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key not in self.student:
                raise UserError(f"{self.path}: student.{key}: required (the students' layout)")

    def _base(self, teacher_config: dict[str, Any]) -> dict[str, Any]:
        from automl_diff.models.student import LAYOUT_KEYS

        if _is_dit(teacher_config):  # another architecture: the students' own layout on its latents and classes
            channels = int(teacher_config["in_channels"])
            base = {
                "sample_size": teacher_config["sample_size"],
                "in_channels": channels,
                "out_channels": channels,
                "num_class_embeds": int(teacher_config["num_embeds_ada_norm"]) + 1,
                **self.student,
            }
        else:
            base = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
        for key in LAYOUT_KEYS:  # a student teacher's layout
            base.pop(key, None)
        base.update(self.fixed)
        return base

    def to_config(self, params: dict[str, Any], teacher_config: dict[str, Any]) -> dict[str, Any]:
        """The diffusers config of the student that ``params`` selects (JSON-safe).

        ``unet2d``: levels of equal depth give a plain ``UNet2DModel``, otherwise
        ``StudentUNet2DModel``. ``unet2d_condition``: a ``UNet2DConditionModel``.
        """
        arch = self.architecture
        base = self._base(teacher_config)
        levels = len(base["block_out_channels"])
        depths = base.get("layers_per_block", 2)
        depths = [int(depths)] * levels if isinstance(depths, int) else [int(d) for d in depths]
        channels = [int(c) for c in base["block_out_channels"]]
        down_attn = [arch.down[t] for t in base["down_block_types"]]
        up_attn = [arch.up[t] for t in base["up_block_types"]]
        for level in range(levels):
            channels[level] = int(params.get(f"down.{level}.channels", channels[level]))
            depths[level] = int(params.get(f"down.{level}.layers", depths[level]))
            down_attn[level] = bool(params.get(f"down.{level}.attention", down_attn[level]))
        for j in range(levels):
            mirrored = f"down.{levels - 1 - j}.attention"
            up_attn[j] = bool(params.get(f"up.{j}.attention", params.get(mirrored, up_attn[j])))
        mid_attention = bool(params.get("mid.attention", self._mid_attention(base)))
        config = dict(base)
        config.update(
            block_out_channels=channels,
            down_block_types=[_type_for(arch.down, a) for a in down_attn],
            up_block_types=[_type_for(arch.up, a) for a in up_attn],
        )
        if arch.mid is None:
            config["add_attention"] = mid_attention
        else:
            config["mid_block_type"] = _type_for(arch.mid, mid_attention)
        if self.family == "unet2d_condition":
            config.update(_class_name="UNet2DConditionModel", layers_per_block=depths)
        elif len(set(depths)) == 1:
            config.update(_class_name="UNet2DModel", layers_per_block=depths[0])
        else:
            config.update(_class_name="StudentUNet2DModel", layers_per_block=depths)
        return config


@dataclass(frozen=True)
class TransformerSpace(_Choices):
    """Student transformers (``family: dit``) of a ``DiTTransformer2DModel`` teacher, or of an
    unconditional UNet teacher (another architecture, as DKDM allows).

    Attributes:
        path: the YAML file it came from.
        layers: choices of the student's transformer blocks (``num_layers``); None keeps the
            teacher's (the ``student:`` layout's).
        heads: choices of its attention heads (``num_attention_heads``), each of the teacher's
            ``attention_head_dim``: the model's width is ``heads * attention_head_dim``.
        student: the students' DiT layout for a UNet teacher (``patch_size``,
            ``attention_head_dim``, ``num_attention_heads``, ``num_layers`` and any other
            ``DiTTransformer2DModel`` key): the students denoise the teacher's images with one class.
    """

    path: str
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    student: dict[str, Any] = field(default_factory=dict)

    family = "dit"

    def parameters(self) -> dict[str, tuple[Any, ...]]:
        """Optuna parameter name -> choices (``transformer.layers``, ``transformer.heads``)."""
        return {f"transformer.{k}": v for k, v in (("layers", self.layers), ("heads", self.heads)) if v is not None}

    def validate_for(self, teacher_config: dict[str, Any]) -> None:
        """Check that the teacher is a DiT, or an unconditional UNet with ``student:`` given, and
        that no choice exceeds the teacher.

        Raises:
            UserError: naming the file and the key.
        """
        if not _is_dit(teacher_config):
            self._check_student(teacher_config)
            return
        if self.student:
            raise UserError(f"{self.path}: student: only for a UNet teacher; a DiT teacher's students are cut from its own config")
        if _is_sd3(teacher_config):
            self._check_sd3(teacher_config)
        for key, most in (("layers", "num_layers"), ("heads", "num_attention_heads")):
            for n in getattr(self, key) or ():
                if n > int(teacher_config[most]):
                    raise UserError(f"{self.path}: transformer.{key}: {n} is more than the teacher's {teacher_config[most]} ({most})")

    def _check_sd3(self, teacher_config: dict[str, Any]) -> None:
        """An SD3 teacher's students keep its width and drop joint blocks (its last, which
        updates the image stream alone, stays last)."""
        if self.heads:
            raise UserError(
                f"{self.path}: transformer.heads: an SD3 student keeps the teacher's heads (its width); choose transformer.layers"
            )
        if teacher_config.get("dual_attention_layers"):
            raise UserError(
                f"{self.path}: transformer.layers: the teacher's blocks differ (dual_attention_layers, SD3.5's MMDiT-X); "
                "students of uniform joint blocks only"
            )
        if any(n < 2 for n in self.layers or ()):
            raise UserError(f"{self.path}: transformer.layers: an SD3 student keeps at least 2 blocks (a joint one, and the last)")

    def _check_student(self, teacher_config: dict[str, Any]) -> None:
        found = teacher_config.get("_class_name", "UNet2DModel")
        if teacher_config.get("cross_attention_dim") is not None or teacher_config.get("num_class_embeds"):
            raise UserError(
                f"{self.path}: family: dit students distil a DiT or an unconditional UNet; this {found} is conditional "
                "(DiTTransformer2DModel has no cross-attention)"
            )
        if not self.student:
            raise UserError(
                f"{self.path}: student: required for DiT students of a UNet teacher (their layout: patch_size, "
                "attention_head_dim, num_attention_heads, num_layers)"
            )
        import inspect

        from automl_diff.models.student_transformer import StudentDiTTransformer2DModel

        known = set(inspect.signature(StudentDiTTransformer2DModel.__init__).parameters) - {"self"}
        for key in self.student:
            if key not in known:
                raise UserError(f"{self.path}: student.{key}: not a DiTTransformer2DModel config key")
        patch, size = int(self.student.get("patch_size", 2)), teacher_config.get("sample_size")
        size = size[0] if isinstance(size, (list, tuple)) else size
        if int(size) % patch:
            raise UserError(f"{self.path}: student.patch_size: {patch} does not divide the teacher's sample_size {size}")

    def to_config(self, params: dict[str, Any], teacher_config: dict[str, Any]) -> dict[str, Any]:
        """The ``DiTTransformer2DModel`` config of the student that ``params`` selects (JSON-safe);
        of a UNet teacher, a one-class ``StudentDiTTransformer2DModel`` on its images."""
        if _is_dit(teacher_config):
            config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
            config["_class_name"] = teacher_config["_class_name"]
        else:
            size = teacher_config["sample_size"]
            config = {
                "_class_name": "StudentDiTTransformer2DModel",
                "sample_size": int(size[0] if isinstance(size, (list, tuple)) else size),
                "in_channels": int(teacher_config["in_channels"]),
                "out_channels": int(teacher_config["out_channels"]),
                "num_embeds_ada_norm": 1,
                "unconditional": True,
                **self.student,
            }
        for key, param in (("num_layers", "transformer.layers"), ("num_attention_heads", "transformer.heads")):
            if param in params:
                config[key] = int(params[param])
        return config


def _load_transformer_space(path: str | Path, top: Section) -> TransformerSpace:
    section = top.section("transformer", required=True)
    space = TransformerSpace(
        str(path),
        layers=section.take_list("layers", int, None, check=positive),
        heads=section.take_list("heads", int, None, check=positive),
        student=top.section("student").rest(),
    )
    section.done()
    top.done()
    if not space.parameters():
        raise UserError(f"{path}: transformer: declare layers or heads (or both)")
    return space


@dataclass(frozen=True)
class SupernetBlock:
    """Subnet choices of one teacher block (``family: supernet``); None keeps the teacher's.

    Attributes:
        name: the block (``down.1``, ``mid``, ``up.0``).
        layers: how many of the block's resnets (each with the attention that follows it) compute;
            the rest keep only their shortcut, so the block's output shape is the teacher's.
        drop: which resnets stop computing first when ``layers`` is below the block's depth:
            ``end`` (the last ones; the first ``layers`` compute) or ``middle`` (those before the
            last, from the back; the last always computes, so an up stage keeps the resnet that
            takes the skip from the level above, as BK-SDM's up stages do).
        width: inner width of the computed resnets, as a fraction of the block's channels.
        attention: whether the computed layers keep their attention.
        depth: transformer layers each kept ``Transformer2DModel`` attention computes (cross-attention
            blocks; the first ones).
        heads: attention heads a DiT block keeps (``transformer_blocks.<i>``; the most important).

    A DiT block (``transformer_blocks.<i>``) reads ``layers`` as ``[0, 1]`` (skipped or computed),
    ``width`` as its feed-forward's hidden units, ``attention`` and ``heads`` as its self-attention's.
    """

    name: str
    layers: tuple[int, ...] | None = None
    width: tuple[float, ...] | None = None
    attention: tuple[bool, ...] | None = None
    depth: tuple[int, ...] | None = None
    drop: str = "end"
    heads: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SupernetSpace:
    """Per-block subnet choices for DiffNAS: every block of the teacher gets a supernet; blocks the
    file does not declare have one candidate, the teacher's block.

    Schema::

        family: supernet
        blocks:
          down.1: {layers: [0, 1], width: [0.25, 0.5, 1.0]}
          mid:    {layers: [1, 2], width: [0.5, 1.0], attention: [true, false]}
          up.1:   {layers: [1, 2], width: [0.25, 0.5, 0.75, 1.0], depth: [1, 2], drop: middle}

    ``depth`` applies to the ``Transformer2DModel`` attentions of cross-attention blocks. A DiT's
    blocks are ``transformer_blocks.<i>``; ``all`` gives every block of the teacher one choice::

        family: supernet
        blocks:
          all: {layers: [0, 1], heads: [2, 4], width: [0.5, 1.0], attention: [true, false]}
    """

    path: str
    blocks: tuple[SupernetBlock, ...]

    def block(self, name: str) -> SupernetBlock:
        """The choices of block ``name``: its own entry, else ``all``'s, else the teacher's."""
        for b in self.blocks:
            if b.name == name:
                return b
        for b in self.blocks:
            if b.name == ALL_BLOCKS:
                return replace(b, name=name)
        return SupernetBlock(name)

    def point_of(self, unet: Any, removed: list[str], what: str) -> dict[str, int]:
        """Per block the ``layers`` that remove exactly the ``removed`` layers (block names, as
        :func:`~automl_diff.models.recipes.bk_sdm_removed` gives) at full width, depth and
        attention; ``what`` names the recipe in the error.

        Raises:
            UserError: where that is not a point of this space, naming the block.
        """
        from automl_diff.models.blocks import block_names, get_block

        point = {}
        for name in block_names(unet):
            module = get_block(unet, name)
            count = len(getattr(module, "resnets", ()))
            dropped = {i for i in range(count) if f"{name}.resnets.{i}" in removed}
            layers = count - len(dropped)
            spec = self.block(name)
            kept = computing_resnets(count, layers, spec.drop)
            has_attention = any(a is not None for a in getattr(module, "attentions", None) or ())
            transformer = max(
                (len(getattr(a, "transformer_blocks", ())) for a in getattr(module, "attentions", None) or () if a), default=0
            )
            misses = []
            if kept != set(range(count)) - dropped:
                misses.append(f"drop: {'middle' if spec.drop == 'end' else 'end'}")
            if layers not in (spec.layers if spec.layers is not None else (count,)):
                misses.append(f"layers: {layers}")
            if layers and 1.0 not in (spec.width or (1.0,)):
                misses.append("width: 1.0")
            if layers and has_attention and spec.attention is not None and True not in spec.attention:
                misses.append("attention: true")
            if layers and spec.depth is not None and not any(d >= transformer for d in spec.depth):
                misses.append(f"depth: {transformer}")
            if misses:
                gone = ", ".join(n for n in removed if n.startswith(f"{name}.")) or f"nothing of {name}"
                raise UserError(
                    f"{self.path}: blocks.{name}: {what} removes {gone}, which is not a point of this space; it needs {', '.join(misses)}"
                )
            point[name] = layers
        return point

    def recipe_point(self, unet: Any, recipe: str) -> dict[str, int]:
        """:meth:`point_of` a ``warm_start`` recipe (``bk-sdm-base``, ``bk-sdm-small``) on ``unet``."""
        from automl_diff.models.recipes import BK_SDM_RECIPES, BK_SDM_VARIANTS, bk_sdm_removed

        variant = BK_SDM_RECIPES[recipe]
        return self.point_of(unet, bk_sdm_removed(unet, variant), f"warm_start {recipe} ({BK_SDM_VARIANTS[variant]})")

    def validate_for(self, unet: Any) -> None:
        """Check the declared blocks and choices against the teacher's modules (``all``'s against
        every block it applies to).

        Raises:
            UserError: naming the file, the key and the value.
        """
        from automl_diff.models.blocks import block_names, get_block

        known = block_names(unet)
        declared = {b.name for b in self.blocks}
        for name in known:  # every block gets a supernet, declared or not
            module = get_block(unet, name)
            joint = hasattr(module, "context_pre_only")  # SD3's joint blocks
            if joint and getattr(unet.config, "dual_attention_layers", None):
                raise UserError(
                    f"{self.path}: blocks: the teacher's blocks differ (dual_attention_layers, SD3.5's MMDiT-X); "
                    "supernets of uniform joint blocks only"
                )
            if (
                name.startswith("transformer_blocks.")
                and not joint
                and not (hasattr(getattr(module, "attn1", None), "heads") and hasattr(module, "ff"))
            ):
                raise UserError(
                    f"{self.path}: blocks: the teacher's {name} was already reduced (skipped, or without attention); "
                    "supernets need full DiT blocks"
                )
        for block in self.blocks:
            key = f"blocks.{block.name}"
            if block.name == ALL_BLOCKS:
                names = [n for n in known if n not in declared]
            elif block.name not in known:
                raise UserError(f"{self.path}: {key}: unknown block; the teacher has blocks {', '.join(known)}")
            else:
                names = [block.name]
            for name in names:
                spec, module = replace(block, name=name), get_block(unet, name)
                if hasattr(module, "context_pre_only"):
                    self._check_joint_block(spec, key, module, declared=block.name != ALL_BLOCKS)
                elif name.startswith("transformer_blocks."):
                    self._check_transformer_block(spec, key, module)
                else:
                    self._check_unet_block(spec, key, module)

    def _check_unet_block(self, block: SupernetBlock, key: str, module: Any) -> None:
        resnets = list(getattr(module, "resnets", []))
        attentions = [a for a in getattr(module, "attentions", []) or [] if a is not None]
        if block.heads is not None:
            raise UserError(f"{self.path}: {key}.heads: chooses a DiT block's attention heads; {block.name} is a UNet block")
        for n in block.layers or ():
            if n > len(resnets):
                raise UserError(f"{self.path}: {key}.layers: {n} is more than the block's {len(resnets)} resnets")
        if block.attention is not None and any(block.attention) and not attentions:
            raise UserError(f"{self.path}: {key}.attention: true, but the teacher's {block.name} has no attention")
        transformer = max((len(getattr(a, "transformer_blocks", ())) for a in attentions), default=0)
        for d in block.depth or ():
            if not transformer:
                raise UserError(f"{self.path}: {key}.depth: {d}, but the teacher's {block.name} has no transformer attention")
            if d > transformer:
                raise UserError(f"{self.path}: {key}.depth: {d} is more than the {transformer} transformer layers of {block.name}")
        for resnet in resnets:
            if getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None:
                raise UserError(f"{self.path}: {key}: resnets that resample are not supported by supernets")
            if getattr(resnet, "time_embedding_norm", "default") not in ("default", "scale_shift"):
                raise UserError(f"{self.path}: {key}: resnet time embedding '{resnet.time_embedding_norm}' is not supported by supernets")
            channels = resnet.conv1.out_channels
            per_group = resnet.norm2.num_channels // resnet.norm2.num_groups
            for w in block.width or ():
                inner = round(w * channels)
                if abs(inner - w * channels) > 1e-6 or inner % per_group:
                    raise UserError(
                        f"{self.path}: {key}.width: {w} gives {w * channels:g} of {channels} channels, "
                        f"not a multiple of the {per_group} channels per norm group"
                    )

    def _check_joint_block(self, block: SupernetBlock, key: str, module: Any, *, declared: bool) -> None:
        """An SD3 joint block is kept or skipped; its last block, always kept, may be skipped only
        through ``all``."""
        for what in ("width", "attention", "depth", "heads"):
            if getattr(block, what) is not None:
                raise UserError(
                    f"{self.path}: {key}.{what}: an SD3 joint block is kept or skipped (layers: [0, 1]); it chooses nothing else"
                )
        if block.drop != "end":
            raise UserError(f"{self.path}: {key}.drop: applies to UNet blocks; an SD3 joint block chooses layers")
        for n in block.layers or ():
            if n > 1:
                raise UserError(f"{self.path}: {key}.layers: {n}; a transformer block is computed (1) or skipped (0)")
        if declared and module.context_pre_only and 0 in (block.layers or ()):
            raise UserError(f"{self.path}: {key}.layers: 0; the last SD3 block (it updates the image stream alone) is always kept")

    def _check_transformer_block(self, block: SupernetBlock, key: str, module: Any) -> None:
        attention, ff = module.attn1, module.ff
        for n in block.layers or ():
            if n > 1:
                raise UserError(f"{self.path}: {key}.layers: {n}; a transformer block is computed (1) or skipped (0)")
        for what, value in (("depth", block.depth), ("drop", None if block.drop == "end" else block.drop)):
            if value is not None:
                raise UserError(f"{self.path}: {key}.{what}: applies to UNet blocks; a DiT block chooses layers, heads, width, attention")
        for h in block.heads or ():
            if h > attention.heads:
                raise UserError(f"{self.path}: {key}.heads: {h} is more than the {attention.heads} heads of {block.name}")
        units = ff.net[0].proj.out_features
        for w in block.width or ():
            if abs(round(w * units) - w * units) > 1e-6:
                raise UserError(f"{self.path}: {key}.width: {w} gives {w * units:g} of the {units} feed-forward units, not a whole number")


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _load_supernet_space(path: str | Path, top: Section) -> SupernetSpace:
    blocks_section = top.section("blocks", required=True)
    blocks = []
    for name in list(blocks_section.data):
        block = blocks_section.section(str(name))
        blocks.append(
            SupernetBlock(
                name=str(name),
                layers=block.take_list("layers", int, None, check=lambda v: None if v >= 0 else "must be at least 0"),
                width=block.take_list("width", float, None, check=_fraction),
                attention=block.take_list("attention", bool, None),
                depth=block.take_list("depth", int, None, check=positive),
                drop=block.take("drop", str, "end", choices=DROP_ORDERS),
                heads=block.take_list("heads", int, None, check=positive),
            )
        )
        block.done()
    top.done()
    if not blocks:
        raise UserError(f"{path}: blocks: declare at least one block")
    return SupernetSpace(str(path), tuple(blocks))


def load_search_space(path: str | Path) -> SearchSpace | TransformerSpace | SupernetSpace:
    """Read and validate a search-space YAML file (structure only; see ``validate_for``).

    ``family: unet2d`` (default) and ``unet2d_condition`` give a :class:`SearchSpace`, ``family:
    dit`` a :class:`TransformerSpace`, ``family: supernet`` a :class:`SupernetSpace`.
    """
    top = Section(load_yaml(path, what="search space"), file=path)
    family = top.take("family", str, "unet2d", choices=FAMILIES)
    if family == "supernet":
        return _load_supernet_space(path, top)
    if family == "dit":
        return _load_transformer_space(path, top)
    fixed = top.section("fixed").rest()
    student = top.section("student").rest()
    blocks_section = top.section("blocks", required=True)
    blocks = []
    for name in list(blocks_section.data):
        block = blocks_section.section(str(name))
        choices = BlockChoices(
            name=str(name),
            channels=block.take_list("channels", int, None, check=positive),
            layers=block.take_list("layers", int, None, check=positive),
            attention=block.take_list("attention", bool, None),
        )
        block.done()
        blocks.append(choices)
    top.done()
    if not blocks:
        raise UserError(f"{path}: blocks: declare at least one block")
    order = {"down": 0, "mid": 1, "up": 2}

    def position(b: BlockChoices) -> tuple[int, int]:
        head, _, index = b.name.partition(".")
        return order.get(head, 3), int(index) if index.isdigit() else 0

    return SearchSpace(str(path), family, tuple(sorted(blocks, key=position)), fixed, student)
