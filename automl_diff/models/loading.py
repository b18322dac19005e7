"""Loading UNets and teachers: a built-in one, a local folder, a bare ``config.json``, or a hub id.

A *teacher* is a UNet plus the noise-scheduler config it was trained with, and the dataset its
samples are compared against for FID (known for the built-in teachers,
:data:`automl_diff.zoo.TEACHERS`; set ``fid.dataset`` in a study otherwise). A text-to-image
pipeline folder (``StableDiffusionPipeline``) is a teacher too: its UNet is what a study
compresses, and its VAE, text encoder and tokenizer come with it
(:class:`~automl_diff.models.text.TextToImage`), frozen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_diff.errors import UserError, first_line
from automl_diff.models.classes import ClassToImage, is_class_to_image_folder, load_class_to_image
from automl_diff.models.text import (
    DENOISERS,
    TEXT_TO_IMAGE_PIPELINES,
    JointTextToImage,
    TextToImage,
    is_text_to_image_folder,
    load_text_to_image,
    model_index,
)
from automl_diff.sampling import NoiseSchedule, Prompts, Sampler, is_flow_matching, noise_schedule
from automl_diff.zoo import TEACHERS

__all__ = [
    "EXPORT_INFO",
    "UNET_CLASSES",
    "ExportInfo",
    "Teacher",
    "denoiser_folder",
    "folder_sampler",
    "load_teacher",
    "load_unet",
    "read_export_info",
    "scheduler_config_for",
    "unet_from_config",
    "weights_digest",
]

#: The file an export writes beside its pipeline: source study, trial, metrics and lineage.
EXPORT_INFO = "automl_diff.json"


def _unet_classes() -> dict[str, type]:
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel

    from automl_diff.models.students import STUDENT_CLASSES

    return {
        "UNet2DModel": UNet2DModel,
        "UNet2DConditionModel": UNet2DConditionModel,
        "DiTTransformer2DModel": DiTTransformer2DModel,
        "SD3Transformer2DModel": SD3Transformer2DModel,
        **{name: cls for name, (cls, _) in STUDENT_CLASSES.items()},
    }


#: Model classes a ``config.json`` may name in ``_class_name`` (the denoisers of every teacher:
#: UNets, DiT's transformer and SD3's).
UNET_CLASSES = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "SD3Transformer2DModel",
    "StudentUNet2DModel",
    "StudentUNet2DConditionModel",
    "StudentDiTTransformer2DModel",
)

_DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


@dataclass
class Teacher:
    """A pretrained diffusion model to compress.

    Attributes:
        unet: the noise-prediction network.
        scheduler_config: the config of the scheduler it was trained with (dict, JSON-safe).
        source: how the user named it (a built-in teacher's name, a path, or a hub id).
        dataset: the dataset for FID reference statistics, when known (a built-in teacher's).
        judge: the prompt judge of a built-in text-to-image teacher (``prompt_accuracy``).
        weights_dir: a local folder ``load_unet`` reloads it from (None for a hub model).
        text: the frozen VAE, text encoder and tokenizer of a text-to-image teacher (None for an
            unconditional UNet).
        classes: the frozen VAE and class names of a class-conditional teacher (DiT).
    """

    unet: nn.Module
    scheduler_config: dict[str, Any]
    source: str
    dataset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    weights_dir: str | None = None
    text: TextToImage | None = None
    judge: str | None = None
    classes: ClassToImage | None = None

    @property
    def latent(self) -> TextToImage | ClassToImage | None:
        """The parts around a latent teacher's denoiser, text-to-image or class-conditional: its
        VAE, and what turns the study's prompts (text, or class names) into conditioning."""
        return self.text if self.text is not None else self.classes

    def sampler(self, scheduler: str = "auto", steps: int = 20, eta: float = 0.0, prompts: Prompts | None = None) -> Sampler:
        """A sampler of this teacher's noise schedule (:class:`~automl_diff.sampling.Sampler`)."""
        return Sampler(self.scheduler_config, scheduler, steps, eta, prompts)

    @property
    def prediction_type(self) -> str:
        """What the model predicts: ``epsilon`` (noise), ``v_prediction``, ``sample``, or ``flow``
        for a flow-matching model (SD3)."""
        if is_flow_matching(self.scheduler_config):
            return "flow"
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    def noise_schedule(self) -> NoiseSchedule:
        """Its training noise schedule (:class:`~automl_diff.sampling.NoiseSchedule`)."""
        try:
            return noise_schedule(self.scheduler_config)
        except ValueError as exc:
            raise UserError(f"teacher '{self.source}': scheduler: {exc}") from None

    @property
    def latent_resolution(self) -> int:
        """The side of what the UNet denoises (the image itself for a pixel-space UNet)."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def resolution(self) -> int:
        """The side of the images it generates (decoded, for a latent model)."""
        return self.latent_resolution * (self.latent.vae_scale_factor if self.latent is not None else 1)

    @property
    def channels(self) -> int:
        """The channels of the images it generates."""
        return self.latent.image_channels if self.latent is not None else int(self.unet.config.in_channels)


def _class_for(config: dict[str, Any], where: str) -> type:
    name = config.get("_class_name", "UNet2DModel")
    classes = _unet_classes()
    if name not in classes:
        raise UserError(f"{where}: _class_name '{name}' is not a supported UNet; supported: {', '.join(UNET_CLASSES)}")
    return classes[name]


def unet_from_config(config: dict[str, Any], *, where: str = "config") -> nn.Module:
    """Build a UNet with random weights from a diffusers config dict (``_class_name`` picks the class)."""
    cls = _class_for(config, where)
    try:
        return cls.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise UserError(f"{where}: cannot build {cls.__name__}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def denoiser_folder(path: Path) -> Path:
    """The folder holding the denoiser's config.json: the folder itself, its ``unet/`` or its
    ``transformer/`` (DiT)."""
    for folder in (path, path / "unet", path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    raise UserError(f"'{path}' holds no config.json, unet/config.json or transformer/config.json: not a diffusers model folder")


def load_unet(spec: str | Path, *, weights: bool = True) -> nn.Module:
    """Load a UNet from a folder (pipeline or model), a bare ``config.json`` (random weights), or a hub id.

    Args:
        spec: ``path/to/pipeline``, ``path/to/unet``, ``path/to/config.json``, or ``org/name``.
        weights: load the weights (False: the architecture with random weights, for counting).

    Raises:
        UserError: the path has no model, a weight file is missing, or the hub is unreachable.
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".json":
            raise UserError(f"'{spec}': expected a folder or a config.json, got a {path.suffix or 'plain'} file")
        return unet_from_config(_read_json(path), where=str(path))
    if path.is_dir():
        folder = denoiser_folder(path)
        config = _read_json(folder / "config.json")
        if not weights:
            return unet_from_config(config, where=str(folder / "config.json"))
        if not any(
            (folder / name).is_file() for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
        ):
            raise UserError(f"{folder}: diffusion_pytorch_model.safetensors is missing (only safetensors weights are loaded)")
        cls = _class_for(config, str(folder / "config.json"))
        try:
            return cls.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{folder}: cannot load the model: {str(exc).splitlines()[0]}") from None
    return _load_from_hub(str(spec), weights=weights)


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (offline mode, no route), or None; answers in seconds."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"cannot reach {host}: {exc.strerror or exc}"
    return None


def _check_hub_id(repo_id: str) -> None:
    """``repo_id`` must look like a hub id and the hub must answer (one line otherwise)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise UserError(f"model '{repo_id}' is not an existing local folder or file, nor a hub id (org/name)")
    reason = _hub_unreachable()
    if reason is not None:
        raise UserError(f"model '{repo_id}' is not a local path and the hub is unreachable ({reason}); download it and pass the folder")


def _load_from_hub(repo_id: str, *, weights: bool) -> nn.Module:
    _check_hub_id(repo_id)
    from diffusers import UNet2DModel

    try:
        config = UNet2DModel.load_config(repo_id, subfolder="unet")
        cls = _class_for(dict(config), f"{repo_id}/unet/config.json")
        if not weights:
            return unet_from_config(dict(config), where=f"{repo_id}/unet/config.json")
        return cls.from_pretrained(repo_id, subfolder="unet", use_safetensors=True, low_cpu_mem_usage=False)
    except UserError:
        raise
    except Exception as exc:  # the hub client raises many types for offline/missing repos
        raise UserError(f"model '{repo_id}' is not a local path and could not be loaded from the hub: {first_line(exc)}") from None


@dataclass(frozen=True)
class ExportInfo:
    """Where an exported model came from, as its ``automl_diff.json`` records it.

    Attributes:
        folder: the export folder.
        original_teacher: the teacher the chain of studies started from (``digits``, a path or a
            hub id, as the first study named it).
        lineage: one step per study of the chain, oldest first; the last step made this model
            (``study``, ``trial``, ``method``, ``teacher``, ``params``, ``metrics``, ...).
        schedule: the DiP-GO schedule file the model samples with, if any.
    """

    folder: Path
    original_teacher: str
    lineage: list[dict[str, Any]]
    schedule: str | None = None


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes and values): what tells
    two models of one architecture apart, for cache keys that must not outlive a re-export."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def read_export_info(spec: str | Path) -> ExportInfo | None:
    """The export record of a model folder, or None when the folder is not an automl_diff export.

    Raises:
        UserError: the record is not readable JSON, or names no teacher.
    """
    folder = Path(spec)
    path = folder / EXPORT_INFO
    if not folder.is_dir() or not path.is_file():
        return None
    data = _read_json(path)
    lineage = data.get("lineage")
    if not isinstance(lineage, list) or not lineage:  # exported before lineages were recorded: one step
        lineage = [{k: data.get(k) for k in ("study", "trial", "method", "teacher", "params", "metrics") if k in data}]
    original = data.get("original_teacher") or lineage[0].get("teacher")
    if not isinstance(original, str) or not original:
        raise UserError(f"{path}: names no teacher (key original_teacher); was it written by automl_diff export?")
    schedule = data.get("schedule")
    return ExportInfo(folder.resolve(), original, lineage, schedule if isinstance(schedule, str) else None)


def scheduler_config_for(path: Path | None) -> dict[str, Any]:
    """The scheduler config beside a local model (``scheduler/`` of a pipeline), else a default
    1000-step DDPM schedule."""
    if path is not None:
        for candidate in (
            path / "scheduler" / "scheduler_config.json",
            path / "scheduler_config.json",
            path.parent / "scheduler" / "scheduler_config.json",
        ):
            if candidate.is_file():
                return _read_json(candidate)
    return dict(_DEFAULT_SCHEDULER)


def folder_sampler(path: Path | None, *, steps: int, prompts: Prompts | None = None, scheduler: str = "auto") -> Sampler:
    """A sampler (the schedule's own kind unless ``scheduler`` says otherwise) of the noise schedule beside a local
    model (:func:`scheduler_config_for`)."""
    return Sampler(scheduler_config_for(path), scheduler=scheduler, steps=steps, prompts=prompts)


def load_teacher(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Teacher:
    """Load the teacher a study names: a built-in one (:data:`automl_diff.zoo.TEACHERS`), a local
    pipeline/UNet folder, or a hub id.

    The scheduler config comes from the pipeline's ``scheduler/`` folder (or the hub repo's);
    a bare UNet folder without one gets a default 1000-step DDPM schedule. ``dtype`` casts the
    UNet (and a text-to-image pipeline's VAE and text encoder), e.g. ``torch.float16`` on a GPU.
    """
    teacher = _load_teacher(spec, device)
    if dtype != torch.float32:
        teacher.unet.to(dtype=dtype)
        if teacher.latent is not None:
            teacher.latent.to(device, dtype=dtype)
    return teacher


def _load_teacher(spec: str, device: str | torch.device) -> Teacher:
    builtin = TEACHERS.get(spec)
    if builtin is not None:
        builtin.check()
        teacher = _load_teacher(str(builtin.folder), device)
        teacher.source, teacher.dataset, teacher.judge = spec, builtin.dataset, builtin.judge
        return teacher
    path = Path(spec)
    if path.is_file():
        raise UserError(f"teacher '{spec}' is a file; a teacher is a diffusers folder with weights (a bare config.json has none)")
    if path.exists():
        if path.is_dir() and is_text_to_image_folder(path):
            return _text_to_image_teacher(path, spec, device)
        if path.is_dir() and is_class_to_image_folder(path):
            return _class_to_image_teacher(path, spec, device)
        if (
            (path / "model_index.json").is_file()
            and "scheduler" in _read_json(path / "model_index.json")
            and not (path / "scheduler" / "scheduler_config.json").is_file()
        ):
            raise UserError(f"{path}: scheduler/scheduler_config.json is missing (model_index.json names a scheduler)")
        unet = load_unet(path)
        return Teacher(unet.to(device).eval(), scheduler_config_for(path if path.is_dir() else None), spec, weights_dir=str(path.resolve()))
    folder = _text_to_image_snapshot(spec)
    if folder is not None:
        return _text_to_image_teacher(folder, spec, device)
    unet = _load_from_hub(spec, weights=True)
    try:
        from diffusers import DDPMScheduler

        scheduler_config = dict(DDPMScheduler.load_config(spec, subfolder="scheduler"))
    except Exception:
        scheduler_config = dict(_DEFAULT_SCHEDULER)
    return Teacher(unet.to(device).eval(), scheduler_config, spec)


def _check_pipeline_folder(path: Path, denoiser: str) -> None:
    """A pipeline folder has the scheduler and the denoiser (``unet``, ``transformer``) its
    ``model_index.json`` names, or a one-line :class:`UserError` says which is missing."""
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise UserError(f"{path}: scheduler/scheduler_config.json is missing (model_index.json names a scheduler)")
    if not (path / denoiser / "config.json").is_file():
        raise UserError(f"{path}: {denoiser}/ is missing or has no config.json (model_index.json names a {denoiser})")


def _text_to_image_teacher(path: Path, source: str, device: str | torch.device) -> Teacher:
    """A text-to-image pipeline folder as a teacher: its UNet (SD3: transformer), scheduler and
    frozen parts."""
    denoiser = DENOISERS[str((model_index(path) or {}).get("_class_name"))]
    _check_pipeline_folder(path, denoiser)
    text = load_text_to_image(path)
    unet = load_unet(path / denoiser)
    if isinstance(text, JointTextToImage):
        _check_joint(path, unet, text)
    elif getattr(unet.config, "cross_attention_dim", None) != text.text_encoder.config.hidden_size:
        raise UserError(
            f"{path}: the UNet's cross_attention_dim ({getattr(unet.config, 'cross_attention_dim', None)}) differs from the text "
            f"encoder's hidden_size ({text.text_encoder.config.hidden_size})"
        )
    return Teacher(
        unet.to(device).eval(),
        scheduler_config_for(path),
        source,
        weights_dir=str(path.resolve()),
        text=text.to(device),
    )


def _check_joint(path: Path, transformer: nn.Module, text: JointTextToImage) -> None:
    """An SD3 pipeline's transformer, scheduler and text encoders fit each other, or one line says where not."""
    config = transformer.config
    if not hasattr(config, "pooled_projection_dim"):
        raise UserError(
            f"{path}: transformer/ is a {type(transformer).__name__}; a StableDiffusion3Pipeline needs an SD3Transformer2DModel"
        )
    if not is_flow_matching(scheduler_config_for(path)):
        raise UserError(f"{path}: scheduler/ is not FlowMatchEulerDiscreteScheduler; SD3 transformers are trained with flow matching")
    if config.pooled_projection_dim > config.joint_attention_dim:
        raise UserError(
            f"{path}: the transformer's pooled_projection_dim ({config.pooled_projection_dim}) exceeds its joint_attention_dim "
            f"({config.joint_attention_dim}); automl_diff carries the pooled embedding as one more text token"
        )


def _class_to_image_teacher(path: Path, source: str, device: str | torch.device) -> Teacher:
    """A class-conditional pipeline folder (DiT) as a teacher: its transformer, scheduler and VAE."""
    _check_pipeline_folder(path, "transformer")
    transformer = load_unet(path)
    num_classes = getattr(transformer.config, "num_embeds_ada_norm", None)
    if not num_classes:
        raise UserError(f"{path}: the transformer has no class embedding (num_embeds_ada_norm); not a class-conditional model")
    classes = load_class_to_image(path, num_classes=int(num_classes))
    if classes.vae.config.latent_channels != transformer.config.in_channels:
        raise UserError(
            f"{path}: the VAE's latent_channels ({classes.vae.config.latent_channels}) differ from the transformer's in_channels "
            f"({transformer.config.in_channels})"
        )
    return Teacher(
        transformer.to(device).eval(), scheduler_config_for(path), source, weights_dir=str(path.resolve()), classes=classes.to(device)
    )


def _text_to_image_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub text-to-image pipeline (downloaded once, safetensors only), or
    None where the hub id names another kind of model. Errors as :func:`load_unet`'s for the hub."""
    _check_hub_id(repo_id)
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text())
    except Exception:  # a UNet repo without a pipeline index: the UNet loader reports what is wrong
        return None
    if index.get("_class_name") not in TEXT_TO_IMAGE_PIPELINES:
        return None
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=[
                "model_index.json",
                "*.json",
                "*.txt",
                "*.model",  # a T5 tokenizer's sentencepiece model
                *(f"{part}/*.safetensors" for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")),
            ],
            ignore_patterns=["*fp16*", "*non_ema*", "*ema-only*"],
        )
    except Exception as exc:  # the hub client raises many types for offline/missing repos
        raise UserError(f"model '{repo_id}': cannot download the pipeline: {first_line(exc)}") from None
    return Path(folder)
