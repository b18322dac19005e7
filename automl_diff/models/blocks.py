"""Stable, dotted names for the blocks and layers of a diffusers UNet or transformer.

A UNet is an ordered list of blocks ``down.0 … down.K``, ``mid``, ``up.0 … up.K`` (diffusers'
``down_blocks``, ``mid_block`` and ``up_blocks``); layers inside a block keep diffusers' attribute
path under the block name: ``down.1.resnets.0``, ``up.2.attentions.1``, ``mid.attentions.0``.
Search spaces, MACs tables, gates and exported configs all use these names. Both ``UNet2DModel``
and ``UNet2DConditionModel`` are addressed the same way. A transformer (DiT) is the ordered list
of its ``transformer_blocks.<i>``, named as diffusers names them.

Block inputs and outputs are recorded through diffusers' removable hooks
(:class:`diffusers.hooks.ModelHook`), never by replacing ``forward``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from automl_diff.errors import UserError

__all__ = [
    "BlockRecord",
    "BlockRecorder",
    "block_names",
    "get_block",
    "is_block_name",
    "layer_names",
    "map_tensors",
    "module_path_to_name",
    "name_to_module_path",
    "record_blocks",
]

_PREFIXES = {"down": "down_blocks", "up": "up_blocks", "mid": "mid_block", "transformer_blocks": "transformer_blocks"}
_MODULE_PREFIXES = {v: k for k, v in _PREFIXES.items()}
_RECORD_HOOK = "automl_diff.record"


def block_names(unet: nn.Module) -> list[str]:
    """Names of the model's blocks in execution order: ``down.*``, ``mid``, ``up.*`` of a UNet,
    ``transformer_blocks.*`` of a transformer."""
    if not hasattr(unet, "down_blocks") and isinstance(getattr(unet, "transformer_blocks", None), nn.ModuleList):
        return [f"transformer_blocks.{i}" for i in range(len(unet.transformer_blocks))]
    names = [f"down.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid")
    names += [f"up.{i}" for i in range(len(unet.up_blocks))]
    return names


def is_block_name(name: str) -> bool:
    """Whether ``name`` addresses a block or a layer inside one (``up.1.resnets.0``), not a
    top-level layer such as ``conv_out``."""
    return name.partition(".")[0] in _PREFIXES


def name_to_module_path(name: str) -> str:
    """``down.1.resnets.0`` -> ``down_blocks.1.resnets.0`` (the ``named_modules`` path)."""
    head, _, rest = name.partition(".")
    if head not in _PREFIXES:
        raise UserError(f"unknown block '{name}': names start with down.<i>, mid, up.<i> or transformer_blocks.<i>")
    return _PREFIXES[head] + ("." + rest if rest else "")


def module_path_to_name(path: str) -> str | None:
    """``down_blocks.1.resnets.0`` -> ``down.1.resnets.0``; None outside the blocks (``conv_in``)."""
    head, _, rest = path.partition(".")
    if head not in _MODULE_PREFIXES:
        return None
    return _MODULE_PREFIXES[head] + ("." + rest if rest else "")


def get_block(unet: nn.Module, name: str) -> nn.Module:
    """The module a dotted name addresses (a block, or a layer inside one).

    Raises:
        UserError: the name is not a block or layer of this UNet; the message lists the blocks.
    """
    path = name_to_module_path(name)
    try:  # a walk down the path, not over every module
        module = unet.get_submodule(path) if re.fullmatch(r"(down|up|transformer_blocks)\.\d+(\..+)?|mid(\..+)?", name) else None
    except AttributeError:
        module = None
    if module is None:
        raise UserError(f"unknown block '{name}'; this model has blocks {', '.join(block_names(unet))}")
    return module


def layer_names(unet: nn.Module, block: str) -> list[str]:
    """The resnet and attention layers of a block, e.g. ``down.1.resnets.0``, ``down.1.attentions.0``."""
    module = get_block(unet, block)
    names = []
    for kind in ("resnets", "attentions"):
        children = getattr(module, kind, None)
        if children is not None:
            names += [f"{block}.{kind}.{i}" for i in range(len(children))]
    return names


@dataclass
class BlockRecord:
    """Inputs and outputs of one block over the forward passes seen while recording.

    ``args``/``kwargs`` are the block's call arguments (tensors detached, other values as given),
    ``outputs`` what it returned, one entry per forward pass.
    """

    name: str
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)


def map_tensors(fn: Any, value: Any) -> Any:
    """``fn`` applied to every tensor in a (nested) call argument or output; other values as given."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def _detach(value: Any) -> Any:
    return map_tensors(torch.Tensor.detach, value)


class _RecordHook(ModelHook):
    def __init__(self, record: BlockRecord, *, detach: bool) -> None:
        super().__init__()
        self.record = record
        self.detach = detach

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        keep = _detach if self.detach else (lambda v: v)
        self.record.args.append(keep(args))
        self.record.kwargs.append(keep(kwargs))
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.record.outputs.append(_detach(output) if self.detach else output)
        return output


class BlockRecorder:
    """Records the inputs and outputs of named blocks through removable diffusers hooks.

    Use :func:`record_blocks` as a context manager; the hooks are gone when it exits.

    Args:
        unet: a ``UNet2DModel`` or ``UNet2DConditionModel``.
        names: blocks or layers to record (default: every block).
        detach: store detached tensors (True) or keep the autograd graph (False, for feature losses).
    """

    def __init__(self, unet: nn.Module, names: Iterable[str] | None = None, *, detach: bool = True) -> None:
        self.unet = unet
        self.names = list(names) if names is not None else block_names(unet)
        self.detach = detach
        self.records: dict[str, BlockRecord] = {n: BlockRecord(n) for n in self.names}
        self._attached: list[nn.Module] = []

    def attach(self) -> BlockRecorder:
        modules = {name: get_block(self.unet, name) for name in self.names}  # every name resolves first
        for name, module in modules.items():
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_RecordHook(self.records[name], detach=self.detach), _RECORD_HOOK)
            self._attached.append(module)
        return self

    def remove(self) -> None:
        for module in self._attached:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(_RECORD_HOOK, recurse=False)
        self._attached.clear()

    def clear(self) -> None:
        """Forget what was recorded, keep recording."""
        for record in self.records.values():
            record.args.clear()
            record.kwargs.clear()
            record.outputs.clear()

    def __iter__(self) -> Iterator[BlockRecord]:
        return iter(self.records.values())

    def __getitem__(self, name: str) -> BlockRecord:
        return self.records[name]


@contextmanager
def record_blocks(unet: nn.Module, names: Iterable[str] | None = None, *, detach: bool = True) -> Iterator[BlockRecorder]:
    """Record block inputs/outputs inside a ``with`` statement.

    Example::

        with record_blocks(unet, ["down.1", "mid"]) as rec:
            unet(x, t)
        h = rec["mid"].outputs[0]
    """
    recorder = BlockRecorder(unet, names, detach=detach).attach()
    try:
        yield recorder
    finally:
        recorder.remove()
