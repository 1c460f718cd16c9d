"""Text to image with onnxruntime, from a folder that `python -m minisd.export` wrote: no PyTorch.

    python -m minisd.onnx_runner weights/toy-onnx "a red circle above a blue square" --out circle.png
    python -m minisd.onnx_runner weights/bk-tiny-onnx "a black vase" --scheduler dpm --steps 20 --seed 7
    python -m minisd.onnx_runner weights/lcm-onnx "a black vase" --scheduler lcm --steps 4
    python -m minisd.onnx_runner weights/toy-onnx "a red circle" --init-image in.png --strength 0.6

The whole inference path in one file, as an app would embed it; minisd/pipeline.py does the same in PyTorch,
and for the same prompt, seed, sampler and steps the two give the same image (within 2/255,
tests/test_onnx_runner.py). It needs numpy, tokenizers, onnxruntime and Pillow, and of minisd only
modules that import no torch: tokenizer.py, numpy_samplers.py and images.py.

1. prompt -> token ids: CLIP's BPE, from the folder's tokenizer/ (minisd/tokenizer.py);
2. token ids -> text states (text_encoder.onnx); with classifier-free guidance (Ho & Salimans 2022) the
   negative prompts go through in the same batch, first;
3. initial latents: Gaussian noise drawn from the seed as torch draws it on the CPU, as minisd and diffusers
   draw theirs (numpy_samplers.TorchCPURandom);
4. the sampler loop (numpy_samplers: PNDM, DDIM, DPM-Solver++(2M), LCM) around unet.onnx, with CFG:
   eps = eps_uncond + guidance (eps_cond - eps_uncond), optionally rescaled towards eps_cond's spread
   (guidance_rescale, as pipeline.rescale_guidance); an LCM U-Net with a guidance embedding takes
   w = guidance - 1 as an input instead and runs one pass per step;
5. latents -> images (vae_decoder.onnx, which divides by the VAE's scaling factor itself) -> PNG.
With an init image, img2img (SDEdit): vae_encoder.onnx gives the image's latents, noised to the level
of the first step that runs, as pipeline.py does.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from minisd.images import IMAGE_SUFFIXES, save_with_settings, to_rgb
from minisd.numpy_samplers import SAMPLERS, TorchCPURandom, make_sampler
from minisd.tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)
PROG = "python -m minisd.onnx_runner"  # what its errors start with, argparse's and its own
MANIFEST = "manifest.json"  # written last by the exporter: a folder with it holds a whole export
INSTALL = "pip install -r requirements-export.txt (or pip install -e \".[export]\")"
# onnxruntime's names for the element types the graphs take
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def import_onnxruntime():
    """onnxruntime, an optional dependency: a missing one is a one-line error that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(f"onnxruntime is not installed (the ONNX runner needs it): {INSTALL}") from None
    return onnxruntime


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no ONNX export (no {MANIFEST}): write one with "
                                "python -m minisd.export MODEL OUT_DIR")
    return json.loads(path.read_text(encoding="utf-8"))


class OnnxPipeline:
    """An exported folder, loaded into onnxruntime sessions; called like minisd's Pipeline."""

    def __init__(self, folder: str | Path, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.tokenizer = CLIPTokenizer.from_folder(self.folder / "tokenizer")
        self.scheduler_config = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text())
        ort = import_onnxruntime()
        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        self.providers = list(providers)
        self.sessions = {}  # opened on first use: an app that never runs img2img never loads the encoder

    def session(self, name: str):
        if name not in self.sessions:
            ort = import_onnxruntime()
            path = self.folder / self.manifest["files"][name]
            self.sessions[name] = ort.InferenceSession(str(path), self.options, providers=self.providers)
        return self.sessions[name]

    def run(self, name: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """One graph on numpy inputs, each cast to the type the graph takes (fp16 graphs take fp16 latents);
        the outputs by name, in float32."""
        session = self.session(name)
        typed = {i.name: feeds[i.name].astype(NUMPY_TYPES[i.type]) for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        return {n: out.astype(np.float32) for n, out in zip(names, session.run(names, typed))}

    @property
    def guided_by_w(self) -> bool:
        """An LCM U-Net with a guidance embedding: it takes the guidance weight as an input (no CFG pass)."""
        return "w" in [i.name for i in self.session("unet").get_inputs()]

    def default_guidance(self, scheduler: str) -> float:
        """7.5, SD's CFG scale; 1 (no CFG) when LCM samples a U-Net without guidance embedding, as
        pipeline.py."""
        return 1.0 if scheduler == "lcm" and not self.guided_by_w else 7.5

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> text states [B, 77, D]."""
        for prompt in prompts:
            cut = self.tokenizer.truncated(prompt)
            if cut:
                log.warning("prompt longer than CLIP's 77 tokens, truncated after %r; dropped: %r",
                            "..." + cut[0][-30:], cut[1])
        ids = np.array(self.tokenizer.padded_ids(prompts), dtype=np.int64)
        return self.run("text_encoder", ids=ids)["context"]

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The image size to make: the export's own if it has one (static), else the model's native size."""
        m, scale = self.manifest, self.manifest["vae_scale"]
        if m["height"] is not None:
            if (height or m["height"], width or m["width"]) != (m["height"], m["width"]):
                raise ValueError(f"this export takes {m['height']}x{m['width']} images only, not "
                                 f"{height or m['height']}x{width or m['width']}: export again without "
                                 "--height/--width for any size")
            return m["height"], m["width"]
        height, width = height or m["native_size"], width or m["native_size"]
        if height % scale or width % scale or height < scale or width < scale:
            raise ValueError(f"height and width must be positive multiples of {scale} (the VAE's "
                             f"downsampling), not {height}x{width}")
        return height, width

    def encode_image(self, image: Image.Image, height: int, width: int, n: int,
                     random: TorchCPURandom) -> np.ndarray:
        """An init image -> U-Net latents [n, 4, h, w]: a sample of the KL VAE's posterior (one draw from the
        seed's noise), or TAESD's latents themselves."""
        image = to_rgb(image)
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        x = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]  # -> [1, 3, H, W]
        out = self.run("vae_encoder", images=2.0 * x - 1.0)
        if "latents" in out:  # TAESD: deterministic
            latents = out["latents"]
        else:
            latents = out["latent_mean"] + out["latent_std"] * random.randn(out["latent_mean"].shape)
        return np.repeat(latents, n, axis=0)

    def __call__(self, prompt: str | list[str], steps: int = 25, guidance: float | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None,
                 negative_prompt: str | list[str] | None = None, num_images: int = 1,
                 scheduler: str | None = None, init_image: Image.Image | None = None, strength: float = 0.8,
                 output: str = "pil", guidance_rescale: float = 0.0):
        """Images for the prompts, num_images each: PIL images, or (output="np") floats [N, H, W, 3] in
        [0, 1]. All initial latents come from one generator seeded `seed`, as minisd's seed_mode "single".
        guidance_rescale: 0 (plain CFG) to 1, as Pipeline.__call__'s."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = (negative_prompt if isinstance(negative_prompt, list)
                     else [negative_prompt or ""] * len(prompts))
        if len(negatives) != len(prompts):
            raise ValueError("give one negative prompt, or one per prompt")
        if steps < 1 or not 0.0 < strength <= 1.0:
            raise ValueError(f"steps must be at least 1 and strength in (0, 1], not {steps} and {strength}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], not {guidance_rescale}")
        height, width = self.size(height, width)
        scheduler = scheduler or self.manifest["sampler"]
        if scheduler not in SAMPLERS:
            raise ValueError(f"the model's sampler {scheduler!r} is not ported to the ONNX runner: choose "
                             f"one of {', '.join(SAMPLERS)}")
        guidance = self.default_guidance(scheduler) if guidance is None else guidance
        sampler = make_sampler(scheduler, self.scheduler_config)
        sampler.set_timesteps(steps)

        n = len(prompts) * num_images
        use_cfg = guidance > 1.0 and not self.guided_by_w
        context = self.encode_prompts(negatives + prompts if use_cfg else prompts)
        context = np.repeat(context, num_images, axis=0)
        random = TorchCPURandom(seed)
        scale = self.manifest["vae_scale"]
        shape = (n, self.manifest["latent_channels"], height // scale, width // scale)
        start = 0
        if init_image is None:
            latents = random.randn(shape)
        else:  # SDEdit: skip the first (1 - strength) of the steps; noise the image's latents to that level
            start = steps - min(int(steps * strength), steps)
            clean = self.encode_image(init_image, height, width, n, random)
            latents = sampler.add_noise(clean, random.randn(shape), start)

        for i in range(start, len(sampler.timesteps)):
            x = np.concatenate([latents] * 2) if use_cfg else latents
            feeds = dict(latents=x, timestep=np.full(len(x), sampler.timesteps[i], dtype=np.float32),
                         context=context, w=np.full(len(x), guidance - 1.0, dtype=np.float32))
            out = self.run("unet", **feeds)["model_output"]  # w is fed only to a U-Net that takes it
            if use_cfg:
                out_uncond, out_cond = np.split(out, 2)
                out = out_uncond + guidance * (out_cond - out_uncond)
                if guidance_rescale > 0:
                    out = rescale_guidance(out, out_cond, guidance_rescale)
            latents = sampler.step(out, i, latents, random)
        images = self.run("vae_decoder", latents=latents)["images"]
        return to_images(images, output)


def rescale_guidance(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """pipeline.rescale_guidance in numpy (Lin et al. 2023, sec. 3.4): each image's guided prediction
    [N, C, h, w] scaled to the spread of its conditional one, blended with it by phi."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True))
    return phi * rescaled + (1 - phi) * guided


def to_images(images: np.ndarray, output: str = "pil"):
    """Images in [-1, 1] [N, 3, H, W] -> PIL images (or floats in [0, 1]), as pipeline.to_images."""
    arr = (images / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
    if output == "np":
        return arr
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder written by python -m minisd.export")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 turns it off (default as sample.py)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="rescale each guided prediction towards the conditional one's spread, by PHI in [0, 1] "
                        "(default 0, plain CFG; as sample.py's)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None,
                   help="pixels (default: the export's size, or the model's native size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--scheduler", choices=SAMPLERS, default=None, help="sampler (default: the model's)")
    p.add_argument("--init-image", type=Path, default=None, help="image-to-image: start from this image")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image: how much to change it")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime's intra-op threads (default: all)")
    p.add_argument("--out", type=Path, default=Path("sample.png"), help="output image (default sample.png)")
    args = p.parse_args(argv)
    for name in ("steps", "num_images", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a whole number >= 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, not {args.guidance}")
    if not 0 <= args.guidance_rescale <= 1:  # also refuses nan
        p.error(f"--guidance-rescale must be in [0, 1], not {args.guidance_rescale}")
    if not 0 < args.strength <= 1:  # also refuses nan
        p.error(f"--strength must be in (0, 1], not {args.strength}")
    if args.out.suffix.lower() not in IMAGE_SUFFIXES:
        p.error(f"--out {args.out}: use one of {', '.join(IMAGE_SUFFIXES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    try:
        init = None
        if args.init_image:
            try:
                with Image.open(args.init_image) as image:
                    init = to_rgb(image)
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read init image {args.init_image}: {e}") from None
        pipe = OnnxPipeline(args.folder, threads=args.threads)
        scheduler = args.scheduler or pipe.manifest["sampler"]
        guidance = pipe.default_guidance(scheduler) if args.guidance is None else args.guidance
        images = pipe(args.prompt, steps=args.steps, guidance=guidance, seed=args.seed, height=args.height,
                      width=args.width, negative_prompt=args.negative_prompt, num_images=args.num_images,
                      scheduler=scheduler, init_image=init, strength=args.strength,
                      guidance_rescale=args.guidance_rescale)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    paths = [args.out] if len(images) == 1 else [
        args.out.with_name(f"{args.out.stem}-{i:02d}{args.out.suffix}") for i in range(len(images))]
    for i, (image, path) in enumerate(zip(images, paths)):
        settings = dict(prompt=args.prompt[i // args.num_images], negative_prompt=args.negative_prompt or "",
                        seed=args.seed, steps=args.steps, guidance=guidance,
                        guidance_rescale=args.guidance_rescale, scheduler=scheduler,
                        model=str(args.folder), runner="onnxruntime")
        save_with_settings(image, path, {key: str(value) for key, value in settings.items()})
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
