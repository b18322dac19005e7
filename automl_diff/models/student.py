"""A ``UNet2DModel`` whose resolution levels may have different depths.

Stock ``UNet2DModel`` takes one ``layers_per_block`` for every level. Searched students often want
fewer layers at the high-resolution levels than at the low ones, so this subclass accepts a list,
one entry per level (``down.i`` has ``layers_per_block[i]`` resnets, the mirrored up block one more,
as in diffusers). Everything else, including ``forward``, ``save_pretrained`` and
``from_pretrained``, is diffusers' own. Exported students whose levels all have the same depth are
saved as plain ``UNet2DModel`` instead.

Loading an exported student::

    from automl_diff import StudentUNet2DModel
    unet = StudentUNet2DModel.from_pretrained("exports/trial_3", subfolder="unet")
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from diffusers import ModelMixin, UNet2DModel  # noqa: F401 - ModelMixin: see below
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = ["StudentUNet2DModel"]

# An exported pipeline's model_index.json names this module as the unet's library; diffusers'
# loader then looks up the base classes it knows (``ModelMixin``) in this module to find
# ``from_pretrained``. Importing ModelMixin here is what lets ``DDIMPipeline.from_pretrained`` load
# a student with per-level depths without any extra argument.


class StudentUNet2DModel(UNet2DModel):
    """``UNet2DModel`` with ``layers_per_block`` as an int or a list (one depth per level).

    All other arguments are those of :class:`diffusers.UNet2DModel`.
    """

    def __init__(self, *, layers_per_block: int | Sequence[int] = 2, **kwargs: Any) -> None:
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


# diffusers reads a model's config keys from the signature of its ``__init__`` (``from_config``,
# ``register_to_config``): give ours the parent's keyword parameters, with the list-valued depth.
_PARENT_SIGNATURE = inspect.signature(UNet2DModel.__init__)
_PARENT_DEFAULTS = {name: p.default for name, p in _PARENT_SIGNATURE.parameters.items() if name != "self"}
StudentUNet2DModel.__init__.__signature__ = _PARENT_SIGNATURE.replace(  # type: ignore[attr-defined]
    parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation="int | Sequence[int]")
        if p.name == "layers_per_block"
        else (p if p.name == "self" else p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        for p in _PARENT_SIGNATURE.parameters.values()
    ]
)
StudentUNet2DModel.__init__ = register_to_config(StudentUNet2DModel.__init__)  # type: ignore[method-assign]
