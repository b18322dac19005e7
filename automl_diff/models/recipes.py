"""Hand-made compression recipes expressed on the framework's block names, so that studies can
start from them (``method_options.warm_start``) and the benchmark can measure them as peers.

* BK-SDM (Kim et al., 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable
  Diffusion"): block removal. :func:`bk_sdm_removed` names the layers its variants remove;
  :func:`bk_sdm_peer` builds the student with the teacher's remaining weights.

DeepCache's uniform schedule, the other recipe, is a gate schedule
(:meth:`automl_diff.gating.schedule.Schedule.uniform_cache`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from automl_diff.errors import UserError
from automl_diff.models.blocks import block_names, get_block
from automl_diff.models.student import LAYOUT_KEYS, STUDENT_CLASSES, with_layout

__all__ = ["BK_SDM_RECIPES", "BK_SDM_VARIANTS", "bk_sdm_defined", "bk_sdm_label", "bk_sdm_peer", "bk_sdm_removed"]

#: BK-SDM's variants, with the paper's names: ``base`` (BK-SDM-Base: one resnet
#: and attention pair removed from each down and up stage) and ``small`` (BK-SDM-Small: also the
#: whole mid block).
BK_SDM_VARIANTS = {"base": "BK-SDM-Base", "small": "BK-SDM-Small"}


#: The warm-start names of BK-SDM's variants (``method_options.warm_start`` of DKDM and DiffNAS).
BK_SDM_RECIPES = {f"bk-sdm-{variant}": variant for variant in BK_SDM_VARIANTS}


def bk_sdm_removed(unet: nn.Module, variant: str = "base") -> list[str]:
    """The layers BK-SDM removes from ``unet``, as block names (``down.0.resnets.1``, ...).

    Per down stage the last resnet and the attention after it (SD-1.x: ``down.i.resnets.1``,
    ``down.i.attentions.1``); per up stage the pair before the last (SD-1.x: ``up.i.resnets.1``,
    ``up.i.attentions.1``, the middle of three), so the stage keeps the resnet that takes the skip
    from the level above; ``small`` also removes the mid block's resnets and attention. On SD-1.x
    these are the layers BK-SDM-Base and BK-SDM-Small drop. BK-SDM defines its variants on SD's
    two pairs per down stage; on a teacher with one (digits-t2i) the same rule removes that pair,
    leaving the stage its downsampler, and the first of the up stage's two pairs.
    """
    if variant not in BK_SDM_VARIANTS:
        raise UserError(f"unknown BK-SDM variant '{variant}'; variants: {', '.join(BK_SDM_VARIANTS)}")
    removed = []
    for name in block_names(unet):
        block = get_block(unet, name)
        depth = len(block.resnets)
        if name == "mid":
            picks = range(depth) if variant == "small" else ()
        else:
            picks = (depth - 1,) if name.startswith("down.") else (depth - 2,)
        attentions = getattr(block, "attentions", None) or ()
        for i in picks:
            if i < 0:
                continue
            removed.append(f"{name}.resnets.{i}")
            if name == "mid":
                removed += [f"mid.attentions.{j}" for j in range(len(attentions)) if f"mid.attentions.{j}" not in removed]
            elif i < len(attentions) and attentions[i] is not None:
                removed.append(f"{name}.attentions.{i}")
    return removed


def bk_sdm_defined(unet: nn.Module) -> bool:
    """Whether BK-SDM's variants are defined on ``unet``: every down stage has at least two
    resnet + attention pairs (SD-1.x and SD-2.x), so removing one leaves each stage a pair."""
    return all(len(block.resnets) >= 2 for block in unet.down_blocks)


def bk_sdm_label(unet: nn.Module, variant: str) -> str:
    """What the peer is on ``unet``: the paper's name where its variant is defined, else what the
    rule does there (on one pair per down stage it empties every down stage)."""
    name = BK_SDM_VARIANTS[variant]
    return name if bk_sdm_defined(unet) else f"{name}'s rule, every down stage emptied"


def bk_sdm_peer(teacher: nn.Module, variant: str = "base") -> tuple[nn.Module, dict[str, Any], list[str]]:
    """BK-SDM's student of ``teacher``, initialised with the teacher's remaining weights. Returns
    the student, its diffusers config and the removed layers (:func:`bk_sdm_removed`).

    Where every down stage has at least two pairs (SD-1.x and SD-2.x), the student is what BK-SDM
    builds: a stock ``UNet2DConditionModel`` with one pair fewer per stage (``layers_per_block``
    minus one; ``mid_block_type: None`` for Small), each kept layer holding the teacher's weights
    (the up stage's last pair moves down one place, as BK-SDM copies ``up.i.resnets.2`` into
    ``resnets.1``). On a shallower teacher (one pair per down stage, as digits-t2i) stock diffusers
    cannot hold an empty stage, so the removed layers stay in place computing nothing: a removed
    resnet keeps only its shortcut (identity, or the 1x1 ``conv_shortcut`` where channels change)
    and a removed attention is the identity (:class:`~automl_diff.models.student.StudentUNet2DConditionModel`),
    so the stage passes its input on and every skip connection keeps its width.
    """
    from diffusers import UNet2DConditionModel

    removed = bk_sdm_removed(teacher, variant)
    config = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    state = teacher.state_dict()
    depths = [len(block.resnets) for block in teacher.down_blocks]
    stock = isinstance(teacher, UNet2DConditionModel) and not any(config.get(k) for k in LAYOUT_KEYS) and min(depths) >= 2
    if stock:
        config.update(_class_name="UNet2DConditionModel", layers_per_block=[d - 1 for d in depths])
        if variant == "small":
            config["mid_block_type"] = None
        student = UNet2DConditionModel.from_config(config)

        def source(key: str) -> str:
            parts = key.split(".")
            if parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions"):
                kept = len(student.up_blocks[int(parts[1])].resnets)  # the teacher's up stage had one more
                if int(parts[3]) >= kept - 1:
                    parts[3] = str(int(parts[3]) + 1)
            return ".".join(parts)

        student.load_state_dict({k: state[source(k)] for k in student.state_dict()}, strict=True)
    else:
        config = with_layout(
            config,
            resnet_widths={name: 0 for name in removed if ".resnets." in name},
            skip_attentions=[name for name in removed if ".attentions." in name],
        )
        student = STUDENT_CLASSES[config["_class_name"]][0].from_config(config)
        student.load_state_dict({k: state[k] for k in student.state_dict()}, strict=True)
    param = next(teacher.parameters())
    student.to(param.device)
    if param.dtype != torch.float32:
        student.to(param.dtype)
    return student.eval(), config, removed
