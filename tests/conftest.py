"""Shared fixtures: tiny UNets (channels 8/16 at 16x16), a tiny teacher folder, tiny study configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}

TINY_COND_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [8, 16],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
    "cross_attention_dim": 12,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """FID reference statistics and compiled kernels (inductor's cache: the tests that compile
    share it) go to per-session temporary caches."""
    monkeypatch.setenv("AUTOML_DIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


@pytest.fixture
def tiny_cond_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_COND_UNET).eval()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers pipeline folder (unet + DDPM scheduler) with a tiny random-weight teacher."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


#: The tiny text-to-image pipeline's prompts: what its character-level tokenizer spells.
TINY_PROMPTS = ("a handwritten seven", "the digit 2", "a three")


def _character_vocabulary(folder: Path) -> tuple[dict[str, int], Path]:
    """A character-level CLIP vocabulary (lower-case letters, digits, punctuation, each also as a
    word end) written as ``vocab.json`` and ``merges.txt`` in ``folder/words``: the vocabulary and
    that folder."""
    import json
    import string

    chars = sorted(set(string.ascii_lowercase + string.digits + ".,'-"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    words = folder / "words"
    words.mkdir(parents=True, exist_ok=True)
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    return vocab, words


def build_tiny_sd_pipeline(folder: Path, unet: dict | None = None) -> Path:
    """A real ``StableDiffusionPipeline`` with random weights, saved with diffusers: a tiny VAE
    (16x16 grey images like the digits, 8x8 latents), a tiny CLIP text model with a character-level
    tokenizer, a conditional UNet with SD's block kinds (``unet``: another config), and a DDIM
    scheduler with SD's betas."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab, words = _character_vocabulary(folder)
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), pad_token="<|endoftext|>", model_max_length=24)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=12,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=24,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**(unet or TINY_COND_UNET)),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = folder / ("pipeline" if unet is None else "pipeline_custom")
    pipe.save_pretrained(out, safe_serialization=True)
    return out


#: Stable Diffusion's UNet layout at tiny widths: four levels, cross attention in the first three,
#: two resnet + transformer pairs per down stage and three per up stage, a mid block with attention.
SD_LAYOUT = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "attention_head_dim": 4,
    "cross_attention_dim": 12,
}

#: The words of the user's prompts in :func:`build_user_pipeline`'s tests.
USER_WORDS = ("a", "an", "red", "green", "blue", "yellow", "square", "circle", "on", "black", "white", "background", "small", "big")


def build_user_pipeline(folder: Path) -> Path:
    """A user's own text-to-image pipeline, unlike the shipped teachers: SD's UNet layout
    (:data:`SD_LAYOUT`), RGB images (a VAE from 16x16x3 to 8x8x4), a word-piece ``BertTokenizer``
    and its ``CLIPTextModel`` (another tokenizer class than SD's), and SD's own PNDM scheduler;
    random weights, saved with diffusers."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    words = folder / "wordpiece"
    words.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *USER_WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789"]
    (words / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(words / "vocab.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=12,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocab.index("[CLS]"),
            eos_token_id=vocab.index("[SEP]"),
            pad_token_id=vocab.index("[PAD]"),
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD_LAYOUT),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = folder / "user_pipeline"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_clip(folder: Path, words: tuple[str, ...] | None = None) -> Path:
    """A tiny random ``CLIPModel`` with its ``CLIPProcessor`` (16x16 images, a word-level CLIP
    tokenizer over ``words``, default the digits-t2i vocabulary), saved as a local CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from automl_diff.zoo.digits_t2i import _vocabulary, word_tokenizer

    torch.manual_seed(0)
    tokenizer = word_tokenizer(list(words) if words is not None else _vocabulary())
    vocab = tokenizer.get_vocab()
    text = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text.update(max_position_embeddings=12, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    vision = {
        "image_size": 16,
        "patch_size": 8,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def tiny_rgb_vae(**config: float) -> torch.nn.Module:
    """A tiny random ``AutoencoderKL`` from 16x16 RGB images to 8x8x4 latents (``config``: more of
    its keys, such as ``scaling_factor``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **config,
    )


def build_tiny_sd3_pipeline(folder: Path) -> Path:
    """A real ``StableDiffusion3Pipeline`` with random weights, saved with diffusers: a 4-block
    ``SD3Transformer2DModel`` (MMDiT: joint text and image blocks, the last one updating the image
    stream alone) trained with flow matching (``FlowMatchEulerDiscreteScheduler``, SD3's shift 3),
    two tiny CLIP text encoders with projection and no T5 (SD3 runs without it), and a tiny RGB
    ``AutoencoderKL`` with a ``shift_factor`` (16x16 images, 8x8x4 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    vocab, words = _character_vocabulary(folder)

    def clip(width: int) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=12,
            projection_dim=width,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
        tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), pad_token="<|endoftext|>", model_max_length=12)
        return CLIPTextModelWithProjection(config), tokenizer

    (encoder, tokenizer), (encoder_2, tokenizer_2) = clip(8), clip(16)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # the two CLIPs' states side by side (8 + 16), zero-padded as SD3 pads them to T5's width
        caption_projection_dim=16,
        pooled_projection_dim=24,  # the two CLIPs' pooled projections side by side
        pos_embed_max_size=8,
    )
    vae = tiny_rgb_vae(scaling_factor=1.5, shift_factor=0.06)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_2=encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    out = folder / "sd3"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``StableDiffusion3Pipeline`` folder (see :func:`build_tiny_sd3_pipeline`)."""
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


#: Class names of :func:`build_tiny_dit_pipeline`'s pipeline (``model_index.json``'s ``id2label``).
DIT_LABELS = {0: "zero", 1: "one", 2: "two", 3: "three, third", 7: "seven"}


def build_tiny_dit_pipeline(folder: Path) -> Path:
    """A real ``DiTPipeline`` with random weights, saved with diffusers: a 4-block
    ``DiTTransformer2DModel`` (patch 2, 1000 classes and a learned variance, as DiT-XL/2 has) on the
    4-channel 8x8 latents of a tiny RGB ``AutoencoderKL`` (16x16 images), a DDIM scheduler with
    DiT's linear betas, and class names in ``model_index.json``."""
    import json

    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    vae = tiny_rgb_vae()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in DIT_LABELS.items()}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``DiTPipeline`` folder (see :func:`build_tiny_dit_pipeline`)."""
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``StableDiffusionPipeline`` folder (see :func:`build_tiny_sd_pipeline`)."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "family": "unet2d",
                "blocks": {
                    "down.0": {"channels": [4, 8]},
                    "down.1": {"channels": [8, 16], "layers": [1, 2], "attention": [True, False]},
                },
            }
        )
    )
    return path


@pytest.fixture
def tiny_supernet_space(tmp_path: Path) -> Path:
    """A ``family: supernet`` space for the tiny teacher: two blocks, four subnets each."""
    path = tmp_path / "supernet.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "family": "supernet",
                "blocks": {
                    "down.0": {"layers": [0, 1], "width": [0.5, 1.0]},
                    "up.1": {"layers": [1, 2], "width": [0.5, 1.0]},
                },
            }
        )
    )
    return path


#: The budgets of :func:`write_study`'s tiny study (a test that trains longer overrides ``train_iterations``).
TINY_BUDGETS = {
    "train_iterations": 4,
    "batch_size": 8,
    "fid_samples": 24,
    "sampling_steps": 2,
    "latency_repeats": 1,
    "latency_batch_size": 2,
}


def write_study(tmp_path: Path, teacher: Path, space: Path, **overrides) -> Path:
    """A tiny DKDM study config (seconds per trial); keys in ``overrides`` replace the defaults
    (a None value removes the key)."""
    config = {
        "name": "tiny",
        "method": "dkdm",
        "teacher": str(teacher),
        "search_space": str(space),
        "objectives": [{"name": "macs", "direction": "minimize"}, {"name": "fid", "direction": "minimize"}],
        "sampler": {"name": "random", "seed": 0},
        "n_trials": 2,
        "budgets": dict(TINY_BUDGETS),
        "fid": {"dataset": "digits", "features": "digits"},
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "method_options": {"pool_size": 16, "pool_steps": 5},
    }
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def study_factory(tmp_path: Path, tiny_teacher_dir: Path, tiny_space: Path):
    def make(**overrides) -> Path:
        return write_study(tmp_path, tiny_teacher_dir, tiny_space, **overrides)

    return make


# --- loading exports where automl_diff cannot be imported ---

_BLOCK_AUTOML_DIFF = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "automl_diff" or name.startswith("automl_diff."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, _Block())
try:
    import automl_diff
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("automl_diff is importable: the check would prove nothing")
"""


def printed_load_calls(out: str) -> list[str]:
    """The calls ``export`` printed after ``load with:``, one per exported trial."""
    return [line.split("load with:", 1)[1].strip() for line in out.splitlines() if "load with:" in line]


def sample_without_automl_diff(call: str, *, cwd: Path, steps: int = 2, prompt: str | None = None) -> dict:
    """Run ``pipe = <call>`` and sample two images (from ``prompt`` for a text-to-image pipeline)
    in a fresh Python in which ``automl_diff`` cannot be imported (an import blocker in front of
    every finder); returns what it saw: the UNet's (or DiT's transformer's) class name, the images'
    shape, and the modules named automl_diff it imported."""
    import json
    import subprocess
    import sys

    script = (
        _BLOCK_AUTOML_DIFF
        + f"""
import json, diffusers
pipe = {call}
images = pipe({"batch_size=2" if prompt is None else f"[{prompt!r}] * 2"}, num_inference_steps={steps}, output_type="np").images
model = getattr(pipe, "unet", None) or pipe.transformer
print(json.dumps({{"unet": type(model).__name__, "unet_module": type(model).__module__, "shape": list(images.shape),
                  "imported": sorted(m for m in sys.modules if m.startswith("automl_diff"))}}))
"""
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / ".hf_modules"), "DIFFUSERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- holding a trial mid-run in another process, without timing ---

_PATCH_DKDM = """
import importlib.util
import sys
import threading
import time
from pathlib import Path

_TARGET = {target!r}

{patch}


class _PatchOnImport:
    # patches the target module when something imports it, so that every other Python process
    # (Ray's agents and workers among them) starts as fast as without this file
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
"""

_HOLD = """
def _patch(module):
    fit = module.fit

    def holding_fit(*args, desc="", on_step=None, **kwargs):
        def step(i, loss):
            if on_step is not None:
                on_step(i, loss)
            if desc.startswith("trial {trial} ") and i == {at_step}:
                Path({marker!r}).write_text(desc)
                threading.Event().wait()  # until the process is killed or interrupted

        return fit(*args, desc=desc, on_step=step, **kwargs)

    module.fit = holding_fit
"""

#: Every rung score is the clock: a later trial always scores worse at a rung than earlier ones.
_LATER_IS_WORSE = """
def _patch(module):
    module.held_out_loss = lambda model, batch: time.time() - 1.7e9
"""


def patched_dkdm_env(folder: Path, patch: str, *, target: str = "automl_diff.methods.dkdm.method") -> dict[str, str]:
    """The environment of a subprocess (and of every Python process it starts) whose module
    ``target`` (default: DKDM's) gets ``patch`` (a ``_patch(module)`` function) when it is
    imported: a ``sitecustomize`` on ``PYTHONPATH``."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_PATCH_DKDM.replace("{target!r}", repr(target)).replace("{patch}", patch))
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{REPO}"}


def holding_env(folder: Path, *, trial: int, at_step: int = 2) -> tuple[dict[str, str], Path]:
    """The environment of a ``study run`` subprocess in which DKDM trial ``trial`` writes a marker
    file at training step ``at_step`` and then holds, until the process is killed or interrupted
    (a ``sitecustomize`` on ``PYTHONPATH``). Returns the environment and the marker's path: a
    test waits for the file, so it acts while that very trial runs, whatever the machine's speed."""
    marker = folder / f"trial_{trial}_running"
    env = patched_dkdm_env(folder / "hold", _HOLD.format(trial=trial, at_step=at_step, marker=str(marker)))
    return env, marker


def later_trials_score_worse_env(folder: Path) -> dict[str, str]:
    """The environment of a subprocess in which every DKDM rung score is the time it was taken."""
    return patched_dkdm_env(folder / "clock", _LATER_IS_WORSE)


def wait_for_file(path: Path, process, *, timeout: float = 600) -> None:
    """Wait until ``path`` exists; fail at once if ``process`` exits first (a deadline only
    guards against a hang, it decides nothing)."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            err = process.stderr.read()[-3000:] if process.stderr else ""
            raise AssertionError(f"the process exited ({process.returncode}) before {path.name} appeared: {err}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)


# --- PostgreSQL: a real server started from Debian's binaries for the tests that need one ---

POSTGRES_USER = "automl"
POSTGRES_PASSWORD = "pg-test-secret"


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that holds initdb and postgres."""
    found = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "initdb").is_file() and (d / "postgres").is_file()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0) if found else None


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server on a free port of 127.0.0.1 with password authentication, in a
    temporary folder; yields ``postgresql://automl:<password>@127.0.0.1:<port>``.

    PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user (Debian's
    package creates it) or ``nobody``. Skipped where PostgreSQL is not installed, except in CI
    (``CI`` set), where ``.ci/run`` installs it and its absence is a failure.
    """
    import pwd
    import shutil
    import subprocess
    import tempfile
    import time

    bindir = postgres_bindir()
    if bindir is None:
        message = "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres; apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="automl_diff_pg_"))
    os.chmod(root, 0o755)
    (root / "password").write_text(POSTGRES_PASSWORD)
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = next((name for name in ("postgres", "nobody") if _has_user(name)), None)
        if user is None:
            pytest.fail("running as root and neither a postgres nor a nobody user exists to run PostgreSQL")
        account = pwd.getpwnam(user)
        os.chown(root, account.pw_uid, account.pw_gid)
        os.chown(root / "password", account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    data = root / "data"
    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            POSTGRES_USER,
            f"--pwfile={root / 'password'}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            *as_user,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:{port}"
    import psycopg2

    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg2.connect(f"{url}/postgres", connect_timeout=2).close()
            break
        except psycopg2.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"PostgreSQL did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield url
    server.terminate()
    server.wait(timeout=60)
    log.close()
    shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def postgres_url(postgres_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the test server, as a storage URL."""
    import re

    import psycopg2

    name = "t_" + re.sub(r"\W", "_", request.node.name.lower())[:50]
    connection = psycopg2.connect(f"{postgres_server}/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return f"{postgres_server}/{name}"
