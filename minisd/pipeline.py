"""A Stable Diffusion pipeline: tokenizer, text encoder, U-Net, VAE and scheduler config.

`load_pipeline(source)` reads any of:
- a hub id ("nota-ai/bk-sdm-small"), downloaded into weights/hub/ (minisd/checkpoints/hub.py);
- a local folder in diffusers layout, as the hub repos and train.py write them;
- a single original-layout .safetensors/.ckpt file, SD-v1 or SD-v2, BK-SDM students included.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from minisd.checkpoints import diffusers as diffusers_layout
from minisd.checkpoints import hub, ldm
from minisd.checkpoints.files import WEIGHT_SUFFIXES
from minisd.clip import CLIPTextEncoder
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import AutoencoderKL


@dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextEncoder
    unet: UNet
    vae: AutoencoderKL
    scheduler_config: dict   # diffusers' scheduler_config.json: the noise schedule and prediction type
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def family(self) -> str:
        return "v1" if self.unet.table.context_dim == 768 else "v2"

    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, unet=self.unet, vae=self.vae,
                    scheduler_config=self.scheduler_config)

    def to(self, device=None, dtype=None) -> "Pipeline":
        for model in (self.text_encoder, self.unet, self.vae):
            model.to(device=device, dtype=dtype)
        return self

    def save(self, path: str | Path) -> None:
        """Write the diffusers layout (loadable by diffusers' StableDiffusionPipeline too)."""
        diffusers_layout.save_folder(self.components(), path)

    def save_single_file(self, path: str | Path) -> None:
        """Write one original-layout (LDM) .safetensors or .ckpt file."""
        ldm.save_single_file(self.components(), path)


def load_pipeline(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  family: str | None = None, variant: str | None = None,
                  prediction_type: str | None = None) -> Pipeline:
    """Load every component of a pipeline from a hub id, a diffusers folder or a single file.

    family ("v1"/"v2"), variant ("sd", "base", "small", "tiny") and prediction_type ("epsilon",
    "v_prediction") override what is detected from a single file; folders carry their configs.
    """
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
        parts = diffusers_layout.load_folder(folder, dtype=dtype, device=device, variant="fp16" if half else None)
    else:
        raise FileNotFoundError(f"model source {str(source)!r} is not a file, a folder or a hub id (owner/name)")
    if prediction_type is not None:
        parts["scheduler_config"] = dict(parts["scheduler_config"], prediction_type=prediction_type)
    pipe = Pipeline(**parts, source=str(source))
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        model.eval().requires_grad_(False)
    return pipe
