"""What would the shipped SD-1.5 studies cost? Their dry runs, on SD-1.5's architecture.

Builds a ``StableDiffusionPipeline`` folder with SD-1.5's UNet (random weights, built from its
config: speed and memory do not depend on them) at 64x64 latents, an ``AutoencoderKL`` that
compresses 8x per side to 4 channels (narrow: its cost is not the UNet's) and a 2-layer CLIP text
encoder of SD's width (768) and length (77 tokens), with SD-1.5's PNDM scheduler; writes
``studies/dipgo_sd15.yaml`` and ``studies/diffnas_sd15.yaml`` unchanged but for that teacher, the
prompt files, the reference images, the device and the precision; and runs
``run CONFIG --dry-run --json`` on each, printing the stages and the projection.

    python experiments/sd15_dry_run.py --device cpu --dtype bfloat16 --studies dipgo
    python experiments/sd15_dry_run.py --device cuda --dtype float16          # on a GPU: both studies
"""

from __future__ import annotations

import argparse
import json
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_pipeline(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({"cross_attention_dim": 768, "sample_size": 64})  # SD-1.5's UNet
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=512,
    )
    chars = sorted(set(string.ascii_lowercase + string.digits + " .,"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    words = folder / "words"
    words.mkdir(parents=True, exist_ok=True)
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None
    )
    pipe.save_pretrained(str(folder / "sd15"), safe_serialization=True)
    return folder / "sd15"


def write_study(name: str, folder: Path, teacher: Path, device: str, dtype: str) -> Path:
    from PIL import Image

    config = yaml.safe_load((ROOT / "studies" / f"{name}_sd15.yaml").read_text())
    prompts = [f"a photo of a {w}" for w in ("cat", "dog", "red car", "house by a lake", "bowl of fruit")]
    (folder / "train.txt").write_text("\n".join(prompts) + "\n")
    (folder / "eval.csv").write_text("caption\n" + "\n".join(prompts) + "\n")
    references = folder / "references"
    references.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, size=(512, 640, 3), dtype=np.uint8)).save(references / f"{i}.png")
    config.update(teacher=str(teacher), device=device, dtype=dtype if name == "dipgo" else "float32")
    config["prompts"].update(train=str(folder / "train.txt"), eval=str(folder / "eval.csv"))
    config["fid"]["dataset"] = f"folder:{references}"
    config["storage"] = f"sqlite:///{folder / name}.db"
    config["output_dir"] = str(folder / "runs")
    if "search_space" in config:
        config["search_space"] = str(ROOT / "search_spaces" / Path(config["search_space"]).name)
    path = folder / f"{name}_sd15.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", help="the DiP-GO teacher's precision (DiffNAS trains in float32)")
    parser.add_argument("--studies", nargs="+", default=["dipgo", "diffnas"], choices=["dipgo", "diffnas"])
    parser.add_argument("--out", default=None, help="write the dry runs' JSON here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        teacher = build_pipeline(folder)
        print(f"SD-1.5-shaped pipeline built in {time.perf_counter() - start:.0f} s", flush=True)
        for name in args.studies:
            config = write_study(name, folder, teacher, args.device, args.dtype)
            command = [sys.executable, "-m", "automl_diff.study", "run", str(config), "--dry-run", "--quiet"]
            began = time.perf_counter()
            done = subprocess.run([*command, "--json"], capture_output=True, text=True)
            wall = time.perf_counter() - began
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(done.returncode)
            try:
                result = json.loads(done.stdout)
            except json.JSONDecodeError:
                print(f"{name}: the dry run printed no JSON:\n{done.stdout[:3000]}\n{done.stderr[-3000:]}", file=sys.stderr)
                raise SystemExit(1) from None
            result["wall_seconds"] = wall
            results[name] = result
            print(f"\n{name}_sd15.yaml ({args.device}, {result['dtype']}): dry run {wall:.0f} s")
            for stage in result["stages"]:
                mark = " (projected from batches 1 and 2)" if stage["projected"] else ""
                print(
                    f"  {stage['name']}: {stage['count']} x {stage['seconds']:.3g} s at batch {stage['batch']}{mark}, "
                    f"peak {stage['peak_bytes'] / 2**30:.2f} GiB"
                )
            for skipped in result["skipped"]:
                print(f"  not measured: {skipped['name']} ({skipped['why']})")
            print(
                f"  a trial {result['trial_seconds'] / 3600:.2f} h, the study {result['study_seconds'] / 3600:.1f} h, "
                f"peak memory {result['peak_bytes'] / 2**30:.2f} GiB"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
