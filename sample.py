"""Text to image with Stable Diffusion or a BK-SDM student.

    python sample.py "a black vase holding a bouquet of roses"
    python sample.py "a red panda" "a castle" --model CompVis/stable-diffusion-v1-4 --num-images 4 --seed 7
    python sample.py "a watercolour of the same scene" --init-image photo.png --strength 0.6
    python sample.py "a cat" --model weights/toy-sd --scheduler dpm --steps 20 --out cat.png
    python sample.py "a lighthouse" --model v2-1_512-ema-pruned.safetensors --prediction-type epsilon
    python sample.py "a red panda" --num-images 8 --device cuda --compile    # compiled U-Net, CUDA graphs
    python sample.py "a red circle above a blue square" --model weights/toy-sd   # offline: the toy model
    python sample.py "a dog" --lora dog.safetensors --lora-scale 1 --lora style.safetensors --lora-scale 0.6
    python sample.py "a black vase" --model weights/my-tiny-lcm --scheduler lcm --steps 4   # few-step LCM
    python sample.py "a black vase" --model weights/my-tiny-lcm --scheduler lcm --steps 4 --vae weights/taesd

Several images are saved numbered (sample-00.png, ...) with a grid (sample-grid.png). Each image
carries its prompt, seed and settings: a PNG in its text chunks, a JPEG or WebP in its EXIF.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from minisd.checkpoints.lora_files import open_lora
from minisd.cli import (
    BAD_INPUT,
    UsageError,
    check_device,
    check_image_path,
    finite_float,
    positive_int,
    unit_float,
    write_error,
)
from minisd.clip import TEXT_ENCODERS
from minisd.images import grid, save_with_settings, to_rgb
from minisd.pipeline import DTYPES, default_dtype, load_pipeline, load_vae
from minisd.schedulers import SAMPLERS
from minisd.table import VARIANTS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--model", default="nota-ai/bk-sdm-small", help="hub id, diffusers folder or single file")
    p.add_argument("--steps", type=positive_int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale; <= 1 turns it off (default 7.5; 1 with --scheduler "
                        "lcm on a U-Net without guidance embedding, e.g. with an LCM-LoRA). An LCM U-Net "
                        "with guidance distilled in takes it as an input and runs no CFG pass")
    p.add_argument("--guidance-rescale", type=unit_float, default=0.0, metavar="PHI",
                   help="scale each guided prediction back towards the conditional one's spread, by PHI in "
                        "[0, 1] (Lin et al. 2023; 0.7 there): against over-exposed colours at high guidance, "
                        "for zero terminal SNR models (default 0, plain CFG)")
    p.add_argument("--negative-prompt", default=None, help="what the image should not show (default: empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-mode", choices=["single", "per_image"], default="single",
                   help="single: one generator for the batch, as diffusers; per_image: image i uses seed+i")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--scheduler", choices=SAMPLERS, default=None,
                   help="sampler (default: the model's, PNDM for SD)")
    p.add_argument("--init-image", type=Path, default=None,
                   help="image-to-image: start from this image (SDEdit)")
    p.add_argument("--strength", type=finite_float, default=0.8,
                   help="image-to-image: how much to change it, in (0, 1]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--family", choices=sorted(TEXT_ENCODERS),
                   help="single-file model: SD family (default: detected)")
    p.add_argument("--variant", choices=sorted(VARIANTS),
                   help="single-file model: U-Net variant (default: detected)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override the model's prediction type")
    p.add_argument("--lora", type=Path, action="append", default=[], metavar="PATH",
                   help="a LoRA to sample with: a .safetensors/.bin file in minisd's, diffusers' or "
                        "kohya/A1111's layout, or a folder with pytorch_lora_weights.safetensors; repeat for "
                        "several")
    p.add_argument("--lora-scale", type=finite_float, action="append", default=[], metavar="S",
                   help="a LoRA's strength: the i-th --lora-scale goes with the i-th --lora (default 1 for "
                        "each LoRA without one); repeat for several")
    p.add_argument("--vae", type=Path, default=None, metavar="PATH",
                   help="decode with this VAE instead of the model's: a diffusers AutoencoderTiny folder "
                        "(TAESD: madebyollin/taesd, downloaded), a folder with TAESD's taesd_encoder and "
                        "taesd_decoder files, or another AutoencoderKL folder")
    p.add_argument("--out", type=Path, default=Path("sample.png"),
                   help="output image, .png (default sample.png), .jpg or .webp")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="fuse the U-Net's q/k/v, use channels_last and torch.compile it (CUDA graphs on "
                        "CUDA); the first run compiles first (a minute or more), which pays off over many "
                        "images")
    args = p.parse_args(argv)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            p.error(f"--{name} must be a positive multiple of 8, not {value}")
    if not 0.0 < args.strength <= 1.0:
        p.error(f"--strength must be in (0, 1], not {args.strength}")
    if len(args.lora_scale) > len(args.lora):
        p.error(f"{len(args.lora_scale)} --lora-scale for {len(args.lora)} --lora: the i-th --lora-scale "
                "goes with the i-th --lora")
    args.lora_scale += [1.0] * (len(args.lora) - len(args.lora_scale))
    return args


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return to_rgb(image)  # a 16-bit or transparent image by its real range, not clipped to white
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise UsageError(f"cannot read init image {path}: {e}") from None


def open_loras(paths: list[Path]) -> list:
    """Read every --lora file (and tell its layout) before the model loads: a bad one costs nothing."""
    files = []
    for path in paths:
        if not path.exists():
            raise UsageError(f"--lora {path}: no such file or folder")
        try:
            files.append(open_lora(path))
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--lora {path}: {e}") from None
    return files


def read_vae(path: Path, device: torch.device, dtype: torch.dtype):
    """Read --vae before the model loads: a bad one costs nothing."""
    if not path.exists():
        raise UsageError(f"--vae {path}: no such folder")
    try:
        return load_vae(path, dtype, device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--vae {path}: {e}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    try:  # every input is checked before the model loads: a bad --out must not cost a generation
        device = check_device(args.device)
        check_image_path(args.out)
        init = read_image(args.init_image) if args.init_image else None
        loras = open_loras(args.lora)
        dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
        vae = read_vae(args.vae, device, dtype) if args.vae else None
        pipe = load_pipeline(args.model, device=device, dtype=dtype, family=args.family,
                             variant=args.variant, prediction_type=args.prediction_type, vae=vae)
        for lora, scale in zip(loras, args.lora_scale):
            pipe.load_lora(lora, scale)
        if args.compile:  # after the LoRAs: fused q/k/v take the updated weights
            pipe.fuse_qkv().channels_last().compile("reduce-overhead" if pipe.device.type == "cuda" else None)
        if args.guidance is None:
            args.guidance = pipe.default_guidance(args.scheduler)
        images = pipe(args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                      num_images=args.num_images, scheduler=args.scheduler, seed_mode=args.seed_mode,
                      init_image=init, strength=args.strength, progress=not args.no_progress,
                      guidance_rescale=args.guidance_rescale)
    except BAD_INPUT as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2

    try:  # a full disk costs a one-line message, not a traceback
        write_images(args, images, args.scheduler or type(pipe.scheduler).__name__)
    except OSError as e:
        print(f"sample.py: error: {write_error(e, args.out)}", file=sys.stderr)
        return 1
    return 0


def write_images(args, images, scheduler: str) -> None:
    """Each image with the settings that made it (PNG text, or EXIF for JPEG and WebP), and a grid of them."""
    paths = [args.out] if len(images) == 1 else [
        args.out.with_name(f"{args.out.stem}-{i:02d}{args.out.suffix}") for i in range(len(images))]
    for i, (image, path) in enumerate(zip(images, paths)):
        seed = args.seed + i if args.seed_mode == "per_image" else args.seed
        settings = dict(prompt=args.prompt[i // args.num_images], negative_prompt=args.negative_prompt or "",
                        seed=seed, seed_mode=args.seed_mode, batch_index=i, steps=args.steps,
                        guidance=args.guidance, guidance_rescale=args.guidance_rescale, scheduler=scheduler,
                        model=args.model,
                        size=f"{image.width}x{image.height}", init_image=args.init_image or "",
                        strength=args.strength if args.init_image else "", vae=args.vae or "",
                        lora=", ".join(f"{p} ({s:g})" for p, s in zip(args.lora, args.lora_scale)))
        save_with_settings(image, path, {key: str(value) for key, value in settings.items()})
        print(path)
    if len(images) > 1:
        sheet = args.out.with_name(f"{args.out.stem}-grid{args.out.suffix}")
        grid(images).save(sheet)
        print(sheet)


if __name__ == "__main__":
    sys.exit(main())
