"""Diffusers UNets whose levels, layers and widths can differ from what stock diffusers builds.

Stock ``UNet2DModel`` takes one ``layers_per_block`` for every level and one width per level.
Searched students need more, expressed as optional config keys:

* ``layers_per_block`` as a list, one depth per level (``down.i`` has ``layers_per_block[i]``
  resnets, the mirrored up block one more, as in diffusers): DKDM students.
* ``resnet_widths``: ``{"up.1.resnets.0": 32, ...}``, the inner width (``conv1`` out channels) of
  named resnets; ``0`` keeps only the resnet's shortcut (identity, or its 1x1 ``conv_shortcut``
  where channels change), so the layer's input and output shapes stay the teacher's: DiffNAS.
* ``skip_attentions``: ``["down.2.attentions.0", ...]``, attention layers replaced by identity:
  DiffNAS, and the BK-SDM peer's removed pairs.
* ``transformer_depths``: ``{"down.1.attentions.0": 1, ...}``, how many of a ``Transformer2DModel``'s
  transformer layers are kept (the first ones): DiffNAS on cross-attention blocks.

:class:`StudentUNet2DModel` is the unconditional student and :class:`StudentUNet2DConditionModel`
the text-conditioned one (a ``UNet2DConditionModel``, which takes per-level depths itself), so a
``StableDiffusionPipeline`` holds it where SD's UNet was.

Everything else, including ``forward``, ``save_pretrained`` and ``from_pretrained``, is diffusers'
own. Exported students that stock diffusers can express are saved as plain ``UNet2DModel`` or
``UNet2DConditionModel`` instead.

This module imports nothing but torch and diffusers: an export copies it into its ``unet/`` folder
as custom component code (:data:`MODULE_FILE`), so that ``DDIMPipeline.from_pretrained(folder,
trust_remote_code=True)`` (or ``StableDiffusionPipeline``'s) loads the student where only diffusers
is installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel  # noqa: F401 - ModelMixin: see below
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = [
    "LAYOUT_KEYS",
    "MODULE_FILE",
    "STUDENT_CLASSES",
    "Shortcut",
    "SkipAttention",
    "StudentUNet2DConditionModel",
    "StudentUNet2DModel",
    "narrow_resnet",
    "plain_config",
    "with_layout",
]

#: The file name this module gets inside an exported pipeline's ``unet/`` folder (custom code that
#: ``model_index.json`` names as the unet's library).
MODULE_FILE = "student_unet.py"

# A pipeline saved with ``save_pretrained`` (not exported) names this module as the unet's library;
# where the caller has imported it, diffusers' loader looks up the base classes it knows
# (``ModelMixin``) in it to find ``from_pretrained``.

_BLOCK_PATHS = {"down": "down_blocks", "up": "up_blocks", "mid": "mid_block"}


def _module_path(name: str) -> str:
    """``down.1.resnets.0`` -> ``down_blocks.1.resnets.0`` (kept here: this module is self-contained)."""
    head, _, rest = name.partition(".")
    if head not in _BLOCK_PATHS:
        raise ValueError(f"unknown block '{name}': names start with down.<i>, mid or up.<i>")
    return _BLOCK_PATHS[head] + ("." + rest if rest else "")


class Shortcut(nn.Module):
    """A resnet reduced to its shortcut: ``conv_shortcut(x)`` (or ``x``) over the output scale."""

    def __init__(self, conv_shortcut: nn.Module | None, output_scale_factor: float = 1.0) -> None:
        super().__init__()
        self.conv_shortcut = conv_shortcut
        self.output_scale_factor = output_scale_factor

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.conv_shortcut is not None:
            hidden_states = self.conv_shortcut(hidden_states)
        return hidden_states / self.output_scale_factor


class SkipAttention(nn.Module):
    """An attention layer that was dropped: returns its input (as a 1-tuple where the caller asks
    for ``return_dict=False``, as cross-attention blocks call their ``Transformer2DModel``)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if kwargs.get("return_dict", True) is False else hidden_states


def narrow_resnet(resnet: nn.Module, width: int) -> None:
    """Give a diffusers ``ResnetBlock2D`` the inner width ``width`` in place (new, untrained layers).

    ``conv1``, ``norm2``, ``conv2`` and ``time_emb_proj`` are rebuilt at that width; ``norm2`` keeps
    the teacher's channels per group. diffusers' own ``forward`` runs unchanged.
    """
    conv1, conv2, norm2 = resnet.conv1, resnet.conv2, resnet.norm2
    per_group = norm2.num_channels // norm2.num_groups
    if width % per_group:
        raise ValueError(f"width {width} is not a multiple of {per_group} channels per norm group")
    resnet.conv1 = nn.Conv2d(conv1.in_channels, width, conv1.kernel_size, conv1.stride, conv1.padding, bias=conv1.bias is not None)
    resnet.norm2 = nn.GroupNorm(width // per_group, width, eps=norm2.eps, affine=norm2.affine)
    resnet.conv2 = nn.Conv2d(width, conv2.out_channels, conv2.kernel_size, conv2.stride, conv2.padding, bias=conv2.bias is not None)
    proj = resnet.time_emb_proj
    if proj is not None:
        factor = proj.out_features // conv1.out_channels  # 2 with scale_shift time embeddings
        resnet.time_emb_proj = nn.Linear(proj.in_features, width * factor, bias=proj.bias is not None)


#: The student config keys stock diffusers does not know.
LAYOUT_KEYS = ("resnet_widths", "skip_attentions", "transformer_depths")


def _apply_layout(
    model: nn.Module,
    resnet_widths: dict[str, int] | None,
    skip_attentions: Sequence[str] | None,
    transformer_depths: dict[str, int] | None,
) -> None:
    """Narrow, reduce and drop the named layers of a freshly built UNet in place."""

    def layer(name: str, kind: str) -> nn.Module:
        parts = name.split(".")
        if len(parts) < 3 or parts[-2] != kind:
            raise ValueError(f"'{name}' is not a {kind[:-1]} layer name (e.g. down.1.{kind}.0)")
        return model.get_submodule(_module_path(name))

    def replace(name: str, module: nn.Module) -> None:
        parent, _, index = _module_path(name).rpartition(".")
        model.get_submodule(parent)[int(index)] = module

    for name, width in (resnet_widths or {}).items():
        resnet = layer(name, "resnets")
        if int(width) == 0:
            replace(name, Shortcut(resnet.conv_shortcut, resnet.output_scale_factor))
        elif int(width) != resnet.conv1.out_channels:
            narrow_resnet(resnet, int(width))
    for name, depth in (transformer_depths or {}).items():
        attention = layer(name, "attentions")
        blocks = getattr(attention, "transformer_blocks", None)
        if blocks is None or not 1 <= int(depth) <= len(blocks):
            raise ValueError(f"'{name}' has no {depth} transformer layers to keep")
        attention.transformer_blocks = nn.ModuleList(list(blocks)[: int(depth)])
    for name in skip_attentions or ():
        if not isinstance(layer(name, "attentions"), SkipAttention):
            replace(name, SkipAttention())


class StudentUNet2DModel(UNet2DModel):
    """``UNet2DModel`` with per-level depths, per-resnet widths and dropped attentions.

    Args:
        layers_per_block: an int, or one depth per level.
        resnet_widths: inner width per named resnet (``0``: shortcut only).
        skip_attentions: named attention layers replaced by identity.
        transformer_depths: must stay empty: ``UNet2DModel``'s attention has no transformer layers
            (the key exists so that both students share one schema).

    All other arguments are those of :class:`diffusers.UNet2DModel`.
    """

    def __init__(
        self,
        *,
        layers_per_block: int | Sequence[int] = 2,
        resnet_widths: dict[str, int] | None = None,
        skip_attentions: Sequence[str] | None = None,
        transformer_depths: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        depths = [layers_per_block] if isinstance(layers_per_block, int) else list(layers_per_block)
        levels = len(kwargs.get("block_out_channels", _PARENT_DEFAULTS["block_out_channels"]))
        if len(depths) == 1:
            depths = depths * levels
        if len(depths) != levels or min(depths) < 1:
            raise ValueError(f"layers_per_block needs {levels} depths of at least 1, got {layers_per_block!r}")
        super().__init__(layers_per_block=max(depths), **kwargs)
        # super().__init__ registered its own (int) layers_per_block: restore the list.
        self.register_to_config(layers_per_block=list(depths))
        deepest = max(depths)
        for level, depth in enumerate(depths):
            down = self.down_blocks[level]
            down.resnets = nn.ModuleList(list(down.resnets)[:depth])
            if hasattr(down, "attentions"):
                down.attentions = nn.ModuleList(list(down.attentions)[:depth])
            # The up block of this level consumes `depth` skips of this level plus one from the level
            # above; its last resnet takes the latter, so keep the first `depth` and the last one.
            up = self.up_blocks[len(depths) - 1 - level]
            keep = [*range(depth), deepest]
            up.resnets = nn.ModuleList([up.resnets[i] for i in keep])
            if hasattr(up, "attentions"):
                up.attentions = nn.ModuleList([up.attentions[i] for i in keep])
        _apply_layout(self, resnet_widths, skip_attentions, transformer_depths)


class StudentUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` with per-resnet widths, dropped attentions and shallower
    transformers (per-level depths are stock: ``layers_per_block`` takes a list).

    Args:
        resnet_widths: inner width per named resnet (``0``: shortcut only).
        skip_attentions: named attention layers (``Transformer2DModel``) replaced by identity.
        transformer_depths: transformer layers kept per named attention layer.

    All other arguments are those of :class:`diffusers.UNet2DConditionModel`.
    """

    def __init__(
        self,
        *,
        resnet_widths: dict[str, int] | None = None,
        skip_attentions: Sequence[str] | None = None,
        transformer_depths: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _apply_layout(self, resnet_widths, skip_attentions, transformer_depths)


# diffusers reads a model's config keys from the signature of its ``__init__`` (``from_config``,
# ``register_to_config``): give ours the parent's keyword parameters and the layout keys.
def _signature(cls: type, parent: type, depth_list: bool) -> None:
    signature = inspect.signature(parent.__init__)
    params = [
        p
        if p.name == "self"
        else p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation="int | Sequence[int]")
        if p.name == "layers_per_block" and depth_list
        else p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in signature.parameters.values()
    ]
    params += [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None) for key in LAYOUT_KEYS]
    cls.__init__.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    cls.__init__ = register_to_config(cls.__init__)  # type: ignore[method-assign]


_PARENT_DEFAULTS = {name: p.default for name, p in inspect.signature(UNet2DModel.__init__).parameters.items() if name != "self"}
_signature(StudentUNet2DModel, UNet2DModel, depth_list=True)
_signature(StudentUNet2DConditionModel, UNet2DConditionModel, depth_list=False)

#: Student class name -> (class, the stock class whose config it extends).
STUDENT_CLASSES: dict[str, tuple[type, type]] = {
    "StudentUNet2DModel": (StudentUNet2DModel, UNet2DModel),
    "StudentUNet2DConditionModel": (StudentUNet2DConditionModel, UNet2DConditionModel),
}


def with_layout(
    config: dict[str, Any],
    *,
    resnet_widths: dict[str, int] | None = None,
    skip_attentions: Sequence[str] = (),
    transformer_depths: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The student config of ``config`` (a teacher's, or a student's whose own layout entries are
    kept) with more resnets narrowed, attentions dropped and transformers made shallower; its class
    is the student of the config's kind (``StudentUNet2DConditionModel`` where the UNet attends to
    text). A dropped attention needs no depth."""
    out = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    widths = {**(out.pop("resnet_widths", None) or {}), **(resnet_widths or {})}
    skips = list(out.pop("skip_attentions", None) or [])
    skips += [a for a in skip_attentions if a not in skips]
    depths = {**(out.pop("transformer_depths", None) or {}), **(transformer_depths or {})}
    depths = {k: v for k, v in depths.items() if k not in skips}
    name = "StudentUNet2DConditionModel" if out.get("cross_attention_dim") is not None else "StudentUNet2DModel"
    out.update(_class_name=name, resnet_widths=widths, skip_attentions=skips, transformer_depths=depths)
    return out


def plain_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The stock diffusers config of a student config that stock diffusers can express (no
    narrowed resnet, dropped attention or shallower transformer; for ``UNet2DModel`` one depth for
    every level), else None. Both build the same modules under the same names, so the student's
    weights load into it unchanged."""
    if any(config.get(key) for key in LAYOUT_KEYS):
        return None
    name = config.get("_class_name", "StudentUNet2DModel")
    plain = {k: v for k, v in config.items() if k not in LAYOUT_KEYS}
    if name == "StudentUNet2DConditionModel":
        plain["_class_name"] = "UNet2DConditionModel"
        return plain
    depths = config.get("layers_per_block", 2)
    depths = [depths] if isinstance(depths, int) else list(depths)
    if len(set(depths)) != 1:
        return None
    plain.update(_class_name="UNet2DModel", layers_per_block=depths[0])
    return plain
