"""What a gate schedule gates in a UNet, which unit reads which, and what a schedule really runs.

*Atoms* are the modules the gating hooks wrap, in execution order: the blocks (``down.0 … mid …
up.K``) or the layers inside them (resnets, attentions, down- and upsamplers). A *unit* is what
one gate controls: one atom, or atoms that are gated together, named by their names joined with
``+`` (``down.1.resnets.0+down.1.attentions.0``). Three granularities are built in:

* ``block``: one unit per block;
* ``layer``: one unit per layer, as DeepCache caches layers;
* ``branch``: Stable Diffusion's branches as DiP-GO's authors gate them: each resnet with the
  attention after it, each downsampler on its own, an up block's upsampler with its last branch,
  the whole mid block as one (24 units on SD-1.5).

Each atom's output is read by the next atom in execution order and, for a down-path output, by
the up-path resnet (or up block) that takes it as a skip connection; the last atom feeds the
head. :meth:`UnitGraph.plan` turns a schedule's gates into what runs at each step: an atom whose
gate is on runs only if its output is read, at the same step by an atom that runs or at a later
step through the cache it leaves. So a unit that nothing downstream reads is neither computed nor
counted (the cascade of DiP-GO's authors: an up branch that reuses its cache makes the branches
that only feed it idle), and the samples are exactly those of running it.

A transformer's units are its blocks (``transformer_blocks.<i>``, ``block`` granularity), a chain
of residual updates: a block whose gate is off adds the update it made at the last step it ran to
its input of this step (:attr:`UnitGraph.residual`), so it reads its input and every block before
it is needed at every step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.models.blocks import block_names, get_block, is_block_name

__all__ = ["GRANULARITIES", "Plan", "UnitGraph", "is_transformer", "prunable_units", "unit_atoms"]

#: The built-in ways to cut a UNet into gated units.
GRANULARITIES = ("block", "layer", "branch")

#: Blocks whose data path is their resnets, attentions and resamplers and nothing else, so that
#: the dataflow below is all there is (a skip-sample block adds a second stream to the output).
_PLAIN_BLOCKS = {
    "DownBlock2D",
    "CrossAttnDownBlock2D",
    "AttnDownBlock2D",
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "AttnUpBlock2D",
    "UNetMidBlock2D",
    "UNetMidBlock2DCrossAttn",
}


def _modules(block: nn.Module, kind: str) -> list[int]:
    children = getattr(block, kind, None) or []
    return [i for i, child in enumerate(children) if isinstance(child, nn.Module)]


def _block_layers(unet: nn.Module, block: str) -> list[list[str]]:
    """A block's layers in execution order, grouped as branches: resnet ``i`` with attention ``i``
    (the mid block: resnet 0, then attention ``i`` with resnet ``i + 1``), then each resampler."""
    module = get_block(unet, block)
    resnets, attentions = _modules(module, "resnets"), set(_modules(module, "attentions"))
    groups: list[list[str]] = []
    if block == "mid":
        groups.append([f"mid.resnets.{resnets[0]}"] if resnets else [])
        for i in resnets[1:]:
            groups[-1] += ([f"mid.attentions.{i - 1}"] if i - 1 in attentions else []) + [f"mid.resnets.{i}"]
        return [g for g in groups if g]
    for i in resnets:
        groups.append([f"{block}.resnets.{i}"] + ([f"{block}.attentions.{i}"] if i in attentions else []))
    for kind in ("downsamplers", "upsamplers"):
        groups += [[f"{block}.{kind}.{i}"] for i in _modules(module, kind)]
    return groups


def prunable_units(unet: nn.Module, granularity: str = "block") -> list[str]:
    """The units a schedule gates at ``granularity`` (:data:`GRANULARITIES`), in execution order."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    blocks = block_names(unet)
    if granularity == "block":
        return blocks
    if is_transformer(unet):
        raise UserError(f"granularity {granularity}: a transformer's units are its blocks (granularity: block)")
    units: list[str] = []
    for block in blocks:
        groups = _block_layers(unet, block)
        if granularity == "layer":
            units += [layer for group in groups for layer in group]
        elif block == "mid":
            units.append("+".join(layer for group in groups for layer in group))
        else:
            if block.startswith("up.") and len(groups) > 1 and ".upsamplers." in groups[-1][0]:
                groups = [*groups[:-2], groups[-2] + groups[-1]]
            units += ["+".join(group) for group in groups]
    return units


def unit_atoms(unit: str) -> list[str]:
    """The atoms a unit gates: its name split at ``+``."""
    return unit.split("+")


def _skip_entries(unet: nn.Module, layers: bool) -> list[str | None]:
    """The down path's skip outputs in the order the UNet stacks them: ``conv_in``'s (None: no
    atom), then per down block its branches' outputs and its downsampler's (the block itself at
    block level)."""
    entries: list[str | None] = [None]
    for block in block_names(unet):
        if not block.startswith("down."):
            continue
        module = get_block(unet, block)
        groups = _block_layers(unet, block)
        branches = [g[-1] for g in groups if ".resnets." in g[0]]
        resampled = [g[-1] for g in groups if ".downsamplers." in g[0]][-1:]
        count = len(branches) + len(resampled)
        if count != len(_modules(module, "resnets")) + (1 if _modules(module, "downsamplers") else 0):
            raise ValueError(f"{block}: unexpected layout")
        entries += (branches + resampled) if layers else [block] * count
    return entries


def _skip_readers(unet: nn.Module, layers: bool) -> dict[str, list[str]]:
    """Who reads each down-path output as a skip: up block ``j``'s resnet ``i`` takes the
    ``i``-th entry from the end of what the blocks before it left on the stack."""
    entries = _skip_entries(unet, layers)
    readers: dict[str, list[str]] = {}
    for block in block_names(unet):
        if not block.startswith("up."):
            continue
        for i in _modules(get_block(unet, block), "resnets"):
            if not entries:
                raise ValueError(f"{block}: more skip inputs than down outputs")
            producer = entries.pop()
            if producer is not None:
                readers.setdefault(producer, []).append(f"{block}.resnets.{i}" if layers else block)
    return readers


def is_transformer(unet: nn.Module) -> bool:
    """A transformer's blocks (DiT), not a UNet's."""
    return not hasattr(unet, "down_blocks") and isinstance(getattr(unet, "transformer_blocks", None), nn.ModuleList)


def _plain(unet: nn.Module) -> bool:
    """Whether the dataflow is exactly the chain and the skips: diffusers' own forward and blocks."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    base = UNet2DConditionModel if isinstance(unet, UNet2DConditionModel) else UNet2DModel if isinstance(unet, UNet2DModel) else None
    if base is None or type(unet).forward is not base.forward:
        return False
    return all(type(get_block(unet, name)).__name__ in _PLAIN_BLOCKS for name in block_names(unet))


@dataclass(frozen=True)
class Plan:
    """What runs at each step under a schedule, per atom (shape ``(steps, atoms)``).

    Attributes:
        executes: the atom runs.
        reuses: the atom returns its cache (its gate is off and its output is read, at this step
            or, carried by the cache, at a later one).
        keeps: the atom's output is stored for the next step, which reuses it.
    """

    executes: np.ndarray
    reuses: np.ndarray
    keeps: np.ndarray

    @property
    def idle(self) -> np.ndarray:
        """Steps at which no atom runs."""
        return ~self.executes.any(axis=1)


@dataclass(frozen=True)
class UnitGraph:
    """The dataflow between the atoms of a UNet's units (see the module docs).

    Attributes:
        units: unit names, in the order of a schedule's row.
        atoms: the gated modules, in execution order.
        unit_of: for each atom, the index of its unit.
        nodes: every atom-level module of the UNet (gated or not), in execution order.
        atom_nodes: for each atom, its index among ``nodes``.
        readers: for each node, the nodes that read its output in the same call.
        exact: the dataflow is known (diffusers' own blocks and forward), so atoms that nothing
            reads are skipped; otherwise every atom whose gate is on runs.
        residual: the atoms are residual blocks (a transformer's): an atom whose gate is off
            returns its input plus its last update, so it reads its input, and every atom whose
            gate is on runs.
    """

    units: tuple[str, ...]
    atoms: tuple[str, ...]
    unit_of: tuple[int, ...]
    nodes: tuple[str, ...]
    atom_nodes: tuple[int, ...]
    readers: tuple[tuple[int, ...], ...]
    exact: bool
    residual: bool = False

    @classmethod
    def of(cls, unet: nn.Module, units: Sequence[str]) -> UnitGraph:
        """The graph of ``units`` (blocks, or layers and groups of layers) of ``unet``.

        Raises:
            UserError: a unit names no block or layer of this UNet, mixes blocks with layers, or
                two units share an atom.
        """
        units = tuple(units)
        atoms_of = [unit_atoms(u) for u in units]
        flat = [a for atoms in atoms_of for a in atoms]
        if len(set(flat)) != len(flat):
            raise UserError(f"units: an atom is gated twice ({', '.join(sorted({a for a in flat if flat.count(a) > 1}))})")
        blocks = block_names(unet)
        level_blocks = all(a in blocks for a in flat)
        if not level_blocks and any(not is_block_name(a) or a in blocks for a in flat):
            raise UserError(f"units: a unit mixes blocks and layers, or names no block ({', '.join(units)})")
        nodes = blocks if level_blocks else [layer for b in blocks for g in _block_layers(unet, b) for layer in g]
        index = {name: i for i, name in enumerate(nodes)}
        for a in flat:
            get_block(unet, a)  # a one-line UserError for an unknown name
            if a not in index:
                raise UserError(f"units: '{a}' is not a gated layer (resnets, attentions, down- or upsamplers)")
        order = sorted(range(len(flat)), key=lambda k: index[flat[k]])
        atoms = tuple(flat[k] for k in order)
        unit_index = [u for u, atoms_u in enumerate(atoms_of) for _ in atoms_u]
        skips = _skip_readers(unet, layers=not level_blocks)
        readers = tuple(
            tuple(sorted(({i + 1} if i + 1 < len(nodes) else set()) | {index[r] for r in skips.get(name, ())}))
            for i, name in enumerate(nodes)
        )
        return cls(
            units=units,
            atoms=atoms,
            unit_of=tuple(unit_index[k] for k in order),
            nodes=tuple(nodes),
            atom_nodes=tuple(index[a] for a in atoms),
            readers=readers,
            exact=_plain(unet),
            residual=is_transformer(unet),
        )

    def _node_gates(self, gates: np.ndarray) -> np.ndarray:
        """Per node, per step: the gate of its unit (ungated nodes: always on)."""
        on = np.ones((gates.shape[0], len(self.nodes)), dtype=bool)
        on[:, list(self.atom_nodes)] = gates[:, list(self.unit_of)]
        return on

    def plan(self, gates: Sequence[Sequence[bool]] | np.ndarray) -> Plan:
        """What runs at each step under ``gates`` (steps x units), working back from the last
        step: a node's output is *needed* at a step if it is the last node (the head's input), a
        node that runs reads it, or its gate is off at the next step and it is needed there (the
        cache carries it). An atom runs where its gate is on and it is needed; ungated nodes always run."""
        gates = np.asarray(gates, dtype=bool)
        steps, n = gates.shape[0], len(self.nodes)
        on = self._node_gates(gates)
        gated = np.zeros(n, dtype=bool)
        gated[list(self.atom_nodes)] = True
        runs = np.zeros((steps, n), dtype=bool)
        needed = np.zeros((steps, n), dtype=bool)
        read = np.zeros((steps, n), dtype=bool)  # read at this step, not only carried to a later one
        carry = np.zeros(n, dtype=bool)  # needed at the next step while reusing there
        for s in range(steps - 1, -1, -1):
            for k in range(n - 1, -1, -1):
                read[s, k] = not self.exact or self.residual or k == n - 1 or any(runs[s, r] for r in self.readers[k])
                needed[s, k] = read[s, k] or carry[k]
                runs[s, k] = (on[s, k] and needed[s, k]) or not gated[k]
            carry = needed[s] & ~on[s]
        atoms = list(self.atom_nodes)
        reuses = needed & ~on
        keeps = np.zeros_like(runs)
        keeps[:-1] = runs[:-1] & reuses[1:]
        return Plan(runs[:, atoms], reuses[:, atoms], keeps[:, atoms])

    def expected_runs(self, probs: torch.Tensor) -> torch.Tensor:
        """The probability that each atom runs at each step (``(steps, atoms)``) when each unit's
        gate is on with probability ``probs`` (steps x units), gates independent; differentiable.
        Like :meth:`plan` but without the cache's carry (an atom is needed where a reader runs),
        which only ever adds a little computation."""
        n = len(self.nodes)
        node_of = {node: a for a, node in enumerate(self.atom_nodes)}
        ones = torch.ones_like(probs[:, 0])
        runs: list[torch.Tensor | None] = [None] * n
        for k in range(n - 1, -1, -1):
            if not self.exact or self.residual or k == n - 1:
                need = ones
            else:
                need = 1 - torch.stack([1 - runs[r] for r in self.readers[k]]).prod(0) if self.readers[k] else ones * 0
            a = node_of.get(k)
            runs[k] = ones if a is None else probs[:, self.unit_of[a]] * need
        return torch.stack([runs[k] for k in self.atom_nodes], dim=1)


#: An up block's resnet, by block and index (the layers whose skip input gating may leave out).
UP_RESNET = re.compile(r"^(up\.\d+)\.resnets\.(\d+)$")
