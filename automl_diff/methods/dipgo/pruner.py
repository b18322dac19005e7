"""DiP-GO's pruner network: learned queries -> MLP -> two logits (compute, reuse) per gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunerNetwork"]


class PrunerNetwork(nn.Module):
    """Produces the gates ``g[step, unit]`` of a sampling trajectory.

    The query of gate ``(i, u)`` is the sum of a learned step query, a learned unit query and a
    learned per-gate query (zero at the start); a shared MLP maps it to two logits (compute,
    reuse). The factorisation shares evidence across gates (a unit that matters tends to matter
    at every step; a step where features change fast needs more units), so a few hundred noisy
    gradient steps suffice; the per-gate queries then specialise.
    :meth:`sample` draws binary gates with a straight-through Gumbel-softmax (exact 0/1 forward,
    soft gradients backward), so the whole sampling chain trains end to end. Step 0 always
    computes (nothing is cached yet).

    Args:
        steps: sampling steps.
        units: prunable units per step.
        dim: query width.
        hidden: MLP width.
        keep_bias: initial logit margin for "compute" (all gates start almost surely on).
    """

    def __init__(self, steps: int, units: int, *, dim: int = 64, hidden: int = 128, keep_bias: float = 3.0) -> None:
        super().__init__()
        self.steps, self.units = steps, units
        self.step_queries = nn.Parameter(torch.randn(steps, 1, dim) * 0.5)
        self.unit_queries = nn.Parameter(torch.randn(1, units, dim) * 0.5)
        self.gate_queries = nn.Parameter(torch.zeros(steps, units, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2))
        with torch.no_grad():
            self.mlp[-1].weight.mul_(0.1)
            self.mlp[-1].bias.copy_(torch.tensor([keep_bias, 0.0]))

    def logits(self) -> torch.Tensor:
        """Shape ``(steps, units, 2)``: logits of (compute, reuse)."""
        return self.mlp(self.queries())

    def queries(self) -> torch.Tensor:
        """The query of every gate, shape ``(steps, units, dim)``."""
        return self.step_queries + self.unit_queries + self.gate_queries

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
