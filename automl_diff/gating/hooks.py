"""Executing a gate schedule on a diffusers UNet with removable hooks.

:class:`GateController` puts a diffusers hook (:class:`diffusers.hooks.ModelHook`) on the UNet,
which tracks the step from the timestep it is called with (a timestep above the last one starts a
trajectory; PNDM's repeated timestep is the next call), and one on each atom of the schedule's
units (:class:`~automl_diff.models.dataflow.UnitGraph`), which runs the atom, returns its cache,
or, where nothing reads its output at this step, returns a placeholder without running anything;
an atom keeps what it computes only when the next step reuses it. So a schedule's speed is
measured on the clock, not only in MACs. Pipelines call the UNet once per step
(classifier-free guidance batches both halves), so a schedule applies to them unchanged.

Where a resnet in an up block does not run, the concatenation of its skip input is skipped too:
the block's hook marks that skip tensor (a subclass sharing its storage) and its ``torch.cat``
returns a placeholder the resnet's gate never reads, while diffusers' block code runs unchanged.
The head reuses its output while the atom that feeds it does, and a step that runs no atom
runs nothing where idle steps are free (:mod:`automl_diff.gating.units`). A *soft* mode, where
every atom runs and mixes ``g * new + (1 - g) * cached``, lets DiP-GO differentiate the gates;
:meth:`GateController.pinned` runs one step of it from given caches, so that each step can be
recomputed under gradient checkpointing.

Compiled (``compile=True``), the UNet's whole forward is traced once, with the hooks inside it,
into one graph for every step of every schedule (per batch shape): a step's gates are tensors the
graph reads, and each atom is a ``torch.cond`` on its gate, which at run time either runs the atom
or returns a copy of its cache, so a step runs only what its plan runs and no step recompiles. The
first step of a trajectory runs every atom and keeps its output (the caches the graph reads from
then on), eagerly unless ``plan_graphs`` compiles it; inside the graph every atom's cache is its
latest output, and the concatenations in front of resnets run at every step. Inductor keeps its layout optimisation (each ``torch.cond``'s
operands pinned to the strides the graph declares) and, on a CPU, writes its wrapper in C++.
With ``plan_graphs=K``, K plans get graphs of their own, their gates constants: the first call of
a trajectory (every atom runs), which then runs compiled too, and the K - 1 plans that the most
traced calls share. In those graphs an atom runs or returns its cache, uncopied, and what nothing
reads (a concatenation in front of a resnet that reuses its cache) is dead code the compiler
drops. Those calls run their plan's graph, the others the shared one (compiled only if some call
needs it); each graph keeps every atom's cache its latest output, so the two mix freely. A plan's
graph has no branches to call, so on a CPU it keeps inductor's Python wrapper, which compiles
faster.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention
from torch import nn
from torch._inductor import inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
from torch.utils import _pytree as pytree

from automl_diff.gating.schedule import Schedule
from automl_diff.gating.units import head_input_atom, head_modules, idle_steps_free
from automl_diff.models.blocks import get_block
from automl_diff.models.dataflow import UP_RESNET, Plan, UnitGraph

__all__ = ["GATE_HOOK", "GateController", "ScheduleMismatch", "apply_schedule"]

GATE_HOOK = "automl_diff.gate"
STEP_HOOK = "automl_diff.gate_step"
CONCAT_HOOK = "automl_diff.gate_concat"
HEAD_HOOK = "automl_diff.gate_head"
ATTENTION_HOOK = "automl_diff.gate_attention"
_ATTR = "_automl_diff_gates"
_COMPILED = "_automl_diff_compiled"  # on a model: its gated forwards compiled (_compiled_forward)


class ScheduleMismatch(RuntimeError):
    """The sampler ran more steps than the schedule has."""


def _tree_map(fn: Any, *values: Any) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return fn(*values)
    if isinstance(first, (tuple, list)):
        return type(first)(_tree_map(fn, *parts) for parts in zip(*values))
    if isinstance(first, dict):
        return type(first)(**{k: _tree_map(fn, *(v[k] for v in values)) for k in first})
    return first


def _timestep_value(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    if t is None:
        raise TypeError("a gated UNet must be called with a timestep")
    return float(t)


class _StepHook(ModelHook):
    """On the UNet: advances the step; at a step that computes no unit (where such steps are
    free), returns the last call's output without running anything; compiled, calls the shared
    compiled forward, or the step's plan's own, after a trajectory's first step (at it too where
    that has a plan graph)."""

    def __init__(self, controller: GateController) -> None:
        super().__init__()
        self.controller = controller
        self.compiled: Any = None  # the forward, hooks included, compiled (binary gates only)
        self.planned: dict[Any, Any] = {}  # a plan's own compiled forward, by the plan's key

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        c = self.controller
        if c._pinned is None:
            c._advance(_timestep_value(args, kwargs))
        if c._idle and c._output is not None:  # a fresh wrapper around the same tensor
            kind, sample = c._output
            if not kwargs.get("return_dict", True):
                return (sample,)
            if kind is not tuple:
                return kind(sample=sample)
        if c._traced:
            c._count_executed()
            out = (self.planned[c._plan_key] if c._planned else self.compiled)(*args, **kwargs)
        else:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if c.idle_free and c.soft_gates is None:
            c._output = (tuple, out[0]) if isinstance(out, tuple) else (type(out), out.sample)
        return out


def _compiled_forward(unet: nn.Module, forward: Any, options: dict[str, Any], plan: Any = None) -> Any:
    """``forward`` (the model's, its gate hooks attached) compiled with ``options``, for this
    model as it is now: every schedule applied to it later while its modules and attention
    processors are the same objects, in the same mode, with parameters of the same shapes, dtypes
    and devices reuses it, and the graphs it has already traced. Its code is its own
    (:func:`_own_code`)."""
    tensors = itertools.chain(unet.named_parameters(), unet.named_buffers())
    processors = getattr(unet, "attn_processors", None)
    key = (
        repr(sorted(options.items())),
        tuple((name, id(module), module.training) for name, module in unet.named_modules()),
        tuple((name, id(processor)) for name, processor in processors.items()) if isinstance(processors, dict) else (),
        tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors),
        plan,
    )
    compiled = unet.__dict__.setdefault(_COMPILED, _Compiled())
    if key not in compiled:
        inner = {"options": dict(options["options"])} if "options" in options else {}  # torch.compile pops from it
        compiled[key] = torch.compile(_own_code(forward), **{**options, **inner})
    return compiled[key]


class _Compiled(dict):
    """A model's compiled gated forwards, by what they were compiled for; a copy or a pickle of the
    model starts with none (they call this model's forward)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Compiled:
        return _Compiled()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Compiled, ())


def _own_code(forward: Any) -> Any:
    """A function that calls ``forward``, with a code object of its own. Dynamo keeps graphs per
    code object: one model's graphs, whose guards do not check the model (:func:`_plan_guards`),
    are then never looked up for another model, nor theirs for this one."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    call.__code__ = call.__code__.replace(co_name=f"gated_forward_{next(_CODES)}")
    return call


_CODES = itertools.count()


class _Skipped:
    """Stands for the concatenation in front of a resnet that reuses its cache at this step."""

    __slots__ = ("unit",)

    def __init__(self, unit: str) -> None:
        self.unit = unit


class _Dead:
    """Stands for the output of an atom that does not run at this step and whose output nothing
    that runs reads: any torch function or arithmetic on it gives it back, so diffusers' block
    code passes it along unchanged to the atoms that ignore it."""

    __slots__ = ()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return DEAD

    def __getitem__(self, key: Any) -> _Dead:
        return self

    @property
    def shape(self) -> _Dead:
        return self

    def _same(self, *other: Any) -> _Dead:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _same

    def __repr__(self) -> str:
        return "DEAD"


DEAD = _Dead()


def _plain(value: Any) -> Any:
    if isinstance(value, _SkipTensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _SkipTensor(torch.Tensor):
    """A skip tensor (same storage) whose resnet reuses its cache at this step: concatenated after
    the running state, it yields a :class:`_Skipped` placeholder instead of a copy; any other use
    sees the plain tensor. Only operations that touch it go through Python."""

    _automl_diff_unit: str

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.cat:
            tensors = args[0] if args else kwargs.get("tensors")
            if isinstance(tensors, (list, tuple)) and len(tensors) == 2 and isinstance(tensors[1], _SkipTensor):
                return _Skipped(tensors[1]._automl_diff_unit)
        return func(*_plain(args), **_plain(kwargs))


def _skip_tensor(tensor: torch.Tensor, unit: str) -> _SkipTensor:
    marked = tensor.as_subclass(_SkipTensor)
    marked._automl_diff_unit = unit
    return marked


class _ConcatHook(ModelHook):
    """On an up block with gated resnets: the skip tensors of the resnets that do not run at this
    step are marked, so their concatenations are not computed."""

    def __init__(self, controller: GateController, resnets: Sequence[tuple[int, int, str]]) -> None:
        super().__init__()
        self.controller = controller
        self.resnets = tuple(resnets)  # (resnet index in the block, atom index, atom name)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if self.controller._traced:  # compiled, a concatenation nothing reads is dead code
            return forward(*args, **kwargs)
        runs = self.controller._runs
        reusing = [(index, name) for index, atom, name in self.resnets if not runs[atom]]
        positional = len(args) > 1
        skips = args[1] if positional else kwargs.get("res_hidden_states_tuple")
        if not reusing or not isinstance(skips, (tuple, list)):
            return forward(*args, **kwargs)
        marked = list(skips)
        for index, name in reusing:  # resnet i consumes skips[-1 - i] (diffusers pops from the end)
            if index < len(marked) and type(marked[-1 - index]) is torch.Tensor:
                marked[-1 - index] = _skip_tensor(marked[-1 - index], name)
        if positional:
            args = (args[0], type(skips)(marked), *args[2:])
        else:
            kwargs = {**kwargs, "res_hidden_states_tuple": type(skips)(marked)}
        return forward(*args, **kwargs)


class _GateHook(ModelHook):
    def __init__(self, controller: GateController, index: int, name: str) -> None:
        super().__init__()
        self.controller = controller
        self.index = index
        self.name = name
        self.spec: pytree.TreeSpec | None = None  # the structure of the atom's output

    def _dead(self) -> Any:
        if self.spec is None:
            return DEAD
        return pytree.tree_unflatten([DEAD] * self.spec.num_leaves, self.spec)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        c = self.controller
        if c._traced:
            return self._constant(module, args, kwargs) if c._planned else self._gated(module, args, kwargs)
        residual = c.graph.residual  # a transformer block: its cache is its update, added to its input
        if not c._runs[self.index]:  # the plan of this step, resolved once when the step began
            if c._reuse[self.index]:
                return _tree_map(_plus, c.cache[self.name], _block_input(module, args, kwargs)) if residual else c.cache[self.name]
            return self._dead()
        cache = c.cache
        if c.soft_gates is not None:
            out = self.fn_ref.original_forward(*args, **kwargs)
            c.executed[self.name] += 1
            new = _tree_map(_minus, out, _block_input(module, args, kwargs)) if residual else out
            if c.step > 0 and self.name in cache:
                g = c.soft_gates[c.step, self.index]
                new = _tree_map(lambda now, old: g * now + (1 - g) * old, new, cache[self.name])
            cache[self.name] = new
            return _tree_map(_plus, new, _block_input(module, args, kwargs)) if residual else new
        if args and isinstance(args[0], (_Skipped, _Dead)):
            raise RuntimeError(f"{self.name}: its input was not computed but the atom runs")
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.spec is None:
            self.spec = pytree.tree_flatten(out)[1]
        c.executed[self.name] += 1
        keep = c._keep[self.index]
        c._store(self.name, _tree_map(_minus, out, _block_input(module, args, kwargs)) if residual and keep else out, keep)
        return out

    def _constant(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Traced for one plan (its gates constants): the atom runs, or returns its cache (a
        transformer block: its input plus its cached update) without a copy; what nothing reads
        is dead code the compiler drops."""
        c, residual = self.controller, self.controller.graph.residual
        if not c._runs[self.index]:
            cached = c.cache[self.name]
            return _tree_map(_plus, cached, _block_input(module, args, kwargs)) if residual else cached
        out = self.fn_ref.original_forward(*args, **kwargs)
        new = _tree_map(_minus, out, _block_input(module, args, kwargs)) if residual else out
        c.cache[self.name] = pytree.tree_map_only(torch.Tensor, _dense, new)
        return out

    def _gated(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Traced: ``torch.cond`` on the atom's gate at this step, between running the atom and
        reusing its cache (a transformer block: its input plus its cached update); either way the
        cache becomes the atom's latest output (update)."""
        c, forward = self.controller, self.fn_ref.original_forward
        cached, spec = pytree.tree_flatten(c.cache[self.name])
        at = [k for k, leaf in enumerate(cached) if isinstance(leaf, torch.Tensor)]
        call = _Operands(args, kwargs)

        def tensors(tree: Any) -> tuple[torch.Tensor, ...]:
            leaves = pytree.tree_flatten(tree)[0]
            return tuple(_dense(leaves[k]) for k in at)

        def run(*operands: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a, kw = call.rebuild(operands)
            out = forward(*a, **kw)
            if not c.graph.residual:
                return tensors(out)
            return tensors(out) + tensors(_tree_map(_minus, out, _block_input(module, a, kw)))

        def reuse(*operands: torch.Tensor) -> tuple[torch.Tensor, ...]:
            kept = tuple(cached[k].clone() for k in at)
            if not c.graph.residual:
                return kept
            a, kw = call.rebuild(operands)
            return tensors(_tree_map(_plus, c.cache[self.name], _block_input(module, a, kw))) + kept

        result = torch.cond(c._flags[self.index], run, reuse, call.operands)
        c.cache[self.name] = _replaced(cached, spec, at, result[len(at) :] if c.graph.residual else result)
        return _replaced(cached, spec, at, result[: len(at)])


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous, with the strides of a new tensor of its shape (``contiguous()``
    keeps any stride of a dimension of size 1): what ``torch.cond`` needs of its branches'
    outputs, and what keeps one graph's inputs alike from step to step."""
    return tensor.contiguous().view(-1).view(tensor.shape)


def _fixed(tensor: torch.Tensor) -> torch.Tensor:
    """Traced: ``tensor`` in the strides the graph declares for it. Inductor gives a buffer the
    layout it prefers (a convolution's output: channels-last), and a ``torch.cond`` branch,
    compiled for the declared strides, refuses others; this pins them (a copy only where they
    differ)."""
    return torch.ops.prims.inductor_force_stride_order(tensor, tensor.stride())


class _Operands:
    """A call's tensor arguments, as ``torch.cond`` takes them (contiguous), and the call rebuilt
    around other tensors in their places."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.at = [k for k, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]
        self.operands = tuple(_fixed(_dense(self.leaves[k])) for k in self.at)

    def rebuild(self, operands: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _replaced(self.leaves, self.spec, self.at, operands)


def _replaced(leaves: Sequence[Any], spec: pytree.TreeSpec, at: Sequence[int], values: Sequence[Any]) -> Any:
    """The tree of ``leaves`` (flattened to ``spec``) with ``values`` at the positions ``at``."""
    leaves = list(leaves)
    for k, value in zip(at, values):
        leaves[k] = value
    return pytree.tree_unflatten(leaves, spec)


class _AttentionHook(ModelHook):
    """Compiled, on each diffusers ``Attention``: calls its processor with the keyword arguments
    the processor takes, read once here. Diffusers' forward reads the processor's signature at
    every call, which dynamo cannot trace inside ``torch.cond``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.accepts = set(inspect.signature(module.processor.__call__).parameters)

    def new_forward(self, module: nn.Module, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        names = ("encoder_hidden_states", "attention_mask")  # the forward's other positional parameters
        kwargs = {**dict(zip(names, args)), **kwargs}
        passed = {key: value for key, value in kwargs.items() if key in self.accepts or key in names}
        return module.processor(module, hidden_states, **passed)


def _block_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A transformer block's input in the structure of its output: its ``hidden_states``, or for
    a joint block (SD3's MMDiT) ``(encoder_hidden_states, hidden_states)``, both streams it updates."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if hasattr(module, "context_pre_only"):
        return kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1], hidden
    return hidden


def _minus(out: torch.Tensor, before: Any) -> torch.Tensor:
    return out - before


def _plus(update: torch.Tensor, before: Any) -> torch.Tensor:
    return before + update


class _HeadHook(ModelHook):
    """On a head layer: reuses its cached output while the atom that feeds the head reuses its own."""

    def __init__(self, controller: GateController, name: str) -> None:
        super().__init__()
        self.controller = controller
        self.key = f"head:{name}"

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        c = self.controller
        if c._traced and c._planned:
            if c._head_reuses:
                return c.cache[self.key]
            c.cache[self.key] = _dense(self.fn_ref.original_forward(*args, **kwargs))
            return c.cache[self.key]
        if c._traced:  # a cond on whether the head reuses, as an atom's gate
            forward, cached, call = self.fn_ref.original_forward, c.cache[self.key], _Operands(args, kwargs)

            def run(*operands: torch.Tensor) -> torch.Tensor:
                a, kw = call.rebuild(operands)
                return _dense(forward(*a, **kw))

            c.cache[self.key] = torch.cond(c._head_flag, lambda *operands: cached.clone(), run, call.operands)
            return c.cache[self.key]
        if c._head_reuses and self.key in c.cache:
            return c.cache[self.key]
        out = self.fn_ref.original_forward(*args, **kwargs)
        c._store(self.key, out, c._head_keeps)
        return out


def _plan_guards(guards: Sequence[Any]) -> list[bool]:
    """Which of dynamo's guards a gated forward's graph keeps: those on its inputs, on globals and
    on the controller (the step's gates, the caches). Those on the model's own modules (their
    parameters, attributes and hook dicts: thousands on a UNet) are dropped, as
    ``torch.compiler.skip_guard_on_all_nn_modules_unsafe`` drops them, so that a call checks
    hundreds instead (on ``digits-t2i`` at batch 8, dynamo's lookups took 17% of a compiled
    schedule's trajectory with them, 5% without): the model must not change while a schedule
    is applied (apply it again after changing it), and no other model reaches these graphs
    (:func:`_own_code`)."""
    return [".controller" in guard.name or "forward.__self__" not in guard.name for guard in guards]


def _compile_options(compile: bool | dict[str, Any], device: torch.device) -> dict[str, Any] | None:
    """``torch.compile``'s options for the forward (None: eager), traced once per batch shape.
    The guards are :func:`_plan_guards`, unless the options name a ``guard_filter_fn``. On a
    CPU, inductor's wrapper (the code that calls the kernels and the ``torch.cond`` branches) is
    C++ unless the options say otherwise: a Python wrapper's calls into the branches cost 6-8% of
    a compiled schedule's speed-up on ``digits-t2i`` at batch 8 (BENCHMARKS.md)."""
    if compile is False:
        return None
    options = {"dynamic": False, **(compile if isinstance(compile, dict) else {})}
    wrapper = {"cpp_wrapper": True} if device.type == "cpu" and options.get("backend", "inductor") == "inductor" else {}
    options["options"] = {"guard_filter_fn": _plan_guards, **wrapper, **options.get("options", {})}
    if options.get("mode") in ("reduce-overhead", "max-autotune"):
        raise ValueError(
            f"compile: mode {options['mode']!r} replays CUDA graphs, which overwrite the outputs a schedule keeps for later "
            "steps; use the default mode or max-autotune-no-cudagraphs"
        )
    return options


def _plan_options(compile: bool | dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The options of a plan's own graph (``plan_graphs``): the shared graph's, with inductor's
    Python wrapper unless ``compile``'s options name a wrapper. A plan's graph calls no
    ``torch.cond`` branches, which is what the C++ wrapper speeds up, and compiling one costs
    more."""
    named = isinstance(compile, dict) and "cpp_wrapper" in compile.get("options", {})
    if options is None or named or not options["options"].get("cpp_wrapper"):
        return options
    return {**options, "options": {**options["options"], "cpp_wrapper": False}}


class GateController:
    """Gates the prunable units of a UNet step by step (see the module docs).

    Args:
        unet: a ``UNet2DModel`` or ``UNet2DConditionModel`` (or a subclass).
        units: unit names (blocks, layers or groups of layers joined by ``+``, none nested in another).
        steps: model calls per trajectory.
        compile: compile the forward (``torch.compile``; a dict: its options), hooks included,
            into one graph that every step runs, its gates as inputs (see the module docs): no
            step recompiles. Binary gates only (soft gates always run eagerly).
        plan_graphs: compiled, how many plans get graphs of their own besides the shared one: a
            trajectory's first call (every atom runs) and the ``plan_graphs - 1`` plans that recur
            most among a schedule's later calls. Each costs a compilation at the first trajectory
            and runs its calls without ``torch.cond``; where they cover every call, the shared graph
            is never compiled.

    Attributes:
        graph: the dataflow between the units' atoms.
        step: the current step (-1 before the first call).
        executed: how many times each atom really ran since the controller was attached.
        head_input: the atom whose output is the head's whole input (None: the head always runs).
        idle_free: a step that runs no atom skips the whole call (see
            :func:`~automl_diff.gating.units.idle_steps_free`).
    """

    def __init__(
        self, unet: nn.Module, units: Sequence[str], steps: int, *, compile: bool | dict[str, Any] = False, plan_graphs: int = 0
    ) -> None:
        if plan_graphs < 0 or (plan_graphs and compile is False):
            raise ValueError(f"plan_graphs={plan_graphs}: 0 or more, and more than 0 only with compile")
        self.unet = unet
        self.plan_graphs = plan_graphs
        self.graph = UnitGraph.of(unet, units)
        self.units = self.graph.units
        self.atoms = self.graph.atoms
        self.steps = steps
        self.step = -1
        self.gates: tuple[tuple[bool, ...], ...] | None = None
        self.soft_gates: torch.Tensor | None = None
        self.cache: dict[str, Any] = {}
        self.executed: Counter[str] = Counter()
        self.schedule: Schedule | None = None
        self.plan: Plan | None = None
        self._last_t: float | None = None
        self._pinned: int | None = None  # the step of every call while pinned (:meth:`pinned`)
        self._output: tuple[Any, torch.Tensor] | None = None  # the last call's output: (its type, its sample)
        self._modules = [get_block(unet, name) for name in self.atoms]
        up_resnets: dict[str, list[tuple[int, int, str]]] = {}
        for atom, name in enumerate(self.atoms):
            match = UP_RESNET.match(name)
            if match:
                up_resnets.setdefault(match.group(1), []).append((int(match.group(2)), atom, name))
        self._concat_blocks = [(get_block(unet, block), resnets) for block, resnets in up_resnets.items()]
        self.head_input = head_input_atom(unet, self.graph)
        self._head = [(name, getattr(unet, name)) for name in head_modules(unet)] if self.head_input else []
        self.idle_free = idle_steps_free(unet, self.graph)
        self._index = {name: i for i, name in enumerate(self.atoms)}
        device = next(itertools.chain(unet.parameters(), [torch.empty(())])).device
        self.compile_options = _compile_options(compile, device)
        self._plan_options = _plan_options(compile, self.compile_options)
        # traced: this step's gates and whether the head reuses, a tensor each (inductor's C++ wrapper reads a
        # torch.cond's predicate at the start of its storage, which an index into one tensor of gates is not)
        self._flags: tuple[torch.Tensor, ...] = ()
        self._head_flag = torch.ones((), dtype=torch.bool)
        self._step_flags: list[tuple[torch.Tensor, ...]] = []
        self._head_flags: list[torch.Tensor] = []
        self._plan_keys: list[Any] = []  # traced: each step's plan, where it has a graph of its own
        self._plan_key: Any = None
        self._planned = False
        self._step: _StepHook | None = None
        self._attentions = [m for m in unet.modules() if type(m).forward is Attention.forward] if self.compile_options is not None else []
        self._on_remove: list[Any] = []
        self._resolve()
        self._attach()

    # hooks ------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        previous = getattr(self.unet, _ATTR, None)
        if previous is not None:
            previous.remove()
        for module in self._attentions:  # first: the gate hooks call them
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_AttentionHook(module), ATTENTION_HOOK)
        step = self._step = _StepHook(self)
        HookRegistry.check_if_exists_or_initialize(self.unet).register_hook(step, STEP_HOOK)
        for index, (name, module) in enumerate(zip(self.atoms, self._modules)):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_GateHook(self, index, name), GATE_HOOK)
        for block, resnets in self._concat_blocks:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_ConcatHook(self, resnets), CONCAT_HOOK)
        for name, module in self._head:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_HeadHook(self, name), HEAD_HOOK)
        if self.compile_options is not None:  # after every hook: the compiled forward traces them all
            step.compiled = _compiled_forward(self.unet, step.fn_ref.original_forward, self.compile_options)
        setattr(self.unet, _ATTR, self)

    def remove(self) -> None:
        """Detach every hook: the UNet computes everything again."""
        if getattr(self.unet, _ATTR, None) is not self:
            return
        HookRegistry.check_if_exists_or_initialize(self.unet).remove_hook(STEP_HOOK, recurse=False)
        for module in self._modules:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(GATE_HOOK, recurse=False)
        for block, _ in self._concat_blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(CONCAT_HOOK, recurse=False)
        for _, module in self._head:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HEAD_HOOK, recurse=False)
        for module in self._attentions:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(ATTENTION_HOOK, recurse=False)
        while self._on_remove:
            self._on_remove.pop()()
        delattr(self.unet, _ATTR)
        self.cache.clear()
        self._output = None

    def __enter__(self) -> GateController:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # state ------------------------------------------------------------------------------------------
    def use(self, schedule: Schedule | None) -> GateController:
        """Binary gates from a schedule (None: compute everything, still through the hooks)."""
        if schedule is not None and (schedule.units != self.units or schedule.steps != self.steps):
            raise ValueError("the schedule's units or steps differ from this controller's")
        self.schedule = schedule
        self.gates = schedule.gates if schedule is not None else None
        self.plan = self.graph.plan(schedule.gates) if schedule is not None else None
        if self.plan is not None:
            self._step_flags = [tuple(torch.tensor(bool(v)) for v in row) for row in self.plan.executes]
            head = self._index[self.head_input] if self.head_input else None
            reuses = self.plan.reuses[:, head] if head is not None else np.zeros(len(self.plan.executes), dtype=bool)
            self._head_flags = [torch.tensor(bool(v)) for v in reuses]
            self._compile_plans(reuses)
        self.soft_gates = None
        self.reset()
        return self

    def _compile_plans(self, head_reuses: np.ndarray) -> None:
        """Compiled: ``plan_graphs`` plans (which atoms run, whether the head reuses) get graphs of
        their own, their gates constants, beside the shared graph: a trajectory's first call, and
        the plans that the most later calls share. Where they cover every call, the shared graph
        is never compiled."""
        self._plan_keys = []
        if self.compile_options is None or self.plan is None or self._step is None or self.plan_graphs <= 0:
            return
        first = (tuple([True] * len(self.atoms)), False)  # every atom runs and keeps its output; the head runs
        keys = [(tuple(row.tolist()), bool(reuses)) for row, reuses in zip(self.plan.executes, head_reuses)]
        counts = Counter(key for key in keys[1:] if (any(key[0]) or not self.idle_free) and key != first)  # idle: no graph
        chosen = {first} | {key for key, _ in counts.most_common(self.plan_graphs - 1)}
        self._plan_keys = [first] + [key if key in chosen else None for key in keys[1:]]
        step = self._step
        for key in chosen:
            if key not in step.planned:
                step.planned[key] = _compiled_forward(self.unet, step.fn_ref.original_forward, self._plan_options, plan=key)

    def use_soft(self, gates: torch.Tensor) -> GateController:
        """Differentiable gates, shape ``(steps, units)``: every atom runs and mixes with its cache."""
        if tuple(gates.shape) != (self.steps, len(self.units)):
            raise ValueError(f"soft gates must have shape ({self.steps}, {len(self.units)}), got {tuple(gates.shape)}")
        self.soft_gates = gates[:, list(self.graph.unit_of)]
        self.plan = None
        self.reset()
        return self

    def reset(self) -> None:
        """Forget the caches; the next call starts a trajectory."""
        self.cache.clear()
        self._output = None
        self.step = -1
        self._last_t = None
        self._resolve()

    @contextlib.contextmanager
    def pinned(self, step: int, cache: dict[str, Any]) -> Iterator[None]:
        """Soft gates only: calls inside the block run step ``step`` with ``cache`` as the atoms'
        outputs from the step before, whatever timestep they are called with; the step's own
        outputs are in :attr:`cache` afterwards. Running the same call twice gives the same
        result, which gradient checkpointing needs: the backward pass recomputes a step from
        its saved inputs."""
        if self.soft_gates is None:
            raise RuntimeError("pinned steps need soft gates (use_soft)")
        self.cache = dict(cache)
        self.step = step
        self._pinned = step
        self._resolve()
        try:
            yield
        finally:
            self._pinned = None

    def _resolve(self) -> None:
        """Resolve the current step once, before any atom runs: which atoms run, which return
        their cache, which keep what they compute (those the next step reuses: a cache nobody
        reads would only hold memory the allocator could reuse), whether the head reuses or
        keeps, whether the step runs nothing. The hooks then read one flag each. Compiled, a
        trajectory's first step runs every atom and keeps every output (eagerly, or in its own
        graph with ``plan_graphs``); the steps after it are traced, their gates the tensors
        :attr:`_flags` and :attr:`_head_flag` (or constants, in a plan's graph)."""
        n, plan, step = len(self.atoms), self.plan, self.step
        compiled = self.compile_options is not None and self.soft_gates is None and plan is not None
        self._traced = compiled and (step > 0 or (step == 0 and bool(self._plan_keys)))
        self._plan_key = self._plan_keys[step] if self._traced and self._plan_keys else None
        self._planned = self._plan_key is not None
        if self.soft_gates is not None or plan is None or step <= 0:
            self._runs, self._reuse = [True] * n, [False] * n
            self._keep = [self.soft_gates is not None] * n if plan is None else [compiled or bool(k) for k in plan.keeps[max(step, 0)]]
        else:
            self._runs, self._reuse, self._keep = plan.executes[step].tolist(), plan.reuses[step].tolist(), plan.keeps[step].tolist()
            if self._traced:
                self._flags, self._head_flag = self._step_flags[step], self._head_flags[step]
        head = self.head_input
        self._head_reuses = head is not None and self._reuse[self._index[head]]
        self._head_keeps = self.soft_gates is None and head is not None and (compiled or self._keep[self._index[head]])
        self._idle = self.idle_free and plan is not None and step > 0 and not any(self._runs)

    def _count_executed(self) -> None:
        """Count the atoms that run at this step (compiled, the hooks run only while tracing)."""
        for name, runs in zip(self.atoms, self._runs):
            if runs:
                self.executed[name] += 1

    def _store(self, key: str, out: Any, keep: bool) -> None:
        """Keep ``out`` for a later step, or drop the older cache no step will read again, so the
        allocator can reuse its memory."""
        if keep:
            self.cache[key] = pytree.tree_map_only(torch.Tensor, _dense, out) if self.compile_options is not None else out
        else:
            self.cache.pop(key, None)

    def _advance(self, t: float) -> None:
        last = self._last_t
        if last is None or t > last or (t == last and self.step + 1 >= self.steps):
            self.cache.clear()
            self._output = None
            self.step = 0
        else:
            self.step += 1
            if self.step >= self.steps:
                steps = self.schedule.inference_steps if self.schedule is not None else self.steps
                raise ScheduleMismatch(
                    f"the schedule has {self.steps} model calls but the sampler made more; sample with num_inference_steps={steps}"
                )
        self._last_t = t
        self._resolve()


def apply_schedule(target: Any, schedule: Schedule, *, compile: bool | dict[str, Any] = False, plan_graphs: int = 0) -> GateController:
    """Apply a schedule to a pipeline (anything with ``.unet``, or ``.transformer``: DiT) or a
    UNet or transformer, replacing any schedule
    applied before. Returns the controller: ``.remove()`` it (or use it as a context manager) to
    get the plain model back.

    ``compile=True`` (or ``torch.compile``'s options as a dict) compiles the gated forward into
    one graph that every step runs, its gates as inputs (:class:`GateController`). A UNet compiled with
    ``torch.compile`` (an ``OptimizedModule``, or a pipeline's) is gated as its original module,
    compiled so: while the schedule is applied, calling the compiled module runs the gated one.
    ``plan_graphs=K`` (compiled only) also compiles K plans into graphs of their own, without
    ``torch.cond``: a trajectory's first call and the K - 1 plans that the most later calls share;
    faster calls for a longer first trajectory.

    Raises:
        UserError: the schedule was made for another architecture.
    """
    unet = getattr(target, "unet", None) or getattr(target, "transformer", None) or target
    wrapper = unet if isinstance(unet, torch._dynamo.eval_frame.OptimizedModule) else None
    if wrapper is not None:
        unet, compile = wrapper._orig_mod, compile or True
    schedule.check_model(unet)
    controller = GateController(unet, schedule.units, schedule.steps, compile=compile, plan_graphs=plan_graphs).use(schedule)
    if wrapper is not None:  # the wrapper's compiled forward would trace the hooks: call the gated module instead
        compiled_forward = wrapper.forward
        wrapper.forward = unet.__call__
        controller._on_remove.append(lambda: setattr(wrapper, "forward", compiled_forward))
    return controller
