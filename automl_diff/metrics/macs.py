"""MACs and parameter counts of a UNet, per block and in total, with fvcore.

fvcore counts one "flop" per multiply-accumulate for convolutions and matrix products, on the real
(traced) forward pass. It does not know ``aten::scaled_dot_product_attention``, which diffusers'
attention processors call, and would silently drop it; we register a handle that counts the two
attention matmuls (``Q K^T`` and ``softmax(.) V``). ``macs`` includes them; ``macs_no_attention``
is the literature convention that leaves them out (the q/k/v/out projections stay counted).
fvcore's default handles also count normalisation and upsampling (one per element, about 0.3% of
a UNet); activations and additions are not counted. This reproduces the published numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from automl_diff.models.blocks import block_names, is_block_name, name_to_module_path
from automl_diff.models.dataflow import UnitGraph
from automl_diff.sampling import predict_noise, takes_pooled

__all__ = ["BlockCost", "MacsReport", "UnitCosts", "count_macs", "count_unit_macs", "example_inputs", "executed_macs", "trajectory_macs"]

_SDPA = "aten::scaled_dot_product_attention"


@dataclass(frozen=True)
class BlockCost:
    """Cost of one block (or ``other``: everything outside the blocks), for one forward pass."""

    name: str
    params: int
    macs: int
    macs_no_attention: int


@dataclass(frozen=True)
class MacsReport:
    """Cost of one UNet forward pass at a given input size, batch size 1.

    Attributes:
        params: parameter count.
        macs: multiply-accumulates, attention matmuls included.
        macs_no_attention: multiply-accumulates without the attention matmuls (literature convention).
        blocks: per-block costs in execution order, then ``other``; they sum to the totals.
    """

    params: int
    macs: int
    macs_no_attention: int
    blocks: tuple[BlockCost, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "macs_no_attention": self.macs_no_attention,
            "blocks": [asdict(b) for b in self.blocks],
        }

    def block(self, name: str) -> BlockCost:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    # q: (..., L, D), k: (..., S, D), v: (..., S, Dv)
    lead = math.prod(q[:-2])
    length, dim = q[-2], q[-1]
    source, dim_v = k[-2], v[-1]
    return lead * length * source * (dim + dim_v)


class _Call(nn.Module):
    """Positional-only wrapper so that fvcore's tracer sees plain tensors in and out."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if rest:
            return predict_noise(self.unet, sample, timestep, **{condition_keyword(self.unet): rest[0]})
        return predict_noise(self.unet, sample, timestep)


def _text_width(unet: nn.Module) -> int | None:
    """The width of a text-conditioned model's token embeddings: a UNet's ``cross_attention_dim``,
    an SD3 transformer's ``joint_attention_dim``; None for other models."""
    config = unet.config
    width = getattr(config, "cross_attention_dim", None)
    return width if width is not None else getattr(config, "joint_attention_dim", None)


def _is_conditional(unet: nn.Module) -> bool:
    return _text_width(unet) is not None


def condition_keyword(unet: nn.Module) -> str | None:
    """The argument a conditional model takes its conditioning as: ``encoder_hidden_states`` (text
    embeddings), ``class_labels`` (a class-conditional transformer, DiT, or a UNet with class
    embeddings), or None."""
    if _is_conditional(unet):
        return "encoder_hidden_states"
    if getattr(unet.config, "num_embeds_ada_norm", None) and not hasattr(unet, "down_blocks"):
        return None if getattr(unet.config, "unconditional", False) else "class_labels"
    if getattr(unet.config, "num_class_embeds", None):
        return "class_labels"
    return None


def example_inputs(
    unet: nn.Module,
    *,
    resolution: int | None = None,
    batch_size: int = 1,
    text_length: int = 77,
) -> tuple[torch.Tensor, ...]:
    """Inputs for one forward pass: ``(sample, timestep)`` plus ``encoder_hidden_states`` for
    an SD-style ``UNet2DConditionModel``, or ``class_labels`` for a DiT.

    Args:
        unet: the model.
        resolution: spatial size of ``sample`` (pixels, or latents for a latent model);
            defaults to ``config.sample_size``.
        batch_size: batch size.
        text_length: tokens of the text conditioning (77 for CLIP).
    """
    config = unet.config
    size = resolution or config.sample_size
    if isinstance(size, (tuple, list)):
        height, width = size
    else:
        height = width = int(size)
    param = next(unet.parameters())
    sample = torch.zeros(batch_size, config.in_channels, height, width, dtype=param.dtype, device=param.device)
    timestep = torch.full((batch_size,), 10, dtype=torch.long, device=param.device)
    if _is_conditional(unet):
        rows = text_length + (1 if takes_pooled(unet) else 0)  # the pooled embedding travels as one more row
        context = torch.zeros(batch_size, rows, _text_width(unet), dtype=param.dtype, device=param.device)
        return sample, timestep, context
    if condition_keyword(unet) == "class_labels":
        return sample, timestep, torch.zeros(batch_size, dtype=torch.long, device=param.device)
    return sample, timestep


def _per_module(unet: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Mapping[str, int]]:
    """fvcore's per-module, per-operator counts of one traced forward pass (paths under ``unet.``)."""
    from fvcore.nn import FlopCountAnalysis

    was_training = unet.training
    unet.eval()
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(_Call(unet), inputs)
            analysis.set_op_handle(_SDPA, _sdpa_macs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return _head_calls_apart(unet, analysis.by_module_and_operator())
    finally:
        unet.train(was_training)


#: A DiT's output head calls the first block's timestep-and-class embedding a second time.
_DIT_HEAD_EMBEDDING = "transformer_blocks.0.norm1.emb"


def _head_calls_apart(unet: nn.Module, per_module: dict[str, Mapping[str, int]]) -> dict[str, Mapping[str, int]]:
    """Per-module counts with the head's call of a block's module moved out of the block: DiT's
    head conditions on ``transformer_blocks[0].norm1.emb``, which fvcore counts twice under block
    0; half goes to the head (what is left when the block runs alone: "other"), not the block."""
    path = "unet." + _DIT_HEAD_EMBEDDING
    if condition_keyword(unet) != "class_labels" or path not in per_module or not hasattr(unet, "proj_out_1"):
        return per_module
    head = {op: count // 2 for op, count in per_module[path].items()}
    parts = path.split(".")
    for depth in range(2, len(parts) + 1):  # the module and its ancestors inside the model, not the model itself
        ancestor = ".".join(parts[:depth])
        per_module[ancestor] = {op: count - head.get(op, 0) for op, count in per_module[ancestor].items()}
    return per_module


def _cost(per_module: Mapping[str, Mapping[str, int]], path: str) -> tuple[int, int]:
    ops: Mapping[str, int] = per_module.get(path, {})
    total = int(sum(ops.values()))
    return total, total - int(ops.get("scaled_dot_product_attention", 0))


def _named_costs(unet: nn.Module, per_module: Mapping[str, Mapping[str, int]], names: list[str]) -> list[BlockCost]:
    costs = []
    for name in names:
        path = name_to_module_path(name) if is_block_name(name) else name  # conv_out: as it is
        params = sum(p.numel() for p in unet.get_submodule(path).parameters())
        costs.append(BlockCost(name, params, *_cost(per_module, "unet." + path)))
    return costs


def count_macs(
    unet: nn.Module,
    *,
    resolution: int | None = None,
    text_length: int = 77,
    inputs: tuple[torch.Tensor, ...] | None = None,
) -> MacsReport:
    """Count params and MACs of one forward pass (batch size 1), per block and in total.

    Args:
        unet: a ``UNet2DModel``, ``UNet2DConditionModel`` or any model with the same blocks.
        resolution: spatial input size; defaults to ``config.sample_size``.
        text_length: tokens of the text conditioning for conditional models.
        inputs: explicit inputs instead of :func:`example_inputs`.

    Returns:
        A :class:`MacsReport`.
    """
    if inputs is None:
        inputs = example_inputs(unet, resolution=resolution, text_length=text_length)
    per_module = _per_module(unet, inputs)
    total, total_no_attn = _cost(per_module, "")
    blocks = _named_costs(unet, per_module, block_names(unet))
    params_total = sum(p.numel() for p in unet.parameters())
    blocks.append(
        BlockCost(
            "other",
            params_total - sum(b.params for b in blocks),
            total - sum(b.macs for b in blocks),
            total_no_attn - sum(b.macs_no_attention for b in blocks),
        )
    )
    return MacsReport(params_total, total, total_no_attn, tuple(blocks))


def count_unit_macs(
    unet: nn.Module,
    names: list[str],
    *,
    resolution: int | None = None,
    text_length: int = 77,
) -> tuple[BlockCost, dict[str, BlockCost]]:
    """Costs of one forward pass (batch 1): the whole model, and each named block or layer.

    Args:
        unet: the model.
        names: dotted block or layer names (``down.1``, ``up.2.resnets.0``) or top-level layers
            (``conv_out``); they must not overlap.

    Returns:
        ``(total, {name: cost})``, both as :class:`BlockCost` (``name`` of the total is ``total``).
    """
    per_module = _per_module(unet, example_inputs(unet, resolution=resolution, text_length=text_length))
    total, total_no_attn = _cost(per_module, "")
    units = {cost.name: cost for cost in _named_costs(unet, per_module, list(names))}
    return BlockCost("total", sum(p.numel() for p in unet.parameters()), total, total_no_attn), units


@dataclass(frozen=True)
class UnitCosts:
    """MACs of one forward pass (batch 1): the whole model and each gated atom (the modules the
    gates wrap, :class:`~automl_diff.models.dataflow.UnitGraph`); ``idle_free``: a step at which
    no atom runs costs nothing (it runs nothing at all); ``graph``: the dataflow between the atoms."""

    total: BlockCost
    units: Mapping[str, BlockCost]
    idle_free: bool = False
    graph: UnitGraph | None = None

    @property
    def always(self) -> int:
        """MACs outside every atom (embedding, ``conv_in``, ...): paid by every step that runs."""
        return self.total.macs - sum(c.macs for c in self.units.values())


def trajectory_macs(runs: Sequence[Sequence[bool]], atoms: Sequence[str], costs: UnitCosts, *, attention: bool = True) -> int:
    """MACs of one image's sampling trajectory when atom ``atoms[a]`` runs at step ``i`` only
    where ``runs[i][a]``: every step pays for the parts outside the atoms and for the atoms it
    runs, except a step that runs no atom where such a step is free (``costs.idle_free``).

    Args:
        runs: one row per step, one flag per atom (a schedule's plan,
            :meth:`~automl_diff.models.dataflow.UnitGraph.plan`; all True: the plain sampler).
        atoms: the atom names, in the order of a row.
        costs: :class:`UnitCosts` of those atoms.
        attention: count the attention matmuls (False: the literature convention).
    """

    def macs(cost: BlockCost) -> int:
        return cost.macs if attention else cost.macs_no_attention

    total = macs(costs.total)
    unit = [macs(costs.units[name]) for name in atoms]
    return sum(0 if costs.idle_free and not any(row) else total - sum(m for m, on in zip(unit, row) if not on) for row in runs)


def executed_macs(run: Any) -> int:
    """MACs that ``run()`` actually executes, counted op by op by torch's ``FlopCounterMode``.

    An independent check of analytic counts: it sees only the convolutions, matrix products and
    attention that really run (skipped or cached computation costs nothing), counted as torch
    does (two FLOPs per MAC; normalisation and upsampling are not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops() // 2)
