"""What every block supernet shares: a candidate (:class:`BlockChoice`) and the candidate set.

A block's candidates are the product of its choices (``layers``, ``width``, ``attention``,
``depth``, ``heads``), reduced to one representative per distinct computation
(:meth:`Supernet.canonical`, which each kind of block defines). UNet blocks
(:mod:`~automl_diff.methods.diffnas.supernet`) choose resnets, widths, attention and transformer
depth; transformer blocks (:mod:`~automl_diff.methods.diffnas.transformer`) choose whether they
compute, their heads and their MLP width.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["BlockChoice", "Supernet"]


@dataclass(frozen=True, order=True)
class BlockChoice:
    """One candidate subnet of a block.

    Attributes:
        layers: how many resnets compute (which ones: the supernet's ``drop`` order); the others
            keep their shortcut. A transformer block computes (1) or is skipped (0).
        width: inner width of the computing resnets (a transformer block's feed-forward), as a
            fraction of their full width.
        attention: whether computing layers keep the attention that follows them.
        depth: transformer layers each kept attention computes (0: all of the teacher's).
        heads: attention heads a transformer block keeps (0: all of the teacher's).
    """

    layers: int
    width: float
    attention: bool
    depth: int = 0
    heads: int = 0

    @property
    def key(self) -> str:
        key = f"layers={self.layers},width={self.width:g},attention={str(self.attention).lower()}"
        return key + (f",depth={self.depth}" if self.depth else "") + (f",heads={self.heads}" if self.heads else "")

    def to_params(self) -> dict[str, Any]:
        return {"layers": self.layers, "width": self.width, "attention": self.attention, "depth": self.depth, "heads": self.heads}


class Supernet(nn.Module):
    """A block's supernet: its choices, and which candidate it computes (:attr:`choice`).

    Subclasses set :attr:`layers`, :attr:`widths`, :attr:`attention_choices`, :attr:`depths` and
    :attr:`heads` (each ordered from the least to the most computing) and define
    :meth:`canonical`, :meth:`set`, :meth:`forward` and :meth:`subnet`.
    """

    name: str
    layers: tuple[int, ...]
    widths: tuple[float, ...]
    attention_choices: tuple[bool, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    choice: BlockChoice

    def canonical(self, choice: BlockChoice) -> BlockChoice:
        raise NotImplementedError

    def set(self, choice: BlockChoice) -> Supernet:
        """Make the supernet compute ``choice`` (returns self)."""
        raise NotImplementedError

    def subnet(self, choice: BlockChoice) -> nn.Module:
        """The candidate as a plain block with the shared weights cut out (a copy)."""
        raise NotImplementedError

    def candidates(self) -> list[BlockChoice]:
        """Every distinct candidate, smallest first."""
        axes = (self.layers, self.widths, self.attention_choices, self.depths, self.heads)
        return sorted({self.canonical(BlockChoice(*c)) for c in itertools.product(*axes)})

    def largest(self) -> BlockChoice:
        return self.canonical(BlockChoice(max(self.layers), max(self.widths), max(self.attention_choices), self.depths[-1], self.heads[-1]))

    def smallest(self) -> BlockChoice:
        return self.canonical(BlockChoice(min(self.layers), min(self.widths), min(self.attention_choices), self.depths[0], self.heads[0]))

    def params_of(self, choice: BlockChoice) -> dict[str, Any]:
        """A candidate as search-trial parameters, each among its choices (a skipped block's
        ``attention: false`` becomes a declared value; the candidate ignores it)."""
        params = choice.to_params()
        if params["attention"] not in self.attention_choices:
            params["attention"] = self.attention_choices[-1]
        return params

    def from_params(self, params: Mapping[str, Any]) -> BlockChoice:
        """The candidate of a search trial's parameters (those it lacks: the largest's)."""
        largest = self.largest()
        return self.canonical(
            BlockChoice(
                int(params.get("layers", largest.layers)),
                float(params.get("width", largest.width)),
                bool(params.get("attention", largest.attention)),
                int(params.get("depth", largest.depth)),
                int(params.get("heads", largest.heads)),
            )
        )
