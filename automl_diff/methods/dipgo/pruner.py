"""DiP-GO's pruner networks: learned queries, one per gate, mapped to two logits (compute, reuse).

Both draw binary gates with a straight-through Gumbel-softmax (:meth:`Pruner.sample`: exact 0/1
forward, soft gradients backward), so the whole sampling chain trains end to end; step 0 always
computes (nothing is cached yet). Their head starts with a margin for "compute", so every gate
starts almost surely on and the sparsity loss turns them off one by one.

* :class:`PrunerNetwork` (``pruner: mlp``): the query of gate ``(i, u)`` is the sum of a learned
  step query, a learned unit query and a learned per-gate query (zero at the start); a shared MLP
  maps it to the logits. The factorisation shares evidence across gates (a unit that matters
  tends to matter at every step; a step where features change fast needs more units), so a few
  hundred noisy gradient steps suffice; the per-gate queries then specialise.
* :class:`AttentionPruner` (``pruner: attention``): the paper's design, a learned query per gate,
  stacked self-attention layers in which each step's units attend to each other, and a linear
  head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionPruner", "Pruner", "PrunerNetwork", "build_pruner"]


class Pruner(nn.Module):
    """Gates ``g[step, unit]`` of a sampling trajectory from :meth:`logits` (subclasses)."""

    def __init__(self, steps: int, units: int) -> None:
        super().__init__()
        self.steps, self.units = steps, units

    def logits(self) -> torch.Tensor:
        """Shape ``(steps, units, 2)``: logits of (compute, reuse)."""
        raise NotImplementedError

    def _first_step_on(self, gates: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(gates)
        mask[0] = 0
        return gates * mask + (1 - mask)

    def probs(self) -> torch.Tensor:
        """Probability that each gate computes, shape ``(steps, units)``; row 0 is 1."""
        return self._first_step_on(self.logits().softmax(-1)[..., 0])

    def sample(self, tau: float = 1.0) -> torch.Tensor:
        """Binary gates (1 = compute) with straight-through Gumbel-softmax gradients."""
        return self._first_step_on(F.gumbel_softmax(self.logits(), tau=tau, hard=True)[..., 0])


def _keep_head(layer: nn.Linear, keep_bias: float) -> None:
    with torch.no_grad():
        layer.weight.mul_(0.1)
        layer.bias.copy_(torch.tensor([keep_bias, 0.0]))


class PrunerNetwork(Pruner):
    """Step, unit and gate queries through a shared MLP (see the module docs).

    Args:
        steps: model calls per trajectory.
        units: prunable units per step.
        dim: query width.
        hidden: MLP width.
        keep_bias: initial logit margin for "compute" (all gates start almost surely on).
    """

    def __init__(self, steps: int, units: int, *, dim: int = 64, hidden: int = 128, keep_bias: float = 3.0) -> None:
        super().__init__(steps, units)
        self.step_queries = nn.Parameter(torch.randn(steps, 1, dim) * 0.5)
        self.unit_queries = nn.Parameter(torch.randn(1, units, dim) * 0.5)
        self.gate_queries = nn.Parameter(torch.zeros(steps, units, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2))
        _keep_head(self.mlp[-1], keep_bias)

    def queries(self) -> torch.Tensor:
        """The query of every gate, shape ``(steps, units, dim)``."""
        return self.step_queries + self.unit_queries + self.gate_queries

    def logits(self) -> torch.Tensor:
        return self.mlp(self.queries())


class AttentionPruner(Pruner):
    """The paper's pruner: a learned query per gate, ``layers`` pre-norm self-attention layers in
    which the units of each step attend to each other (one sequence per step), a linear head.

    Args:
        steps: model calls per trajectory.
        units: prunable units per step.
        dim: query width.
        heads: attention heads.
        layers: stacked self-attention layers.
        keep_bias: initial logit margin for "compute".
    """

    def __init__(self, steps: int, units: int, *, dim: int = 64, heads: int = 4, layers: int = 2, keep_bias: float = 3.0) -> None:
        super().__init__(steps, units)
        self.queries = nn.Parameter(torch.randn(steps, units, dim) * 0.5)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)
        _keep_head(self.head, keep_bias)

    def logits(self) -> torch.Tensor:
        return self.head(self.encoder(self.queries))


def build_pruner(kind: str, steps: int, units: int, *, layers: int = 2) -> Pruner:
    """The pruner network ``kind`` (``mlp`` or ``attention``) for ``steps`` x ``units`` gates."""
    if kind == "attention":
        return AttentionPruner(steps, units, layers=layers)
    if kind == "mlp":
        return PrunerNetwork(steps, units)
    raise ValueError(f"unknown pruner {kind!r}")
