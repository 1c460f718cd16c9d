"""TAESD, the tiny autoencoder for SD's latent space (Ollin Boer Bohan, github.com/madebyollin/taesd;
diffusers' AutoencoderTiny), written from its taesd.py.

TAESD was distilled to encode images into the latents SD's U-Net works in and to decode them back, with
about 1.2M parameters per half instead of the KL autoencoder's 34M/49M: plain 3x3 convolutions and ReLUs,
no normalisation, no attention. At 512 px its decoder costs 0.14 TFLOP against the KL decoder's 2.51
(python -m minisd.flops --vae tiny), which matters once a few-step sampler makes the U-Net cheap: four
BK-SDM-Tiny LCM steps cost 1.94.

Two facts decide how a pipeline uses it (docs/sampling.md, "A tiny VAE"):
- it works on the U-Net's latents as they are, SD's latents already times 0.18215, so its scaling
  factor is 1 (diffusers' AutoencoderTiny config says scaling_factor 1.0);
- its encoder is deterministic: `encode` gives the latents, not a posterior to sample.
latent_magnitude and latent_shift (3 and 0.5) only map latents to [0, 1] to store them as 8-bit images
(taesd.py's scale_latents); sampling never uses them.

Encoder: the image from [-1, 1] to [0, 1] (TAESD's convention), conv_in, then per level a stride-2 conv
(not at level 0) and residual blocks, conv_out to the latent channels. Decoder: a soft clamp of the
latents to (-3, 3), conv_in and ReLU, then per level residual blocks and, but at the last level, a 2x
nearest upsample and a conv; conv_out to RGB in [0, 1], returned in [-1, 1].

Native parameter names (checkpoint layouts map onto them in minisd/checkpoints/taesd.py):
    encoder.conv_in, encoder.levels.{i}.downsample (i > 0), encoder.levels.{i}.blocks.{j}.conv{1,2,3},
    encoder.conv_out, decoder.conv_in, decoder.levels.{i}.blocks.{j}.conv{1,2,3}, decoder.levels.{i}.conv
    (but the last level), decoder.conv_out
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyVAEConfig:
    """TAESD's shape (taesd.py's Encoder and Decoder; diffusers' AutoencoderTiny defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_channels: int = 64  # one width throughout: every block keeps its input's channels
    decoder_channels: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # residual blocks per level; all but level 0 halve H, W
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # all but the last level double H, W after their blocks
    latent_magnitude: float = 3.0  # 8-bit storage only: latents / (2 * magnitude) + shift in [0, 1]
    latent_shift: float = 0.5
    scaling_factor: float = 1.0  # it decodes the U-Net's latents as they are

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 8 for TAESD."""
        return 2 ** (len(self.encoder_blocks) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "TinyVAEConfig":
        """Read a diffusers AutoencoderTiny config.json; fields it leaves out keep TAESD's values."""
        expected = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
                    "shift_factor": 0.0}
        unsupported = {k: config[k] for k, v in expected.items() if config.get(k, v) not in (v, None)}
        if unsupported:
            raise ValueError(f"unsupported AutoencoderTiny settings (TAESD's only): {unsupported}")
        same = ("in_channels", "out_channels", "latent_channels", "latent_magnitude", "latent_shift",
                "scaling_factor")
        fields = {key: config[key] for key in same if key in config}
        for part in ("encoder", "decoder"):
            widths = config.get(f"{part}_block_out_channels", (64,) * 4)
            blocks = tuple(config.get(f"num_{part}_blocks", getattr(cls, f"{part}_blocks")))
            # diffusers builds each level's first conv from that level's own width, so a model whose widths
            # differ cannot run there either
            if len(set(widths)) != 1 or len(widths) != len(blocks):
                raise ValueError(f"AutoencoderTiny config: {part}_block_out_channels {list(widths)} must be "
                                 f"one width repeated once per level of num_{part}_blocks {list(blocks)}")
            fields[f"{part}_channels"], fields[f"{part}_blocks"] = widths[0], blocks
        config = cls(**fields)
        if len(config.decoder_blocks) != len(config.encoder_blocks):
            raise ValueError("AutoencoderTiny config: the decoder must upsample as often as the encoder "
                             f"downsamples ({len(config.decoder_blocks)} vs {len(config.encoder_blocks)} "
                             "levels)")
        return config

    def to_diffusers(self) -> dict:
        """A config.json that diffusers' AutoencoderTiny.from_pretrained accepts."""
        return {"_class_name": "AutoencoderTiny", "act_fn": "relu", "upsample_fn": "nearest",
                "upsampling_scaling_factor": 2, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "latent_channels": self.latent_channels,
                "encoder_block_out_channels": [self.encoder_channels] * len(self.encoder_blocks),
                "decoder_block_out_channels": [self.decoder_channels] * len(self.decoder_blocks),
                "num_encoder_blocks": list(self.encoder_blocks),
                "num_decoder_blocks": list(self.decoder_blocks),
                "latent_magnitude": self.latent_magnitude, "latent_shift": self.latent_shift,
                "scaling_factor": self.scaling_factor, "shift_factor": 0.0, "force_upcast": False}


TAESD = TinyVAEConfig()  # madebyollin/taesd (SD-v1 and SD-v2 latents): 1,222,532 + 1,222,531 parameters


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)


class TinyBlock(nn.Module):
    """Three 3x3 convs with ReLUs between, plus the input, then a ReLU (taesd.py's Block; its 1x1 skip conv
    exists only where widths change, which never happens in TAESD)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (conv3x3(channels, channels) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))) + x)


class Level(nn.Module):
    """One resolution level: the encoder's downsampling conv (bias-free, stride 2) then blocks, or the
    decoder's blocks then an upsample and a bias-free conv."""

    def __init__(self, channels: int, n_blocks: int, down: bool = False, up: bool = False):
        super().__init__()
        self.downsample = conv3x3(channels, channels, stride=2, bias=False) if down else None
        self.blocks = nn.ModuleList(TinyBlock(channels) for _ in range(n_blocks))
        self.conv = conv3x3(channels, channels, bias=False) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        if self.conv is not None:
            # nearest upsampling is not implemented for bf16 on some backends: through fp32 (blocks.Upsample)
            y = x.float() if x.dtype == torch.bfloat16 else x
            x = self.conv(F.interpolate(y, scale_factor=2.0, mode="nearest").to(x.dtype))
        return x


class TinyEncoder(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        ch = config.encoder_channels
        self.conv_in = conv3x3(config.in_channels, ch)
        self.levels = nn.ModuleList(Level(ch, n, down=i > 0) for i, n in enumerate(config.encoder_blocks))
        self.conv_out = conv3x3(ch, config.latent_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images.add(1).div(2))  # [-1, 1] -> [0, 1], the range TAESD was trained on
        for level in self.levels:
            x = level(x)
        return self.conv_out(x)


class TinyDecoder(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        ch, last = config.decoder_channels, len(config.decoder_blocks) - 1
        self.conv_in = conv3x3(config.latent_channels, ch)
        self.levels = nn.ModuleList(Level(ch, n, up=i < last) for i, n in enumerate(config.decoder_blocks))
        self.conv_out = conv3x3(ch, config.out_channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # a soft clamp to (-3, 3) (taesd.py's Clamp): stray latents from a few-step sampler stay in range
        x = F.relu(self.conv_in(torch.tanh(latents / 3) * 3))
        for level in self.levels:
            x = level(x)
        return self.conv_out(x).mul(2).sub(1)  # [0, 1] -> [-1, 1], as the KL decoder returns images


class AutoencoderTiny(nn.Module):
    """TAESD. Unlike AutoencoderKL, encode gives the latents themselves (no posterior), already on the U-Net's
    scale:

        z = vae.encode(images)                   # U-Net latents (scaling_factor 1)
        images = vae.decode(z)                   # in [-1, 1], not clamped
    """

    def __init__(self, config: TinyVAEConfig = TAESD):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)
