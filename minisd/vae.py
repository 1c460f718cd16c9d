"""The KL autoencoder (AutoencoderKL) that maps images to SD's latent space and back.

Rombach et al., 2022 (arXiv 2112.10752), Sec. 3.1 "Perceptual Image Compression": a
convolutional encoder turns a 3 x H x W image in [-1, 1] into a diagonal Gaussian over
4 x H/8 x W/8 latents (KL-regularised towards N(0, I)), and a decoder maps latents back.
Follows CompVis/stable-diffusion: ldm/modules/diffusionmodules/model.py (Encoder, Decoder,
ResnetBlock, AttnBlock), ldm/models/autoencoder.py (AutoencoderKL) and
ldm/modules/distributions/distributions.py (DiagonalGaussianDistribution).

Native parameter names (checkpoint layouts map onto them in minisd/checkpoints):
    encoder.conv_in
    encoder.down.{i}.res.{j}         ResBlocks of level i (resolution H / 2^i)
    encoder.down.{i}.downsample      all levels but the last
    encoder.mid.{res1,attn,res2}
    encoder.norm_out, encoder.conv_out
    quant_conv, post_quant_conv
    decoder.conv_in, decoder.mid.{res1,attn,res2}
    decoder.up.{i}.res.{j}           in execution order: up.0 runs first, at the lowest resolution
    decoder.up.{i}.upsample          all levels but the last
    decoder.norm_out, decoder.conv_out
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisd.blocks import Attention, Downsample, ResBlock, Upsample

EPS = 1e-6  # every GroupNorm in the VAE (LDM's Normalize(): eps=1e-6), unlike the U-Net's 1e-5


@dataclass(frozen=True)
class VAEConfig:
    """The VAE's shape. The defaults are SD's: v1-inference.yaml, first_stage_config.ddconfig
    (ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 4, double_z)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # one per level; all but the last halve H, W
    layers_per_block: int = 2  # ResBlocks per encoder level; the decoder has one more per level
    norm_groups: int = 32
    # Latents are multiplied by this before the U-Net sees them, to give them roughly unit variance:
    # `scale_factor: 0.18215` in SD's configs/stable-diffusion/v1-inference.yaml (and the v2 ones).
    # LDM can instead set it to 1 / std of the first training batch's latents (`scale_by_std` in
    # ldm/models/diffusion/ddpm.py); SD fixes the number.
    scaling_factor: float = 0.18215
    sample_size: int = 512  # training resolution (768 for SD-v2 768); diffusers reads it only to tile

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 8 for SD's (each level but the last halves the size)."""
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        """Read a diffusers AutoencoderKL config.json; fields it leaves out keep SD's values.

        Older hub configs have no `scaling_factor`; diffusers' default for it is 0.18215 too.
        """
        n = len(config.get("block_out_channels", cls.block_channels))
        expected = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
                    "latents_std": None, "down_block_types": ["DownEncoderBlock2D"] * n,
                    "up_block_types": ["UpDecoderBlock2D"] * n}
        got = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}  # JSON lists vs tuples
        unsupported = {k: got[k] for k, v in expected.items() if k in got and got[k] != v}
        if unsupported:
            raise ValueError(f"unsupported AutoencoderKL settings (this is SD's VAE only): {unsupported}")
        names = {"in_channels": "in_channels", "out_channels": "out_channels",
                 "latent_channels": "latent_channels", "block_out_channels": "block_channels",
                 "layers_per_block": "layers_per_block", "norm_num_groups": "norm_groups",
                 "scaling_factor": "scaling_factor", "sample_size": "sample_size"}
        fields = {ours: config[theirs] for theirs, ours in names.items() if theirs in config}
        if "block_channels" in fields:
            fields["block_channels"] = tuple(fields["block_channels"])
        return cls(**fields)

    def to_diffusers(self) -> dict:
        """A config.json that diffusers' AutoencoderKL.from_pretrained accepts."""
        n = len(self.block_channels)
        return {"_class_name": "AutoencoderKL", "act_fn": "silu",
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "latent_channels": self.latent_channels, "block_out_channels": list(self.block_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "layers_per_block": self.layers_per_block, "norm_num_groups": self.norm_groups,
                "scaling_factor": self.scaling_factor, "sample_size": self.sample_size}


SD_VAE = VAEConfig()  # SD-v1 and SD-v2 (sample_size 768 for the 768 models): 83,653,863 parameters


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, std^2), per latent element (LDM distributions.py)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, 2*latent, h, w] -> 2 x [B, latent, h, w]
        # LDM clamps so that exp() stays finite in fp32 (and std never underflows to exactly 0)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draw on the generator's device and then move, as diffusers' randn_tensor does, so that a
        # CPU generator gives the same latents on any device.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over latent elements: [B]."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class SpatialSelfAttention(Attention):
    """GroupNorm, single-head self-attention over the H*W positions, plus a residual (LDM AttnBlock).

    LDM computes q, k, v and the output with 1x1 convs; on a flattened map these are the Linear
    layers of `Attention`, with biases.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, qkv_bias=True)
        self.norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        y = super().forward(y)
        return x + y.transpose(1, 2).reshape(b, c, h, w)  # [B, H*W, C] -> [B, C, H, W]


class MidBlock(nn.Module):
    """At the lowest resolution: ResBlock, self-attention, ResBlock."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, eps=EPS, groups=groups)
        self.attn = SpatialSelfAttention(channels, groups)
        self.res2 = ResBlock(channels, channels, eps=EPS, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """One resolution level: ResBlocks, then (except at the last level) a down- or upsampler."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, groups: int, down: bool = False,
                 up: bool = False):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(in_ch if j == 0 else out_ch, out_ch, eps=EPS, groups=groups)
                                 for j in range(n_res))
        # The VAE pads (0, 1, 0, 1) before its stride-2 conv, as taming-transformers did.
        self.downsample = Downsample(out_ch, asymmetric=True) if down else None
        self.upsample = Upsample(out_ch) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> Gaussian moments (mean and log-variance) [B, 2*latent, H/8, W/8] (4 levels)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, last = config.block_channels, len(config.block_channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        # Each level starts from the previous level's channels (level 0 from conv_in's).
        self.down = nn.ModuleList(Level(ch[max(i - 1, 0)], ch[i], config.layers_per_block, config.norm_groups,
                                        down=i < last) for i in range(len(ch)))
        self.mid = MidBlock(ch[-1], config.norm_groups)
        self.norm_out = nn.GroupNorm(config.norm_groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latents [B, latent, h, w] -> image [B, 3, 8h, 8w]; the encoder's levels in reverse."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, last = config.block_channels[::-1], len(config.block_channels) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid = MidBlock(ch[0], config.norm_groups)
        # One more ResBlock per level than the encoder has (LDM: num_res_blocks + 1).
        self.up = nn.ModuleList(Level(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1,
                                      config.norm_groups, up=i < last) for i in range(len(ch)))
        self.norm_out = nn.GroupNorm(config.norm_groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(x))
        for level in self.up:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """SD's VAE. `encode` gives the posterior, `decode` the image; scaling is left to the caller:

        z = vae.encode(images).sample() * vae.scaling_factor        # U-Net latents
        images = vae.decode(z / vae.scaling_factor)                 # in [-1, 1], not clamped
    """

    def __init__(self, config: VAEConfig = SD_VAE):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def encoding_modules(self) -> dict[str, nn.Module]:
        """The modules `encode` runs, by attribute name: they alone decide the latents a U-Net learns."""
        return {"encoder": self.encoder, "quant_conv": self.quant_conv}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))
