"""Cut a DiT teacher's weights down to a student with fewer blocks or fewer attention heads.

A ``DiTTransformer2DModel`` student of the teacher's family (same patch size, head size and
conditioning) starts from the teacher's weights, as structured pruning does:

* **Blocks by influence.** The student's ``n`` blocks are the teacher's ``n`` most influential, in
  their order (an SD3 teacher's last block, which updates the image stream alone, always). A block's
  influence is ShortGPT's Block Influence, ``1 - cos(input, output)`` of its hidden states averaged
  over tokens, measured on a batch of the teacher's own inputs (the data-free pool's states, or
  noise): a block that barely turns its input is the first to go.
* **Width by L1 importance.** Fewer heads of the same size is a narrower model: the residual
  stream (every tensor that reads or writes it, the adaLN modulation's chunks and the per-block
  conditioning embedding included) keeps the channels whose writers (the patch embedding, each
  kept block's attention output and feed-forward output) have the largest L1 norm, each writer's
  norms scaled to mean 1. Each kept block's attention keeps its heads with the largest summed
  ``q``/``k``/``v``/``out`` norm, and its feed-forward the hidden units with the largest norm.

The student's positional embedding is its own (diffusers computes it from the width and does not
save it), so a narrower student starts from weights that saw other positional features and relies
on distillation to adapt them; a student of the teacher's width inherits exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from automl_diff.sampling import predict_noise

__all__ = ["block_influence", "inherit_transformer", "sort_block_by_importance"]


@torch.no_grad()
def block_influence(teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, conditioning: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``1 - cos(input, output)`` of each of ``teacher.transformer_blocks`` for one call on
    ``(x, t, **conditioning)``, averaged over rows and tokens."""
    blocks = teacher.transformer_blocks
    influence = torch.zeros(len(blocks))
    handles = []
    for i, block in enumerate(blocks):

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, i: int = i) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[-1] if isinstance(output, tuple) else output  # a joint block (SD3) returns (context, hidden)
            influence[i] = 1 - torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1).mean().item()

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        predict_noise(teacher, x, t, **conditioning)
    finally:
        for h in handles:
            h.remove()
    return influence


def _scaled(norms: torch.Tensor) -> torch.Tensor:
    return norms / norms.mean().clamp_min(1e-12)


def _top(score: torch.Tensor, n: int) -> torch.Tensor:
    return score.topk(n).indices.sort().values


def _head_importance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each attention head's summed L1 norm over its ``q``/``k``/``v`` rows and ``out`` columns."""
    rows = q.abs().sum(1) + k.abs().sum(1) + v.abs().sum(1) + out.abs().sum(0)
    return rows.view(-1, head_dim).sum(1)


def _unit_importance(proj: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Each feed-forward unit's L1 norm in its input and output projections, each scaled to mean 1."""
    return _scaled(proj.abs().sum(1)) + _scaled(out.abs().sum(0))


class _Cut:
    """The kept indices of every channel space of a teacher -> student cut."""

    def __init__(self, teacher: Mapping[str, torch.Tensor], kept: list[int], width: int, heads: int, head_dim: int) -> None:
        self.teacher = teacher
        self.kept = kept
        self.width_t = int(teacher["pos_embed.proj.weight"].shape[0])
        self.width = width
        self.heads, self.head_dim = heads, head_dim
        if width == self.width_t:  # a shallower student of the teacher's width (the only kind of SD3's)
            self.residual = torch.arange(width)
            return
        writers = [teacher["pos_embed.proj.weight"].abs().flatten(1).sum(1)]
        for b in kept:
            writers.append(teacher[f"transformer_blocks.{b}.attn1.to_out.0.weight"].abs().sum(1))
            writers.append(teacher[f"transformer_blocks.{b}.ff.net.2.weight"].abs().sum(1))
        self.residual = _top(sum(_scaled(w) for w in writers), width)

    def heads_of(self, block: int) -> torch.Tensor:
        p = f"transformer_blocks.{block}.attn1."
        qkv = [self.teacher[f"{p}to_{k}.weight"] for k in "qkv"]
        per_head = _head_importance(*qkv, self.teacher[f"{p}to_out.0.weight"], self.head_dim)
        return torch.cat([h * self.head_dim + torch.arange(self.head_dim) for h in _top(per_head, self.heads).tolist()])

    def hidden_of(self, block: int, n: int) -> torch.Tensor:
        p = f"transformer_blocks.{block}.ff.net."
        return _top(_unit_importance(self.teacher[f"{p}0.proj.weight"], self.teacher[f"{p}2.weight"]), n)

    def index(self, name: str, block: int | None, dim: int, n_t: int, n_s: int) -> torch.Tensor | None:
        """The teacher indices that dimension ``dim`` of tensor ``name`` keeps (None: not a cut)."""
        attention_inner = ".attn1.to_" in name and ((dim == 0 and ".to_out." not in name) or (dim == 1 and ".to_out." in name))
        ff_hidden = (".ff.net.0.proj." in name and dim == 0) or (".ff.net.2." in name and dim == 1)
        if block is not None and attention_inner:
            return self.heads_of(block)
        if block is not None and ff_hidden:
            return self.hidden_of(block, n_s)
        if n_t % self.width_t == 0 and n_s % self.width == 0 and n_t // self.width_t == n_s // self.width:
            return torch.cat([k * self.width_t + self.residual for k in range(n_t // self.width_t)])
        return None


@torch.no_grad()
def inherit_transformer(student: nn.Module, teacher: nn.Module, influence: torch.Tensor) -> tuple[int, int, list[int]]:
    """Load into ``student`` (a narrower or shallower DiT) the cut of ``teacher`` that keeps its
    most influential blocks (``influence``, one per teacher block; :func:`block_influence`).

    Returns:
        the parameters copied, the student's parameters, and the teacher blocks kept.
    """
    n_blocks = len(student.transformer_blocks)
    if getattr(teacher.transformer_blocks[-1], "context_pre_only", False):  # SD3's last block, the only one of its kind
        influence = torch.cat([influence[:-1], influence.new_full((1,), float("inf"))])
    kept = _top(influence, n_blocks).tolist()
    config = student.config
    width = int(config.num_attention_heads) * int(config.attention_head_dim)
    source = {k: v for k, v in teacher.state_dict().items()}
    cut = _Cut(source, kept, width, int(config.num_attention_heads), int(config.attention_head_dim))
    copied = total = 0
    for name, p in student.named_parameters():
        total += p.numel()
        block = None
        t_name = name
        if name.startswith("transformer_blocks."):
            _, index, rest = name.split(".", 2)
            block = kept[int(index)]
            t_name = f"transformer_blocks.{block}.{rest}"
        value = source.get(t_name)
        if value is None:
            continue
        for dim in range(value.dim()):
            n_t, n_s = value.shape[dim], p.shape[dim]
            if n_t == n_s:
                continue
            idx = cut.index(t_name, block, dim, n_t, n_s)
            if idx is None or len(idx) != n_s:
                value = None
                break
            value = value.index_select(dim, idx.to(value.device))
        if value is None or value.shape != p.shape:
            continue
        p.copy_(value.to(p.device, p.dtype))
        copied += p.numel()
    return copied, total, kept


@torch.no_grad()
def sort_block_by_importance(block: nn.Module) -> None:
    """Reorder a DiT block's attention heads and feed-forward units in place, the most important
    first (the L1 norms :func:`inherit_transformer` keeps by): the block computes the same, and
    a subnet that keeps its first heads and units keeps the most important ones."""
    attn, ff = block.attn1, block.ff
    head_dim = attn.to_q.out_features // attn.heads
    heads = _head_importance(attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, attn.to_out[0].weight, head_dim).argsort(descending=True)
    order = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
    for layer in (attn.to_q, attn.to_k, attn.to_v):
        _permute(layer, order, 0)
    _permute(attn.to_out[0], order, 1)
    proj, out = ff.net[0].proj, ff.net[2]
    units = _unit_importance(proj.weight, out.weight).argsort(descending=True)
    _permute(proj, units, 0)
    _permute(out, units, 1)


def _permute(layer: nn.Linear, order: torch.Tensor, dim: int) -> None:
    layer.weight.copy_(layer.weight.index_select(dim, order))
    if dim == 0 and layer.bias is not None:
        layer.bias.copy_(layer.bias[order])
