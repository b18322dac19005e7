"""A diffusers DiT whose blocks can differ from one another: skipped, fewer heads, a narrower MLP.

Stock ``DiTTransformer2DModel`` builds every ``transformer_blocks.<i>`` alike. DiffNAS students
choose per block, expressed as optional config keys (one entry per block, the teacher's count):

* ``skip_blocks``: ``[1, 4]``, blocks that pass their input through (the first block keeps its
  ``norm1``: diffusers reads the output layer's conditioning from ``transformer_blocks[0]``);
* ``block_heads``: self-attention heads per block, of the teacher's head size (``0``: the block's
  attention is dropped and adds nothing to the residual stream);
* ``block_ff_dims``: hidden units of each block's feed-forward;
* ``unconditional``: the model has one class and is called as an unconditional UNet is
  (``model(sample, timestep)``, the timestep a scalar or one per sample): a DiT student of an
  unconditional UNet teacher, which a ``DDIMPipeline`` holds as its ``unet``.

:class:`StudentDiTTransformer2DModel` is the model; ``forward``, ``save_pretrained`` and
``from_pretrained`` are diffusers' own. A student that stock diffusers can express is exported as a
plain ``DiTTransformer2DModel`` (:func:`plain_config`).

This module imports nothing but torch and diffusers: an export copies it into its ``transformer/``
folder as custom component code (:data:`MODULE_FILE`), so that ``DiTPipeline.from_pretrained(folder,
trust_remote_code=True)`` loads the student where only diffusers is installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, ModelMixin  # noqa: F401 - ModelMixin: diffusers' loader looks it up here
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

__all__ = [
    "LAYOUT_KEYS",
    "MODULE_FILE",
    "STUDENT_CLASSES",
    "SkipBlock",
    "StudentDiTTransformer2DModel",
    "ZeroAttention",
    "dit_block",
    "plain_config",
]

#: The file name this module gets inside an exported pipeline's ``transformer/`` folder.
MODULE_FILE = "student_transformer.py"

#: The student config keys stock diffusers does not know.
LAYOUT_KEYS = ("skip_blocks", "block_heads", "block_ff_dims", "unconditional")


class ZeroAttention(nn.Module):
    """A dropped self-attention: adds nothing to the residual stream (its output is zero)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class SkipBlock(nn.Module):
    """A transformer block that was dropped: returns its input. ``norm1`` is kept where the model
    reads its conditioning embedding (the first block)."""

    def __init__(self, norm1: nn.Module | None = None) -> None:
        super().__init__()
        self.norm1 = norm1

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def dit_block(config: Any, heads: int | None = None, ff_dim: int | None = None) -> BasicTransformerBlock:
    """One block of a DiT of ``config`` (a diffusers config), as ``DiTTransformer2DModel`` builds
    it, with ``heads`` attention heads (0: dropped) and ``ff_dim`` feed-forward units."""
    heads = int(config.num_attention_heads) if heads is None else int(heads)
    block = BasicTransformerBlock(
        int(config.num_attention_heads) * int(config.attention_head_dim),
        heads or int(config.num_attention_heads),
        int(config.attention_head_dim),
        dropout=config.dropout,
        activation_fn=config.activation_fn,
        num_embeds_ada_norm=config.num_embeds_ada_norm,
        attention_bias=config.attention_bias,
        upcast_attention=config.upcast_attention,
        norm_type=config.norm_type,
        norm_elementwise_affine=config.norm_elementwise_affine,
        norm_eps=config.norm_eps,
        ff_inner_dim=None if ff_dim is None else int(ff_dim),
    )
    if heads == 0:
        block.attn1 = ZeroAttention()
    return block


class StudentDiTTransformer2DModel(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` with skipped blocks and per-block heads and feed-forward widths.

    Args:
        skip_blocks: indices of blocks that pass their input through.
        block_heads: attention heads per block (``0``: no attention; None: the model's).
        block_ff_dims: feed-forward hidden units per block (None: diffusers' default, 4x the width).
        unconditional: called without class labels (class 0), the timestep broadcast to the batch.

    All other arguments are those of :class:`diffusers.DiTTransformer2DModel`.
    """

    def __init__(
        self,
        *,
        skip_blocks: Sequence[int] | None = None,
        block_heads: Sequence[int] | None = None,
        block_ff_dims: Sequence[int] | None = None,
        unconditional: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        count = len(self.transformer_blocks)
        for key, values in (("block_heads", block_heads), ("block_ff_dims", block_ff_dims)):
            if values is not None and len(values) != count:
                raise ValueError(f"{key} needs one entry per block ({count}), got {list(values)!r}")
        full = int(self.config.num_attention_heads)
        for i in range(count):
            heads = full if block_heads is None else int(block_heads[i])
            ff_dim = None if block_ff_dims is None else int(block_ff_dims[i])
            if not 0 <= heads <= full:
                raise ValueError(f"block_heads[{i}] is {heads}; the model has {full} heads")
            if heads != full or ff_dim is not None:
                self.transformer_blocks[i] = dit_block(self.config, heads, ff_dim)
        for i in skip_blocks or ():
            if not 0 <= int(i) < count:
                raise ValueError(f"skip_blocks: block {i} is not one of the {count} blocks")
            self.transformer_blocks[int(i)] = SkipBlock(self.transformer_blocks[0].norm1 if int(i) == 0 else None)

    def forward(self, hidden_states: torch.Tensor, timestep: Any = None, class_labels: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self.config.unconditional:
            batch = hidden_states.shape[0]
            timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)
            if class_labels is None:
                class_labels = torch.zeros(batch, dtype=torch.long, device=hidden_states.device)
        return super().forward(hidden_states, timestep, class_labels, *args, **kwargs)


# diffusers reads a model's config keys from the signature of its ``__init__``: give ours the
# parent's keyword parameters and the layout keys.
_parent = inspect.signature(DiTTransformer2DModel.__init__)
StudentDiTTransformer2DModel.__init__.__signature__ = _parent.replace(  # type: ignore[attr-defined]
    parameters=[p if p.name == "self" else p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _parent.parameters.values()]
    + [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None) for key in LAYOUT_KEYS]
)
StudentDiTTransformer2DModel.__init__ = register_to_config(StudentDiTTransformer2DModel.__init__)  # type: ignore[method-assign]

#: Student class name -> (class, the stock class whose config it extends).
STUDENT_CLASSES: dict[str, tuple[type, type]] = {"StudentDiTTransformer2DModel": (StudentDiTTransformer2DModel, DiTTransformer2DModel)}


def plain_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The stock ``DiTTransformer2DModel`` config of a student config with no skipped block,
    every block at the model's heads and default feed-forward width, and class labels, else None."""
    heads = config.get("num_attention_heads")
    width = int(heads) * int(config.get("attention_head_dim"))
    if config.get("skip_blocks") or config.get("unconditional") or any(h != heads for h in config.get("block_heads") or ()):
        return None
    if any(d != 4 * width for d in config.get("block_ff_dims") or ()):
        return None
    return {**{k: v for k, v in config.items() if k not in LAYOUT_KEYS}, "_class_name": "DiTTransformer2DModel"}
