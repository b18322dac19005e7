"""Cut a teacher's weights down to a smaller student: layers kept by position, channels by importance.

A student that is a reduction of its teacher (narrower levels, fewer layers per level, attention
dropped, narrower resnets or fewer attention heads) starts from the teacher's weights instead of a
random init, as structured pruning does:

* **Layers by position.** ``down.i`` keeps the teacher's first resnets (and their attentions);
  an up block keeps its first ones and its last (the one that takes the skip from the level
  below). A layer the teacher does not have (a deeper level, attention added) stays random.
* **Channels by L1 importance.** Every tensor dimension belongs to a *channel space*: a level's
  feature stream (``L0``, ``L1``, ...: every conv that writes into it, skips and residuals
  included), a resnet's inner width, an attention's heads, the time embedding, a feed-forward's
  hidden width. A space keeps the channels whose filters have the largest L1 norm summed over the
  space's producers (each layer's norms scaled to mean 1), in their original order, so every
  tensor that reads or writes the space is cut consistently. Attention keeps whole heads (the
  heads with the largest summed norm), and the sinusoidal time features keep the frequencies
  nearest the student's.

:func:`cut` is the one primitive (gather the kept indices along each dimension), and
:func:`cut_resnet` narrows one resnet with it; DiffNAS's subnet extraction cuts its elastic resnets
with :func:`cut_resnet` at their leading channels, the widths they were trained at.

Anything the rules cannot map (a tensor whose dimensions read other spaces in the student than in
the teacher, a space that grows) keeps the student's own init; :class:`Inherited` counts what was
copied.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from automl_diff.models.student import narrow_resnet

__all__ = ["Inherited", "channel_plan", "cut", "cut_resnet", "inherit_from_teacher"]

#: A run of channels of one space inside a tensor dimension: (space, size).
Segment = tuple[str, int]
#: The channel spaces of one tensor: segments of dim 0 and, for a weight, of dim 1.
Dims = tuple[tuple[Segment, ...], ...]

#: Spaces whose channels are fixed by the data (image channels, text features): never cut.
_FIXED = ("image_in", "image_out", "context")


def cut(source: torch.Tensor, index: Sequence[torch.Tensor | slice | None]) -> torch.Tensor:
    """``source`` with dimension ``d`` reduced to ``index[d]`` (a tensor of kept indices, a slice,
    or None for all); dimensions past ``index`` are kept whole."""
    out = source
    for dim, idx in enumerate(index):
        if idx is None:
            continue
        if isinstance(idx, slice):
            out = out[(slice(None),) * dim + (idx,)]
        else:
            out = out.index_select(dim, idx.to(out.device))
    return out


@torch.no_grad()
def cut_resnet(resnet: nn.Module, keep: torch.Tensor) -> None:
    """Narrow a diffusers ``ResnetBlock2D`` in place to the inner channels ``keep`` (indices of
    its ``conv1`` outputs), each new layer cut from the one it replaces: ``conv1``'s and
    ``norm2``'s channels, ``conv2``'s input columns, and ``time_emb_proj``'s rows of each chunk
    (one, or scale and shift)."""
    full = resnet.conv1.out_channels
    old = {name: getattr(resnet, name) for name in ("conv1", "norm2", "conv2", "time_emb_proj")}
    keep = keep.to(resnet.conv1.weight.device)
    narrow_resnet(resnet, len(keep))
    rows = None
    if old["time_emb_proj"] is not None:
        rows = torch.cat([k * full + keep for k in range(old["time_emb_proj"].out_features // full)])
    for name, index in (("conv1", [keep]), ("norm2", [keep]), ("conv2", [None, keep]), ("time_emb_proj", [rows])):
        if old[name] is None:
            continue
        for param, p in getattr(resnet, name).named_parameters(recurse=False):
            source = getattr(old[name], param)
            p.copy_(cut(source, index[: source.ndim]).to(p.device, p.dtype))


@dataclass(frozen=True)
class Inherited:
    """What :func:`inherit_from_teacher` copied: parameters (elements) and tensors."""

    parameters: int
    total_parameters: int
    tensors: int
    total_tensors: int

    @property
    def fraction(self) -> float:
        """Share of the student's parameters that came from the teacher."""
        return self.parameters / max(1, self.total_parameters)


class _Plan:
    """Walks a diffusers UNet in forward order and names the channel space of every dimension."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.dims: dict[str, Dims] = {}
        self.head_dim: dict[str, int] = {}
        self._walk()

    def put(self, path: str, out: tuple[Segment, ...], inp: tuple[Segment, ...] | None = None) -> None:
        module = self.unet.get_submodule(path)
        for name, p in module.named_parameters(recurse=False):
            self.dims[f"{path}.{name}"] = (out, inp) if p.ndim >= 2 and inp is not None else (out,)

    @staticmethod
    def seg(space: str, size: int) -> tuple[Segment, ...]:
        return ((space, int(size)),)

    def resnet(self, path: str, module: nn.Module, inp: tuple[Segment, ...], stream: str) -> tuple[Segment, ...]:
        conv_shortcut = getattr(module, "conv_shortcut", None)
        if hasattr(module, "conv1"):
            inner = self.seg(f"{path}.inner", module.conv1.out_channels)
            out = self.seg(stream, module.conv2.out_channels)
            self.put(f"{path}.norm1", inp)
            self.put(f"{path}.conv1", inner, inp)
            if getattr(module, "time_emb_proj", None) is not None:
                proj = module.time_emb_proj
                self.put(
                    f"{path}.time_emb_proj", inner * (proj.out_features // module.conv1.out_channels), self.seg("temb", proj.in_features)
                )
            self.put(f"{path}.norm2", inner)
            self.put(f"{path}.conv2", out, inner)
        else:  # a resnet reduced to its shortcut
            out = self.seg(stream, conv_shortcut.out_channels if conv_shortcut is not None else sum(s for _, s in inp))
        if conv_shortcut is not None:
            self.put(f"{path}.conv_shortcut", out, inp)
        return out

    def attention(self, path: str, module: nn.Module, stream: tuple[Segment, ...], context: tuple[Segment, ...] | None = None) -> None:
        if not hasattr(module, "to_q"):
            return
        inner = module.to_q.out_features
        heads = self.seg(f"{path}.heads", inner)
        self.head_dim[f"{path}.heads"] = inner // int(module.heads)
        if getattr(module, "group_norm", None) is not None:
            self.put(f"{path}.group_norm", stream)
        self.put(f"{path}.to_q", heads, stream)
        kv = context if context is not None else stream
        self.put(f"{path}.to_k", heads, kv)
        self.put(f"{path}.to_v", heads, kv)
        self.put(f"{path}.to_out.0", stream, heads)

    def transformer(self, path: str, module: nn.Module, stream: tuple[Segment, ...]) -> None:
        if not hasattr(module, "transformer_blocks"):
            self.attention(path, module, stream)
            return
        inner = self.seg(
            f"{path}.inner", module.proj_in.out_features if hasattr(module.proj_in, "out_features") else module.proj_in.out_channels
        )
        self.put(f"{path}.norm", stream)
        self.put(f"{path}.proj_in", inner, stream)
        for k, block in enumerate(module.transformer_blocks):
            b = f"{path}.transformer_blocks.{k}"
            for norm in ("norm1", "norm2", "norm3"):
                if getattr(block, norm, None) is not None:
                    self.put(f"{b}.{norm}", inner)
            self.attention(f"{b}.attn1", block.attn1, inner)
            if getattr(block, "attn2", None) is not None:
                self.attention(f"{b}.attn2", block.attn2, inner, self.seg("context", block.attn2.to_k.in_features))
            proj, out = block.ff.net[0].proj, block.ff.net[2]
            hidden = self.seg(f"{b}.ff", out.in_features)
            self.put(f"{b}.ff.net.0.proj", hidden * (proj.out_features // out.in_features), inner)
            self.put(f"{b}.ff.net.2", inner, hidden)
        self.put(f"{path}.proj_out", stream, inner)

    def _walk(self) -> None:
        unet = self.unet
        self.put("conv_in", self.seg("L0", unet.conv_in.out_channels), self.seg("image_in", unet.conv_in.in_channels))
        emb = unet.time_embedding
        self.put("time_embedding.linear_1", self.seg("temb_hidden", emb.linear_1.out_features), self.seg("freq", emb.linear_1.in_features))
        self.put("time_embedding.linear_2", self.seg("temb", emb.linear_2.out_features), self.seg("temb_hidden", emb.linear_2.in_features))
        stream = self.seg("L0", unet.conv_in.out_channels)
        skips = [stream]
        levels = len(unet.down_blocks)
        for i, block in enumerate(unet.down_blocks):
            attentions = getattr(block, "attentions", None)
            for r, resnet in enumerate(block.resnets):
                stream = self.resnet(f"down_blocks.{i}.resnets.{r}", resnet, stream, f"L{i}")
                if attentions is not None and r < len(attentions) and attentions[r] is not None:
                    self.transformer(f"down_blocks.{i}.attentions.{r}", attentions[r], stream)
                skips.append(stream)
            for d, down in enumerate(getattr(block, "downsamplers", None) or ()):
                if getattr(down, "conv", None) is not None:
                    self.put(f"down_blocks.{i}.downsamplers.{d}.conv", stream, stream)
                skips.append(stream)
        mid = unet.mid_block
        if mid is not None:
            for r, resnet in enumerate(mid.resnets):
                stream = self.resnet(f"mid_block.resnets.{r}", resnet, stream, f"L{levels - 1}")
                attentions = getattr(mid, "attentions", None) or ()
                if r < len(attentions) and attentions[r] is not None:
                    self.transformer(f"mid_block.attentions.{r}", attentions[r], stream)
        for j, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None)
            for r, resnet in enumerate(block.resnets):
                stream = self.resnet(f"up_blocks.{j}.resnets.{r}", resnet, stream + skips.pop(), f"L{levels - 1 - j}")
                if attentions is not None and r < len(attentions) and attentions[r] is not None:
                    self.transformer(f"up_blocks.{j}.attentions.{r}", attentions[r], stream)
            for u, up in enumerate(getattr(block, "upsamplers", None) or ()):
                if getattr(up, "conv", None) is not None:
                    self.put(f"up_blocks.{j}.upsamplers.{u}.conv", stream, stream)
        if getattr(unet, "conv_norm_out", None) is not None:
            self.put("conv_norm_out", stream)
        self.put("conv_out", self.seg("image_out", unet.conv_out.out_channels), stream)


def channel_plan(unet: nn.Module) -> dict[str, Dims]:
    """The channel spaces of every planned parameter of a diffusers UNet (``UNet2DModel``,
    ``UNet2DConditionModel`` and their student classes): name -> segments of dim 0 (and dim 1)."""
    return _Plan(unet).dims


_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)(?=\.|$)")


def _layer_map(student: nn.Module, teacher: nn.Module):
    """Student name -> teacher name (None: the teacher has no such layer), by layer position."""

    def rename(name: str) -> str | None:
        m = _LAYER.match(name)
        if m is None:
            return name
        where, block, kind, index = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if where == "down_blocks":
            mapped = index if index < len(teacher.down_blocks[block].resnets) else None
        else:
            n_s, n_t = len(student.up_blocks[block].resnets), len(teacher.up_blocks[block].resnets)
            mapped = n_t - 1 if index == n_s - 1 else (index if index < n_t - 1 else None)
        if mapped is None:
            return None
        return f"{where}.{block}.{kind}.{mapped}" + name[m.end() :]

    return rename


def _importance(teacher: nn.Module, plan: dict[str, Dims]) -> dict[str, torch.Tensor]:
    """Per space, the summed L1 norm of the filters that write its channels (each tensor's norms
    scaled to mean 1, so that wide and narrow layers count alike)."""
    params = dict(teacher.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, dims in plan.items():
        p = params[name]
        if p.ndim < 2:
            continue
        norms = p.detach().float().abs().flatten(1).sum(1)
        norms = norms / norms.mean().clamp_min(1e-12)
        start = 0
        for space, size in dims[0]:
            out[space] = out.get(space, 0) + norms[start : start + size].cpu()
            start += size
    return out


def _select(space: str, n_t: int, n_s: int, importance: dict[str, torch.Tensor], head_dims: tuple[int, int] | None) -> torch.Tensor | None:
    """The teacher's channels of ``space`` a student with ``n_s`` of them keeps (None: none can be
    chosen, the space grows)."""
    if n_s == n_t or space in _FIXED:
        return torch.arange(n_t) if n_s == n_t else None
    if n_s > n_t:
        return None
    if space == "freq":  # sinusoidal features: [cos | sin] halves (or the reverse), frequencies exp(-k/half)
        half_t, half_s = n_t // 2, n_s // 2
        k = torch.tensor([min(half_t - 1, round(i * half_t / half_s)) for i in range(half_s)])
        return torch.cat([k, half_t + k])
    score = importance.get(space, torch.zeros(n_t))
    if head_dims is not None:
        hd_t, hd_s = head_dims
        heads_t, heads_s = n_t // hd_t, n_s // hd_s
        if heads_s > heads_t or hd_s > hd_t:
            return None
        per_head = score.view(heads_t, hd_t)
        kept = per_head.sum(1).topk(heads_s).indices.sort().values
        return torch.cat([h * hd_t + per_head[h].topk(hd_s).indices.sort().values for h in kept.tolist()])
    return score.topk(n_s).indices.sort().values


@torch.no_grad()
def inherit_from_teacher(student: nn.Module, teacher: nn.Module) -> Inherited:
    """Load into ``student`` every tensor that a cut of ``teacher`` gives (see the module doc);
    the rest keeps its init. Both are diffusers UNets of the same family."""
    t_plan, s_plan = _Plan(teacher), _Plan(student)
    rename = _layer_map(student, teacher)

    def teacher_space(space: str) -> str | None:
        head, dot, tail = space.rpartition(".")
        if not dot:
            return space
        mapped = rename(head)
        return None if mapped is None else f"{mapped}.{tail}"

    importance = _importance(teacher, t_plan.dims)
    t_sizes = {s: n for dims in t_plan.dims.values() for d in dims for s, n in d}
    chosen: dict[str, torch.Tensor | None] = {}

    def indices(space_s: str, n_s: int) -> tuple[str, torch.Tensor] | None:
        space_t = teacher_space(space_s)
        if space_t is None or space_t not in t_sizes:
            return None
        if space_t not in chosen:
            heads = (t_plan.head_dim[space_t], s_plan.head_dim[space_s]) if space_t in t_plan.head_dim else None
            chosen[space_t] = _select(space_t, t_sizes[space_t], n_s, importance, heads)
        idx = chosen[space_t]
        return None if idx is None or len(idx) != n_s else (space_t, idx)

    def dim_index(s_segments: tuple[Segment, ...], t_segments: tuple[Segment, ...]) -> torch.Tensor | None:
        if len(s_segments) != len(t_segments):
            return None
        parts, offset = [], 0
        for (space_s, n_s), (space_t, n_t) in zip(s_segments, t_segments):
            found = indices(space_s, n_s)
            if found is None or found[0] != space_t:
                return None
            parts.append(found[1] + offset)
            offset += n_t
        return torch.cat(parts)

    t_params = dict(teacher.named_parameters())
    copied = tensors = total = 0
    named = list(student.named_parameters())
    for name, p in named:
        total += p.numel()
        t_name = rename(name)
        source = t_params.get(t_name) if t_name is not None else None
        if source is None:
            continue
        s_dims, t_dims = s_plan.dims.get(name), t_plan.dims.get(t_name)
        if s_dims is None or t_dims is None:
            if source.shape != p.shape:
                continue
            index: list[torch.Tensor | None] = []
        else:
            index = [dim_index(s, t) for s, t in zip(s_dims, t_dims)]
            if any(i is None for i in index):
                continue
        value = cut(source, index)
        if value.shape != p.shape:
            continue
        p.copy_(value.to(p.device, p.dtype))
        copied += p.numel()
        tensors += 1
    return Inherited(parameters=copied, total_parameters=total, tensors=tensors, total_tensors=len(named))
