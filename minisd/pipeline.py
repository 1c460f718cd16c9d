"""A Stable Diffusion pipeline: tokenizer, text encoder, U-Net, VAE and a sampler.

Calling it turns prompts into images as diffusers' StableDiffusionPipeline does, step for step, so
the same weights, settings and seed give the same image: encode the prompt and the negative prompt,
draw the initial latents from a CPU generator, denoise with classifier-free guidance (Ho & Salimans,
2022: eps = eps_uncond + guidance * (eps_cond - eps_uncond)), decode with the VAE. With an init
image it is SDEdit (Meng et al., 2021, arXiv 2108.01073): noise the image's latents part of the way
and denoise from there, as StableDiffusionImg2ImgPipeline does.

`load_pipeline(source)` reads any of:
- a hub id ("nota-ai/bk-sdm-small"), downloaded into weights/hub/ (minisd/checkpoints/hub.py);
- a local folder in diffusers layout, as the hub repos and train.py write them;
- a single original-layout .safetensors/.ckpt file, SD-v1 or SD-v2, BK-SDM students included.

A U-Net distilled with guidance for few-step sampling (an LCM, `--scheduler lcm`) takes the guidance scale
as an input instead, and runs no CFG pass.

`load_pipeline(source, vae=PATH)` swaps in another VAE, such as TAESD, the tiny autoencoder
(minisd/vae_tiny.py), whose decoder costs a small fraction of SD's.

`pipe.load_lora(path, scale)` adds a LoRA file's updates (minisd's, diffusers' or kohya's layout) to the
U-Net's and text encoder's weights, so that sampling with it runs at full speed; several add up.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from minisd.blocks import Attention
from minisd.checkpoints import diffusers as diffusers_layout
from minisd.checkpoints import hub, ldm, taesd
from minisd.checkpoints.files import WEIGHT_SUFFIXES
from minisd.checkpoints.lora_files import LoRAFile, read_lora
from minisd.clip import CLIPTextEncoder, family_of
from minisd.images import to_rgb
from minisd.lora import adaptable_layers, add_low_ranks, layer_weight
from minisd.schedulers import make_sampler
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import AutoencoderKL
from minisd.vae_tiny import AutoencoderTiny

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the command-line names
# diffusers' scheduler class names -> minisd's sampler names (the config says which SD shipped)
SAMPLER_OF_CLASS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                    "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpm",
                    "LCMScheduler": "lcm"}


def sampler_of(scheduler_config: dict) -> str:
    """The sampler a diffusers scheduler config names, a pipeline's default (PNDM, SD's, if it names none)."""
    return SAMPLER_OF_CLASS.get(scheduler_config.get("_class_name"), "pndm")


def own_sampler(folder: str | Path) -> str:
    """The sampler a pipeline folder's scheduler/ names, which sample.py and evaluate.py use for it by default."""
    return sampler_of(json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text()))


def default_dtype(device: str | torch.device, training: bool = False) -> torch.dtype:
    """The precision the scripts run their frozen models in when no --dtype is given.

    fp32 off CUDA (CPUs have no fast half-precision matmuls). On CUDA, fp16 to sample and evaluate,
    as SD's fp16 weight files are meant for (decode falls back to fp32 where the VAE overflows), and
    bf16 to train: the teacher's targets match the student's bf16 autocast and keep fp32's range.
    """
    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if training else torch.float16


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891, sec. 3.4): a large CFG scale inflates the spread of the guided
    prediction, which with zero terminal SNR over-exposes images (colours pushed to saturation). Scale each
    image's guided prediction [N, C, h, w] to the standard deviation of its conditional one, and blend by phi
    (0: plain CFG; the paper uses 0.7), so that the rescaled images do not turn plain."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


@dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextEncoder
    unet: UNet
    vae: AutoencoderKL | AutoencoderTiny
    scheduler_config: dict   # diffusers' scheduler_config.json: the noise schedule and prediction type
    source: str = ""
    scheduler: object = field(init=False, repr=False)  # the default sampler, as the checkpoint's config says
    compiled_unet: object = field(default=None, init=False, repr=False)  # set by compile()
    loras: list = field(default_factory=list, init=False)  # (file, scale) of each LoRA loaded, in order
    # the weights the LoRAs changed, as they were before the first (on the CPU), for unload_loras()
    lora_originals: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.scheduler = make_sampler(sampler_of(self.scheduler_config), self.scheduler_config)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def family(self) -> str:
        return family_of(self.unet.config.context_dim)

    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, unet=self.unet, vae=self.vae,
                    scheduler_config=self.scheduler_config)

    @property
    def vae_scale(self) -> int:
        """How much the VAE downsamples: 8 for SD's and TAESD."""
        return self.vae.config.downscale

    @property
    def native_size(self) -> int:
        """The resolution the U-Net was trained at (512 for SD-v1 and v2-base, 768 for v2)."""
        return self.unet.config.sample_size * self.vae_scale

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the text encoder's hidden states [B, 77, D], which the U-Net attends to."""
        for prompt in prompts:
            cut = self.tokenizer.truncated(prompt)
            if cut:
                log.warning("prompt longer than CLIP's 77 tokens, truncated after %r; dropped: %r",
                            "..." + cut[0][-30:], cut[1])
        # in the U-Net's dtype: the text encoder may run in another (train.py's frozen bf16 teacher)
        return self.text_encoder(self.tokenizer(prompts).to(self.device)).to(self.dtype)

    def default_guidance(self, scheduler: str | None = None) -> float:
        """7.5, SD's CFG scale (for an LCM U-Net with a guidance embedding: w = 6.5); 1, no CFG, when the LCM
        sampler runs a U-Net without that embedding, as an LCM-LoRA is sampled (arXiv 2311.05556)."""
        lcm = scheduler == "lcm" or (scheduler is None
                                     and self.scheduler_config.get("_class_name") == "LCMScheduler")
        return 1.0 if lcm and self.unet.config.guidance_embed_dim is None else 7.5

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], steps: int = 25, guidance: float | None = None,
                 seed: int | torch.Generator = 0, height: int | None = None, width: int | None = None,
                 negative_prompt: str | list[str] | None = None, num_images: int = 1,
                 scheduler: str | None = None, seed_mode: str = "single",
                 init_image: Image.Image | None = None, strength: float = 0.8, progress: bool = True,
                 output: str = "pil", guidance_rescale: float = 0.0):
        """Generate images: a list of PIL images (output="np": a float array [N, H, W, 3] in [0, 1];
        output="latent": the final latents [N, 4, h, w], not decoded).

        guidance: the CFG scale (default_guidance() where None); for an LCM U-Net with a guidance
        embedding, the scale it was distilled to imitate. guidance_rescale: 0 (plain CFG) to 1, how far each
        guided prediction is scaled back to the conditional one's spread (rescale_guidance; diffusers'
        guidance_rescale).

        Images come out prompt by prompt, num_images each. seed_mode "single" draws all initial
        latents from one generator seeded `seed`, as diffusers does; "per_image" gives image i its
        own generator seeded seed+i, so an image does not depend on the batch it ran in. `seed` may
        also be a CPU torch.Generator that goes on from call to call (one generator for a whole run).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, list):
            negatives = negative_prompt
        else:
            negatives = [negative_prompt or ""] * len(prompts)
        height, width = height or self.native_size, width or self.native_size
        guidance = self.default_guidance(scheduler) if guidance is None else guidance
        check_settings(steps, height, width, self.vae_scale, strength, seed_mode,
                       len(negatives) == len(prompts), guidance_rescale)
        sampler = self.scheduler if scheduler is None else make_sampler(scheduler, self.scheduler_config)
        sampler.set_timesteps(steps, device=self.device)

        n = len(prompts) * num_images
        # An LCM U-Net distilled with guidance takes it as an input, w = guidance - 1 (LCM's omega), and runs
        # no CFG pass; any other U-Net gets CFG when guidance > 1, with any sampler (LCM's included), as
        # diffusers' StableDiffusionPipeline and LatentConsistencyModelPipeline both decide it.
        guided_by_w = self.unet.config.guidance_embed_dim is not None
        use_cfg = guidance > 1.0 and not guided_by_w
        if guided_by_w and negative_prompt:
            log.warning("the negative prompt is ignored: this U-Net has guidance distilled in (no CFG pass)")
        w = torch.full((n,), guidance - 1.0, device=self.device) if guided_by_w else None
        # with guidance, the negative prompts and the prompts go through the text encoder in one batch,
        # and the U-Net sees [unconditional; conditional] in one batch, as diffusers concatenates them
        context = self.encode_prompts(negatives + prompts if use_cfg else prompts)
        context = context.repeat_interleave(num_images, dim=0)
        if isinstance(seed, torch.Generator):
            generator = seed
        elif seed_mode == "per_image":
            generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        else:
            generator = torch.Generator("cpu").manual_seed(seed)
        shape = (n, self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)

        start = 0
        if init_image is None:
            latents = randn(shape, generator).to(self.device, self.dtype) * sampler.init_noise_sigma
        else:
            # SDEdit: skip the first (1 - strength) of the steps; noise the image's latents to that level
            start = steps - min(int(steps * strength), steps)
            clean = self.encode_image(init_image, height, width, n, generator)
            latents = sampler.add_noise(clean, randn(shape, generator).to(self.device, self.dtype), start)

        for i in tqdm(range(start, len(sampler.timesteps)), disable=not progress, desc="denoising"):
            x = torch.cat([latents] * 2) if use_cfg else latents
            out = self.predict(sampler.scale_model_input(x, i), sampler.timesteps[i], context, w)
            if use_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance * (out_cond - out_uncond)
                if guidance_rescale > 0:
                    out = rescale_guidance(out, out_cond, guidance_rescale)
            latents = sampler.step(out, i, latents, generator=generator)
        if output == "latent":  # the denoised latents, undecoded
            return latents
        warn_non_finite(latents)
        return to_images(self.decode(latents), output)

    def predict(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                w: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net's output; through the compiled U-Net once compile() was called. w: the guidance weight of
        an LCM U-Net with a guidance embedding."""
        if self.compiled_unet is None:
            return self.unet(x, t, context, w=w)
        # CUDA graphs (compile modes "reduce-overhead", "max-autotune") replay into the same output
        # memory at every call: mark each call as a new step, and keep a copy (PNDM keeps eps history)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled_unet(x, t, context, w=w).clone()

    def compile(self, mode: str | None = None, backend: str = "inductor") -> "Pipeline":
        """torch.compile the U-Net as one graph (fullgraph=True). dynamic=False: each batch size and
        resolution gets its own static kernels rather than one shape-generic graph. mode
        "reduce-overhead" adds CUDA graphs, which pays at small batch where kernel launches dominate.
        The first call at a shape compiles (a minute or more): warm_up() pays for it up front. backend
        "eager" traces the graph without generating code: a quick check that it still traces whole."""
        self.compiled_unet = torch.compile(self.unet, fullgraph=True, dynamic=False, mode=mode,
                                           backend=backend)
        return self

    def warm_up(self, batch: int = 1, height: int | None = None, width: int | None = None,
                guidance: float | None = None, scheduler: str | None = None) -> None:
        """A short run at the shape of the runs to come, so that compilation, CUDA graph capture (the
        2nd and 3rd calls) and cuDNN's first-call setup happen here rather than in them."""
        self([""] * batch, steps=3, guidance=guidance, height=height, width=width, scheduler=scheduler,
             progress=False, output="np")

    def fuse_qkv(self) -> "Pipeline":
        """Fuse the U-Net's self-attention q/k/v projections (UNet.fuse_qkv); saving keeps the standard
        layout."""
        self.unet.fuse_qkv()
        return self

    def load_lora(self, source: str | Path | LoRAFile, scale: float = 1.0) -> "Pipeline":
        """Add a LoRA's updates, times `scale`, to the U-Net's and text encoder's weights (merged, so sampling
        runs at full speed). `source`: a .safetensors/.bin file, a folder holding
        pytorch_lora_weights.safetensors, or an open_lora() result, in minisd's, diffusers' or kohya/A1111's
        layout (detected). Several LoRAs add up, each with its own scale; unload_loras() gives the weights
        back. A LoRA that does not fit the models is refused whole (CheckpointError, naming its keys)."""
        if any(isinstance(m, Attention) and m.to_qkv is not None for m in self.unet.modules()):
            raise ValueError("load LoRAs before fuse_qkv(): a fused self-attention has no to_q/to_k/to_v "
                             "weights of its own to update")
        models = dict(unet=self.unet, text_encoder=self.text_encoder)
        lora = read_lora(source, models)
        for component, updates in lora.items():
            layers = adaptable_layers(models[component])
            for name in updates:
                self.lora_originals.setdefault((component, name),
                                               layer_weight(layers[name]).detach().to("cpu", copy=True))
            add_low_ranks(models[component], updates, scale)
        self.loras.append((source.name if isinstance(source, LoRAFile) else str(source), scale))
        return self

    @torch.no_grad()
    def unload_loras(self) -> "Pipeline":
        """Give back the weights as they were before the first load_lora(), exactly."""
        models = dict(unet=self.unet, text_encoder=self.text_encoder)
        for (component, name), original in self.lora_originals.items():
            layer_weight(models[component].get_submodule(name)).copy_(original)
        self.lora_originals.clear()
        self.loras.clear()
        return self

    def channels_last(self) -> "Pipeline":
        """Keep the U-Net's and VAE's feature maps NHWC (torch.channels_last): the layout of cuDNN's fast
        convolution kernels, and in it the SpatialTransformer's [B, C, H, W] <-> [B, H*W, C] reshapes are
        views."""
        return self.to(memory_format=torch.channels_last)

    def encode_image(self, image: Image.Image, height: int, width: int, n: int, generator) -> torch.Tensor:
        """An init image -> scaled latents [n, 4, h, w], sampled from the VAE's posterior (as diffusers)."""
        image = to_rgb(image)  # 16-bit and transparent images by their real range, not clipped
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)  # diffusers' VaeImageProcessor resamples so
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        x = x.permute(2, 0, 1)[None]  # [H, W, 3] -> [1, 3, H, W]
        x = (2.0 * x - 1.0).to(self.device, self.vae_dtype)
        if isinstance(self.vae, AutoencoderTiny):  # TAESD's encoder is deterministic: no posterior to sample
            latents = self.vae.encode(x).repeat(n, 1, 1, 1)
        elif isinstance(generator, list):  # one posterior sample per image, each from its own generator
            latents = torch.cat([self.vae.encode(x).sample(g) for g in generator])
        else:
            latents = self.vae.encode(x).sample(generator).repeat(n, 1, 1, 1)
        return (latents * self.vae.scaling_factor).to(self.dtype)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]. SD's VAE decoder overflows in fp16 on some images:
        where it does, decode again in fp32 (diffusers instead always upcasts it, `force_upcast`)."""
        latents = latents / self.vae.scaling_factor
        images = self.vae.decode(latents.to(self.vae_dtype))
        if self.vae_dtype == torch.float16 and not torch.isfinite(images).all():
            images = self.vae.float().decode(latents.float())
            self.vae.to(torch.float16)
        return images.float()

    def to(self, device=None, dtype=None, memory_format=None) -> "Pipeline":
        """Move and cast every model; memory_format (e.g. torch.channels_last) applies to 4-d conv weights
        only."""
        for model in (self.text_encoder, self.unet, self.vae):
            model.to(device=device, dtype=dtype, memory_format=memory_format)
        return self

    def save(self, path: str | Path) -> None:
        """Write the diffusers layout (loadable by diffusers' StableDiffusionPipeline too)."""
        diffusers_layout.save_folder(self.components(), path)

    def save_single_file(self, path: str | Path) -> None:
        """Write one original-layout (LDM) .safetensors or .ckpt file."""
        ldm.save_single_file(self.components(), path)


def check_settings(steps: int, height: int, width: int, scale: int, strength: float, seed_mode: str,
                   negatives_match: bool, guidance_rescale: float = 0.0):
    """Refuse bad settings with a message that says what to change."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    if height % scale or width % scale or height < scale or width < scale:
        raise ValueError(f"height and width must be positive multiples of {scale} (the VAE's downsampling), "
                         f"not {height}x{width}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], not {strength}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], not {guidance_rescale}")
    if seed_mode not in ("single", "per_image"):
        raise ValueError(f"seed_mode must be 'single' or 'per_image', not {seed_mode!r}")
    if not negatives_match:
        raise ValueError("give one negative prompt, or one per prompt")


def warn_non_finite(latents: torch.Tensor) -> None:
    """Warn when denoising ended in NaN or infinite latents, which decode to black images. One check after the
    loop (a single host sync), not one per step."""
    finite = torch.isfinite(latents).flatten(1).all(1).tolist()
    if not all(finite):
        bad = [i for i, ok in enumerate(finite) if not ok]
        log.warning("image(s) %s of %d will be black: the latents became NaN or infinite while denoising "
                    "(weights that are not finite, e.g. a diverged checkpoint, or an fp16 overflow: try "
                    "--dtype fp32)",
                    ", ".join(map(str, bad)), len(finite))


def randn(shape: tuple, generator) -> torch.Tensor:
    """Gaussian noise drawn on the CPU in fp32, as diffusers draws initial latents (docs/sampling.md,
    "Same seed, same image"); with a list of generators, one per image."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def to_images(images: torch.Tensor, output: str = "pil"):
    """Images in [-1, 1] [N, 3, H, W] -> PIL images (or a float array in [0, 1]), as diffusers converts."""
    arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output == "np":
        return arr
    return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> AutoencoderKL | AutoencoderTiny:
    """A VAE to sample with in place of a model's own: a diffusers VAE folder, AutoencoderTiny (TAESD, as
    madebyollin/taesd ships it) or AutoencoderKL, a pipeline folder's vae/, or a folder with TAESD's own
    taesd_encoder and taesd_decoder files (.pth or .safetensors)."""
    path = Path(path).expanduser()
    expected = ("expected a diffusers VAE folder (config.json and diffusion_pytorch_model.safetensors, e.g. "
                "madebyollin/taesd downloaded) or TAESD's taesd_encoder and taesd_decoder .pth/.safetensors")
    if not path.is_dir():
        raise FileNotFoundError(f"no VAE folder {path}: {expected}")
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if (path / "config.json").is_file():
        return diffusers_layout.load_any_vae(path, dtype, device)
    if taesd.taesd_files(path) is not None:
        return taesd.load_taesd(path, dtype, device)
    raise FileNotFoundError(f"{path} holds no VAE: {expected}")


def load_pipeline(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  family: str | None = None, variant: str | None = None, prediction_type: str | None = None,
                  vae: str | Path | AutoencoderKL | AutoencoderTiny | None = None) -> Pipeline:
    """Load every component of a pipeline from a hub id, a diffusers folder or a single file.

    family ("v1"/"v2"), variant ("sd", "base", "small", "tiny") and prediction_type ("epsilon",
    "v_prediction") override what is detected from a single file; folders carry their configs.
    vae: a VAE to use instead of the model's own, as a folder (load_vae) or a model; read first, so that a
    bad path fails before the model loads.
    """
    replacement = load_vae(vae, dtype, device) if isinstance(vae, (str, Path)) else vae
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{path} is not a weight file: expected one of {', '.join(WEIGHT_SUFFIXES)}")
        parts = ldm.load_single_file(path, dtype=dtype, device=device, family=family, variant=variant,
                                     prediction_type=prediction_type)
    elif path.is_dir():
        parts = diffusers_layout.load_folder(path, dtype=dtype, device=device)
    elif hub.looks_like_hub_id(str(source)):
        half = dtype in (torch.float16, torch.bfloat16)
        folder = hub.download(str(source), half=half)
        parts = diffusers_layout.load_folder(folder, dtype=dtype, device=device, half=half)
    else:
        raise FileNotFoundError(f"model source {str(source)!r} is not a file, a folder or a hub id "
                                "(owner/name)")
    if prediction_type is not None:
        parts["scheduler_config"] = dict(parts["scheduler_config"], prediction_type=prediction_type)
    if replacement is not None:
        if replacement.config.latent_channels != parts["unet"].config.in_channels:
            channels = (replacement.config.latent_channels, parts["unet"].config.in_channels)
            raise ValueError(f"the VAE {vae} has {channels[0]} latent channels, the U-Net of {source} "
                             f"{channels[1]}: they do not share a latent space")
        parts["vae"] = replacement.to(device=device, dtype=dtype)
    pipe = Pipeline(**parts, source=str(source))
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        model.eval().requires_grad_(False)
    return pipe
