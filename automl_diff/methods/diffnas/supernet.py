"""Block supernets: every candidate subnet of a teacher block, with shared weights.

A :class:`BlockSupernet` is a copy of one teacher block (``down.1``, ``mid``, ``up.0`` ...) whose
resnets and attentions become elastic: a :class:`BlockChoice` sets how many of the block's resnets
compute (``layers``; each attention follows its resnet), their inner width (``width``, a fraction
of the block's channels; narrower subnets use the first channels of the shared weights), whether
attention is kept and, for the ``Transformer2DModel`` attentions of cross-attention blocks
(``CrossAttnDownBlock2D``, ``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``), how many of their
transformer layers compute (``depth``). The text conditioning reaches every candidate as the
teacher block's own call arguments (``encoder_hidden_states``). A resnet that does not compute keeps its shortcut (identity, or the 1x1
``conv_shortcut`` where channels change), so every candidate maps the teacher block's inputs to
outputs of the teacher block's shapes and plugs in where the block was.

:meth:`BlockSupernet.subnet` cuts a candidate out as a plain diffusers block (the layout
:mod:`~automl_diff.models.student` builds from ``resnet_widths`` and
``skip_attentions``, ``transformer_depths``), and :func:`assemble_student` puts the chosen subnets of every block into one
student that inherits their weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automl_diff.config.search_space import SupernetSpace, computing_resnets
from automl_diff.methods.diffnas.choice import BlockChoice, Supernet
from automl_diff.methods.diffnas.transformer import JointBlockSupernet, TransformerBlockSupernet, kept_blocks, transformer_layout
from automl_diff.models.blocks import block_names, get_block, name_to_module_path
from automl_diff.models.inherit import cut_resnet
from automl_diff.models.student import Shortcut, SkipAttention, with_layout
from automl_diff.models.student_transformer import StudentDiTTransformer2DModel
from automl_diff.models.students import STUDENT_CLASSES

__all__ = [
    "BlockChoice",
    "BlockSupernet",
    "ElasticResnet",
    "Supernet",
    "assemble_student",
    "build_supernets",
    "iter_tensors",
    "plug_supernets",
    "student_config",
]


class ElasticResnet(nn.Module):
    """A diffusers ``ResnetBlock2D`` that computes at any inner width up to its own, or not at all.

    At full width it computes exactly what the wrapped resnet computes; narrower widths use the
    first ``width`` output channels of ``conv1`` (and of ``norm2``, ``time_emb_proj``) and the
    first ``width`` input channels of ``conv2``.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet = resnet
        self.full_width = resnet.conv1.out_channels
        self.per_group = resnet.norm2.num_channels // resnet.norm2.num_groups
        self.width = self.full_width
        self.active = True

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        if r.conv_shortcut is not None:
            x = r.conv_shortcut(x)
        return x / r.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.active:
            return self.shortcut(input_tensor)
        r, w = self.resnet, self.width
        h = r.nonlinearity(r.norm1(input_tensor))
        h = r.conv1._conv_forward(h, r.conv1.weight[:w], None if r.conv1.bias is None else r.conv1.bias[:w])
        if r.time_emb_proj is not None and temb is not None:
            if not r.skip_time_act:
                temb = r.nonlinearity(temb)
            rows = _proj_rows(self.full_width, w, r.time_emb_proj.out_features, r.time_emb_proj.weight.device)
            bias = None if r.time_emb_proj.bias is None else r.time_emb_proj.bias[rows]
            temb = F.linear(temb, r.time_emb_proj.weight[rows], bias)[:, :, None, None]
        norm2 = r.norm2
        weight = None if norm2.weight is None else norm2.weight[:w]
        bias = None if norm2.bias is None else norm2.bias[:w]
        if r.time_embedding_norm == "default":
            if temb is not None:
                h = h + temb
            h = F.group_norm(h, w // self.per_group, weight, bias, norm2.eps)
        else:  # scale_shift
            scale, shift = torch.chunk(temb, 2, dim=1)
            h = F.group_norm(h, w // self.per_group, weight, bias, norm2.eps)
            h = h * (1 + scale) + shift
        h = r.dropout(r.nonlinearity(h))
        h = r.conv2._conv_forward(h, r.conv2.weight[:, :w], r.conv2.bias)
        x = input_tensor if r.conv_shortcut is None else r.conv_shortcut(input_tensor)
        return (x + h) / r.output_scale_factor


def _proj_rows(full: int, width: int, out_features: int, device: torch.device) -> torch.Tensor | slice:
    """Rows of ``time_emb_proj`` that a width uses: the first ``width`` of each ``full``-sized chunk
    (one chunk, or scale and shift)."""
    if out_features == full:
        return slice(0, width)
    return torch.cat([torch.arange(k * full, k * full + width, device=device) for k in range(out_features // full)])


class ElasticAttention(nn.Module):
    """An attention layer that can be switched off (identity) and, for a ``Transformer2DModel``,
    run only its first ``depth`` transformer layers (0: all)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.active = True
        self.depth = 0

    @property
    def full_depth(self) -> int:
        """Transformer layers of the wrapped attention (0 where it is not a transformer)."""
        return len(getattr(self.attention, "transformer_blocks", ()))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return SkipAttention()(hidden_states, *args, **kwargs)
        if not self.depth or self.depth >= self.full_depth:
            return self.attention(hidden_states, *args, **kwargs)
        full = self.attention.transformer_blocks
        self.attention.transformer_blocks = full[: self.depth]
        try:
            return self.attention(hidden_states, *args, **kwargs)
        finally:
            self.attention.transformer_blocks = full


class BlockSupernet(Supernet):
    """The supernet of one teacher block.

    Args:
        name: the block's name (``down.1``).
        block: the teacher's block (copied; the teacher is not modified).
        layers, width, attention, depth: the choices (None: the teacher's only).
        drop: which resnets stop computing first below the block's depth (``end``: the last
            ones; ``middle``: those before the last, from the back; the search space's ``drop``).
    """

    def __init__(
        self,
        name: str,
        block: nn.Module,
        *,
        layers: tuple[int, ...] | None = None,
        width: tuple[float, ...] | None = None,
        attention: tuple[bool, ...] | None = None,
        depth: tuple[int, ...] | None = None,
        drop: str = "end",
    ) -> None:
        super().__init__()
        self.name = name
        self.drop = drop
        self.block = copy.deepcopy(block)
        self.block.requires_grad_(True)
        self.block.resnets = nn.ModuleList([ElasticResnet(r) for r in self.block.resnets])
        attentions = getattr(self.block, "attentions", None)
        self.has_attention = bool(attentions) and any(a is not None for a in attentions)
        if attentions is not None:
            self.block.attentions = nn.ModuleList([a if a is None else ElasticAttention(a) for a in attentions])
        self.layers = tuple(sorted(set(layers if layers is not None else (len(self.block.resnets),))))
        self.widths = tuple(sorted(set(width if width is not None else (1.0,))))
        self.attention_choices = tuple(sorted(set(attention if attention is not None else (self.has_attention,))))
        self.full_depth = max((a.full_depth for a in self.block.attentions if a is not None), default=0) if attentions else 0
        self.depths = tuple(
            sorted({0 if d >= self.full_depth else d for d in (depth if depth is not None else (0,))}, key=self._depth_order)
        )
        self.heads = (0,)
        self.choice = self.largest()

    def computing(self, choice: BlockChoice) -> frozenset[int]:
        """The indices of the resnets (each with the attention after it) that ``choice`` computes."""
        return computing_resnets(len(self.block.resnets), choice.layers, self.drop)

    def _depth_order(self, depth: int) -> int:
        """Depths ordered by how much they compute (0, all layers, last)."""
        return depth or self.full_depth

    # -- candidates ----------------------------------------------------------------------------
    def canonical(self, choice: BlockChoice) -> BlockChoice:
        """The representative of the candidates that compute the same thing (``layers=0`` ignores
        width and attention; a block without attention has ``attention=False``; a candidate without
        attention ignores depth). Its depth is always one of :attr:`depths`."""
        if choice.layers == 0:
            return BlockChoice(0, max(self.widths), False, self.depths[-1])
        attention = choice.attention and self.has_attention
        depth = 0 if choice.depth >= self.full_depth else choice.depth
        depth = depth if attention and depth in self.depths else self.depths[-1]
        return BlockChoice(choice.layers, choice.width, attention, depth)

    # -- computing ----------------------------------------------------------------------------
    def inner_width(self, resnet: ElasticResnet, width: float) -> int:
        return round(width * resnet.full_width)

    def set(self, choice: BlockChoice) -> BlockSupernet:
        """Make the supernet compute ``choice`` (returns self)."""
        choice = self.canonical(choice)
        computing = self.computing(choice)
        attentions = getattr(self.block, "attentions", None)
        for i, resnet in enumerate(self.block.resnets):
            resnet.active = i in computing
            resnet.width = self.inner_width(resnet, choice.width)
            if attentions is not None and i < len(attentions) and attentions[i] is not None:
                attentions[i].active = choice.attention and i in computing
                attentions[i].depth = choice.depth
        self.choice = choice
        return self

    @property
    def resnets(self) -> nn.ModuleList:
        """The block's (elastic) resnets; the UNet's forward reads their number."""
        return self.block.resnets

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block(*args, **kwargs)

    # -- cutting out ----------------------------------------------------------------------------
    def layout(self, choice: BlockChoice) -> tuple[dict[str, int], list[str], dict[str, int]]:
        """``resnet_widths``, ``skip_attentions`` and ``transformer_depths`` entries (student
        config) of a candidate."""
        choice = self.canonical(choice)
        computing = self.computing(choice)
        widths: dict[str, int] = {}
        skips: list[str] = []
        depths: dict[str, int] = {}
        attentions = getattr(self.block, "attentions", None)
        for i, resnet in enumerate(self.block.resnets):
            inner = self.inner_width(resnet, choice.width) if i in computing else 0
            if inner != resnet.full_width:
                widths[f"{self.name}.resnets.{i}"] = inner
            has_attention = attentions is not None and i < len(attentions) and attentions[i] is not None
            if has_attention and not (choice.attention and i in computing):
                skips.append(f"{self.name}.attentions.{i}")
            elif has_attention and choice.depth:
                depths[f"{self.name}.attentions.{i}"] = choice.depth
        return widths, skips, depths

    @torch.no_grad()
    def subnet(self, choice: BlockChoice) -> nn.Module:
        """The candidate as a plain diffusers block with the shared weights cut out (a copy)."""
        choice = self.canonical(choice)
        computing = self.computing(choice)
        block = copy.deepcopy(self.block)
        attentions = getattr(block, "attentions", None)
        resnets = []
        for i, elastic in enumerate(block.resnets):
            r = elastic.resnet
            if i not in computing:
                resnets.append(Shortcut(r.conv_shortcut, r.output_scale_factor))
                continue
            width = self.inner_width(elastic, choice.width)
            if width != elastic.full_width:  # the leading channels: the width elastic steps trained
                cut_resnet(r, torch.arange(width))
            resnets.append(r)
        block.resnets = nn.ModuleList(resnets)
        if attentions is not None:
            block.attentions = nn.ModuleList(
                [
                    a if a is None else (a.attention if choice.attention and i in computing else SkipAttention())
                    for i, a in enumerate(attentions)
                ]
            )
            for attention in block.attentions:
                if choice.depth and hasattr(attention, "transformer_blocks"):
                    attention.transformer_blocks = attention.transformer_blocks[: choice.depth]
        return block.requires_grad_(False)


def build_supernets(teacher: nn.Module, space: SupernetSpace) -> dict[str, Supernet]:
    """One supernet per teacher block, with the space's choices (the teacher's only where
    undeclared): UNet blocks, or a DiT's transformer blocks."""
    out: dict[str, Supernet] = {}
    for name in block_names(teacher):
        spec = space.block(name)
        block = get_block(teacher, name)
        if name.startswith("transformer_blocks.") and hasattr(block, "context_pre_only"):  # SD3's joint blocks
            out[name] = JointBlockSupernet(name, block, layers=spec.layers)
        elif name.startswith("transformer_blocks."):
            out[name] = TransformerBlockSupernet(
                name, block, teacher.config, layers=spec.layers, width=spec.width, attention=spec.attention, heads=spec.heads
            )
        else:
            out[name] = BlockSupernet(
                name, block, layers=spec.layers, width=spec.width, attention=spec.attention, depth=spec.depth, drop=spec.drop
            )
    return out


def student_config(
    teacher_config: Mapping[str, Any], supernets: Mapping[str, Supernet], choices: Mapping[str, BlockChoice]
) -> dict[str, Any]:
    """The diffusers config (``StudentUNet2DModel``, ``StudentUNet2DConditionModel`` for a
    text-conditioned teacher, ``StudentDiTTransformer2DModel`` for a DiT, a shallower
    ``SD3Transformer2DModel`` for SD3) of the student that ``choices`` select."""
    if _joint(supernets):
        config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
        return {**config, "_class_name": "SD3Transformer2DModel", "num_layers": len(kept_blocks(supernets, choices))}
    if any(isinstance(s, TransformerBlockSupernet) for s in supernets.values()):
        config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
        return {**config, "_class_name": StudentDiTTransformer2DModel.__name__, **transformer_layout(supernets, choices)}
    widths: dict[str, int] = {}
    skips: list[str] = []
    depths: dict[str, int] = {}
    for name, supernet in supernets.items():
        w, s, d = supernet.layout(choices.get(name, supernet.largest()))
        widths.update(w)
        skips += s
        depths.update(d)
    return with_layout(dict(teacher_config), resnet_widths=widths, skip_attentions=skips, transformer_depths=depths)


#: The teacher's state that belongs to its blocks (what the supernets' subnets replace).
_BLOCK_STATE = ("down_blocks.", "up_blocks.", "mid_block.", "transformer_blocks.")


@torch.no_grad()
def assemble_student(
    teacher: nn.Module, supernets: Mapping[str, Supernet], choices: Mapping[str, BlockChoice]
) -> tuple[nn.Module, dict[str, Any]]:
    """The student with each block's chosen subnet, inheriting the supernets' weights (and the
    teacher's outside the blocks). Returns the model and its config."""
    config = student_config(teacher.config, supernets, choices)
    student = (type(teacher) if _joint(supernets) else STUDENT_CLASSES[config["_class_name"]][0]).from_config(config)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(_BLOCK_STATE)}
    for name, mine in block_pairs(supernets, choices).items():
        supernet = supernets[name]
        prefix = name_to_module_path(mine) + "."
        state.update({prefix + k: v for k, v in supernet.subnet(choices.get(name, supernet.largest())).state_dict().items()})
    student.load_state_dict(state, strict=True)
    param = next(teacher.parameters())
    student.to(param.device)
    if param.dtype != torch.float32:
        student.to(param.dtype)
    return student.eval(), config


def block_pairs(supernets: Mapping[str, Supernet], choices: Mapping[str, BlockChoice]) -> dict[str, str]:
    """Each teacher block the student of ``choices`` holds, with its name in the student: the
    same name, except in a shallower SD3 student, which numbers its kept blocks anew."""
    if _joint(supernets):
        return {name: f"transformer_blocks.{i}" for i, name in enumerate(kept_blocks(supernets, choices))}
    return {name: name for name in supernets}


def _joint(supernets: Mapping[str, Supernet]) -> bool:
    """Whether the supernets are an SD3 transformer's (joint blocks)."""
    return any(isinstance(s, JointBlockSupernet) for s in supernets.values())


def plug_supernets(teacher: nn.Module, supernets: Mapping[str, Supernet]) -> nn.Module:
    """A copy of the teacher that runs each block through its supernet (at the supernet's current
    choice): the model a set of block choices describes before it is cut out and retrained."""
    composite = copy.deepcopy(teacher)
    for name, supernet in supernets.items():
        parent, _, index = name_to_module_path(name).rpartition(".")
        if parent:
            composite.get_submodule(parent)[int(index)] = supernet
        else:
            setattr(composite, index, supernet)
    return composite


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a block's output (a tensor, or nested tuples such as ``(hidden, skips)``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_tensors(v)
