"""Supernets of transformer blocks (DiT): kept or skipped, fewer attention heads, a narrower MLP.

A :class:`TransformerBlockSupernet` is a copy of one ``transformer_blocks.<i>`` of a
``DiTTransformer2DModel`` whose self-attention computes any number of its heads (or none) and
whose feed-forward computes any leading share of its hidden units, with weights shared by every
candidate. Before training, heads and units are reordered by L1 importance (the block computes
the same), so that a narrow candidate keeps the most important ones, as weight-sharing NAS does
with channels. A candidate's :class:`~automl_diff.methods.diffnas.choice.BlockChoice` reads:

* ``layers``: 1 computes the block, 0 skips it (its input passes through);
* ``heads``: attention heads kept (0: all), ``attention``: false drops the attention;
* ``width``: the feed-forward's hidden units, as a fraction of the block's.

:meth:`TransformerBlockSupernet.subnet` cuts a candidate out as the block
:class:`~automl_diff.models.student_transformer.StudentDiTTransformer2DModel` builds from
``skip_blocks``, ``block_heads`` and ``block_ff_dims``.

A :class:`JointBlockSupernet` is the supernet of one of SD3's joint blocks (text and image streams
updated together): kept or skipped, both streams passing through. Its students are stock
``SD3Transformer2DModel``s with the kept blocks (:func:`kept_blocks`); the last block, which
updates the image stream alone, is always kept.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from torch import nn

from automl_diff.errors import UserError
from automl_diff.methods.diffnas.choice import BlockChoice, Supernet
from automl_diff.models.inherit_transformer import sort_block_by_importance
from automl_diff.models.student_transformer import SkipBlock, dit_block

__all__ = ["ElasticFeedForward", "ElasticSelfAttention", "JointBlockSupernet", "TransformerBlockSupernet", "transformer_layout"]


class ElasticSelfAttention(nn.Module):
    """A diffusers ``Attention`` (self-attention, as DiT's) that computes its first ``heads`` heads
    (0: none, its output is zero). Its layers keep the wrapped attention's names (``to_q``,
    ``to_out.0``), so its weights are the block's own."""

    def __init__(self, attention: nn.Module, where: str) -> None:
        super().__init__()
        unsupported = [
            name for name in ("norm_q", "norm_k", "group_norm", "spatial_norm", "norm_cross") if getattr(attention, name, None) is not None
        ]
        unsupported += [name for name in ("residual_connection", "is_cross_attention") if getattr(attention, name)]
        if attention.rescale_output_factor != 1.0:
            unsupported.append("rescale_output_factor")
        if unsupported:
            raise UserError(f"{where}: supernets support plain self-attention (DiT's); this block's has {', '.join(unsupported)}")
        self.to_q, self.to_k, self.to_v, self.to_out = attention.to_q, attention.to_k, attention.to_v, attention.to_out
        self.full_heads = int(attention.heads)
        self.head_dim = attention.to_q.out_features // self.full_heads
        self.scale = attention.scale
        self.heads = self.full_heads

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.heads == 0:
            return torch.zeros_like(hidden_states)
        inner = self.heads * self.head_dim
        batch, tokens, _ = hidden_states.shape

        def project(layer: nn.Linear) -> torch.Tensor:
            out = F.linear(hidden_states, layer.weight[:inner], None if layer.bias is None else layer.bias[:inner])
            return out.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(project(self.to_q), project(self.to_k), project(self.to_v), scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, inner).to(hidden_states.dtype)
        linear = self.to_out[0]
        return self.to_out[1](F.linear(out, linear.weight[:, :inner], linear.bias))


class ElasticFeedForward(nn.Module):
    """A diffusers ``FeedForward`` with a GELU input projection (DiT's ``gelu-approximate``) that
    computes its first ``width`` hidden units. Its layers keep the wrapped names (``net.0.proj``)."""

    def __init__(self, ff: nn.Module, where: str) -> None:
        super().__init__()
        if not isinstance(ff.net[0], GELU):
            raise UserError(f"{where}: supernets support GELU feed-forwards (DiT's); this block's is {type(ff.net[0]).__name__}")
        self.net = ff.net
        self.full_width = ff.net[0].proj.out_features
        self.width = self.full_width

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        act, proj, out, w = self.net[0], self.net[0].proj, self.net[2], self.width
        h = act.gelu(F.linear(hidden_states, proj.weight[:w], None if proj.bias is None else proj.bias[:w]))
        h = F.linear(self.net[1](h), out.weight[:, :w], out.bias)
        for layer in self.net[3:]:
            h = layer(h)
        return h


class TransformerBlockSupernet(Supernet):
    """The supernet of one DiT block.

    Args:
        name: the block's name (``transformer_blocks.2``).
        block: the teacher's ``BasicTransformerBlock`` (copied; the teacher is not modified).
        config: the teacher's config (the student builds its blocks from it).
        layers: ``(0, 1)`` where the block may be skipped.
        width: feed-forward widths, fractions of its hidden units.
        attention: whether the attention is kept (``(False, True)``: may be dropped).
        heads: attention heads kept.
    """

    def __init__(
        self,
        name: str,
        block: nn.Module,
        config: Any,
        *,
        layers: tuple[int, ...] | None = None,
        width: tuple[float, ...] | None = None,
        attention: tuple[bool, ...] | None = None,
        heads: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.name, self.config = name, config
        self.index = int(name.rsplit(".", 1)[1])
        self.block = copy.deepcopy(block).requires_grad_(True)
        sort_block_by_importance(self.block)
        self.block.attn1 = ElasticSelfAttention(self.block.attn1, name)
        self.block.ff = ElasticFeedForward(self.block.ff, name)
        self.full_heads = self.block.attn1.full_heads
        self.active = True
        self.layers = tuple(sorted(set(layers or (1,))))
        self.widths = tuple(sorted(set(width or (1.0,))))
        self.attention_choices = tuple(sorted(set(attention or (True,))))
        self.depths = (0,)
        self.heads = tuple(sorted({0 if h >= self.full_heads else h for h in heads or (0,)}, key=lambda h: h or self.full_heads))
        self.choice = self.largest()

    @property
    def norm1(self) -> nn.Module:
        """The block's adaLN (DiT reads its output conditioning from the first block's)."""
        return self.block.norm1

    def canonical(self, choice: BlockChoice) -> BlockChoice:
        """The representative of the candidates that compute the same thing: a skipped block
        ignores width, heads and attention; a dropped attention ignores heads."""
        if choice.layers == 0:
            return BlockChoice(0, max(self.widths), False, 0, self.heads[-1])
        heads = 0 if choice.heads >= self.full_heads else choice.heads
        heads = heads if choice.attention and heads in self.heads else self.heads[-1]
        return BlockChoice(1, choice.width, choice.attention, 0, heads)

    def _sizes(self, choice: BlockChoice) -> tuple[int, int]:
        """Heads (0: none) and feed-forward units of a computed candidate."""
        heads = (choice.heads or self.full_heads) if choice.attention else 0
        return heads, round(choice.width * self.block.ff.full_width)

    def set(self, choice: BlockChoice) -> TransformerBlockSupernet:
        choice = self.canonical(choice)
        self.active = choice.layers > 0
        self.block.attn1.heads, self.block.ff.width = self._sizes(choice)
        self.choice = choice
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return args[0] if args else kwargs["hidden_states"]
        return self.block(*args, **kwargs)

    def layout(self, choice: BlockChoice) -> tuple[bool, int, int]:
        """Whether a candidate skips the block, its heads and its feed-forward units."""
        choice = self.canonical(choice)
        heads, ff = self._sizes(choice)
        return choice.layers == 0, heads, ff

    @torch.no_grad()
    def subnet(self, choice: BlockChoice) -> nn.Module:
        """The candidate as the student's block, with the shared weights cut out (a copy)."""
        skip, heads, ff = self.layout(choice)
        if skip:
            return SkipBlock(copy.deepcopy(self.block.norm1) if self.index == 0 else None).requires_grad_(False)
        block = dit_block(self.config, heads, ff)
        source = self.block.state_dict()
        state = {}
        for key, target in block.state_dict().items():
            value = source[key]
            state[key] = value[tuple(slice(0, n) for n in target.shape)]
        block.load_state_dict(state, strict=True)
        return block.to(next(self.block.parameters()).device).requires_grad_(False)


def transformer_layout(supernets: Mapping[str, TransformerBlockSupernet], choices: Mapping[str, BlockChoice]) -> dict[str, Any]:
    """The ``skip_blocks``, ``block_heads`` and ``block_ff_dims`` of the student ``choices`` select."""
    skips, heads, ff_dims = [], [], []
    for name, supernet in supernets.items():
        skip, h, ff = supernet.layout(choices.get(name, supernet.largest()))
        if skip:
            skips.append(supernet.index)
        heads.append(h if not skip else supernet.full_heads)
        ff_dims.append(ff if not skip else supernet.block.ff.full_width)
    return {"skip_blocks": skips, "block_heads": heads, "block_ff_dims": ff_dims}


class JointBlockSupernet(Supernet):
    """The supernet of one joint block of an SD3 transformer (``JointTransformerBlock``): the
    block, or nothing (both streams pass through). The last block (``context_pre_only``) is kept
    whatever ``layers`` says: a student ends with it.

    Args:
        name: the block's name (``transformer_blocks.2``).
        block: the teacher's block (copied; the teacher is not modified).
        layers: ``(0, 1)`` where the block may be skipped.
    """

    def __init__(self, name: str, block: nn.Module, *, layers: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.name = name
        self.index = int(name.rsplit(".", 1)[1])
        self.block = copy.deepcopy(block).requires_grad_(True)
        self.last = bool(block.context_pre_only)
        self.layers = (1,) if self.last else tuple(sorted(set(layers or (1,))))
        self.widths, self.attention_choices, self.depths, self.heads = (1.0,), (True,), (0,), (0,)
        self.active = True
        self.choice = self.largest()

    def canonical(self, choice: BlockChoice) -> BlockChoice:
        return BlockChoice(1 if self.last else min(1, choice.layers), 1.0, True, 0, 0)

    def set(self, choice: BlockChoice) -> JointBlockSupernet:
        self.choice = self.canonical(choice)
        self.active = self.choice.layers > 0
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:  # SD3 calls its blocks with keywords only
            return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
        return self.block(*args, **kwargs)

    @torch.no_grad()
    def subnet(self, choice: BlockChoice) -> nn.Module:
        """The block with the shared weights (a copy), or a :class:`JointSkip` where the candidate
        skips it (the student drops it: :func:`kept_blocks`)."""
        if self.canonical(choice).layers == 0:
            return JointSkip()
        return copy.deepcopy(self.block).requires_grad_(False)


class JointSkip(nn.Module):
    """A skipped joint block: both streams pass through."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]


def kept_blocks(supernets: Mapping[str, JointBlockSupernet], choices: Mapping[str, BlockChoice]) -> list[str]:
    """The joint blocks an SD3 student of ``choices`` keeps, in order."""
    return [name for name, s in supernets.items() if s.canonical(choices.get(name, s.largest())).layers]
