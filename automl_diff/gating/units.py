"""Prunable units of a UNet and its head: what a schedule gates, and what their MACs are.

A unit is a block (``down.1``, ``mid``, ``up.0``), a layer inside one (``up.1.resnets.0``,
``down.2.attentions.0``, ``down.0.downsamplers.0``) or layers gated together (a branch,
``down.1.resnets.0+down.1.attentions.0``); the modules the hooks wrap are its *atoms*, and which
atom reads which is :class:`~automl_diff.models.dataflow.UnitGraph`'s. The UNet's output layers
(the *head*: ``conv_norm_out``, ``conv_act``, ``conv_out``) read the output of the last atom and
nothing else: at a step where that atom reuses its cache, the head would compute exactly what it
computed when the cache was filled, so it reuses its output too, and its MACs and seconds count as
that atom's (:class:`Head`). Where the UNet returns the head's output as it is, a step at which no
atom runs runs nothing at all (:func:`idle_steps_free`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from automl_diff.metrics.macs import BlockCost, UnitCosts, count_unit_macs
from automl_diff.models.dataflow import GRANULARITIES, UnitGraph, prunable_units

__all__ = [
    "GRANULARITIES",
    "HEAD",
    "Head",
    "head_input_atom",
    "head_modules",
    "idle_steps_free",
    "model_fingerprint",
    "output_is_head",
    "prunable_units",
    "unit_costs",
]

_FINGERPRINT_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels", "out_channels")
_TRANSFORMER_FINGERPRINT_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "out_channels")

#: The UNet's output layers, in order, as diffusers names them.
HEAD = ("conv_norm_out", "conv_act", "conv_out")


def _graph(unet: nn.Module, units: Sequence[str] | UnitGraph) -> UnitGraph:
    return units if isinstance(units, UnitGraph) else UnitGraph.of(unet, units)


def head_modules(unet: nn.Module) -> list[str]:
    """The head layers this UNet has (``conv_norm_out`` is None without output norm)."""
    return [name for name in HEAD if isinstance(getattr(unet, name, None), nn.Module)]


def head_input_atom(unet: nn.Module, units: Sequence[str] | UnitGraph) -> str | None:
    """The atom whose output is the head's whole input, if it is gated: the last up block, or its
    last layer. None where something else reaches the head: an ungated module last, or up blocks
    that also pass a skip sample (``SkipUpBlock2D``)."""
    graph = _graph(unet, units)
    if not graph.atoms or "conv_out" not in head_modules(unet):
        return None
    up_types = getattr(unet.config, "up_block_types", None) or ()
    if any("Skip" in kind for kind in up_types):
        return None
    last = graph.atoms[-1]
    return last if graph.atom_nodes[-1] == len(graph.nodes) - 1 and last.startswith("up.") else None


def output_is_head(unet: nn.Module) -> bool:
    """Whether the UNet returns ``conv_out``'s output as it is: a ``UNet2DConditionModel``, or a
    ``UNet2DModel`` without Fourier time embedding (which divides its output by the timestep),
    either with diffusers' own ``forward`` (a subclass may transform the output further)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(unet, UNet2DConditionModel):
        return type(unet).forward is UNet2DConditionModel.forward
    return isinstance(unet, UNet2DModel) and type(unet).forward is UNet2DModel.forward and unet.config.time_embedding_type != "fourier"


def idle_steps_free(unet: nn.Module, units: Sequence[str] | UnitGraph) -> bool:
    """Whether a step at which no atom of ``units`` runs costs nothing: the head reuses its output
    (:func:`head_input_atom`) and the UNet returns it as it is (:func:`output_is_head`), so the
    whole call returns the previous step's output, exactly."""
    return head_input_atom(unet, units) is not None and output_is_head(unet)


def model_fingerprint(unet: nn.Module) -> dict[str, Any]:
    """What identifies an architecture for a schedule: its class and block layout."""
    config = unet.config
    data: dict[str, Any] = {"class": type(unet).__name__}
    for key in _FINGERPRINT_KEYS if hasattr(unet, "down_blocks") else _TRANSFORMER_FINGERPRINT_KEYS:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        data[key] = list(value) if isinstance(value, (tuple, list)) else value
    return data


@dataclass(frozen=True)
class Head:
    """The head layers counted as part of the atom that feeds them (none where no atom does)."""

    feeder: str | None
    layers: tuple[str, ...]

    @classmethod
    def of(cls, unet: nn.Module, units: Sequence[str] | UnitGraph) -> Head:
        feeder = head_input_atom(unet, units)
        return cls(feeder, tuple(head_modules(unet)) if feeder else ())

    def fold(self, values: Mapping[str, Any], add: Callable[[Any, Any], Any]) -> dict[str, Any]:
        """Per-atom values (measured for the atoms and the head layers) with the head's added to
        its feeder's."""
        out = {name: value for name, value in values.items() if name not in self.layers}
        for name in self.layers:
            out[self.feeder] = add(out[self.feeder], values[name])
        return out


def unit_costs(unet: nn.Module, units: Sequence[str] | UnitGraph, *, text_length: int = 77) -> UnitCosts:
    """MACs of the whole model and of each atom of ``units`` (fvcore, attention included; a
    conditional UNet with ``text_length`` tokens of text), with the dataflow between them; the
    head's MACs count as those of the atom that feeds it (:class:`Head`)."""
    graph = _graph(unet, units)
    head = Head.of(unet, graph)
    total, per_atom = count_unit_macs(unet, [*graph.atoms, *head.layers], text_length=text_length)

    def add(a: BlockCost, b: BlockCost) -> BlockCost:
        return BlockCost(a.name, a.params + b.params, a.macs + b.macs, a.macs_no_attention + b.macs_no_attention)

    return UnitCosts(total, head.fold(per_atom, add), idle_steps_free(unet, graph), graph)
