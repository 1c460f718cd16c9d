"""The layers that Stable Diffusion's U-Net (and its VAE) are built from; CLIP's towers share `Attention`.

Follows the LDM code (Rombach et al., 2022, arXiv 2112.10752; CompVis/stable-diffusion,
ldm/modules/diffusionmodules/openaimodel.py and ldm/modules/attention.py). Parameter names
inside each layer match the diffusers checkpoints where those names are clear, so that the
rule tables in minisd/checkpoints stay short.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps [B] -> [B, dim], cos half first.

    SD orders the halves cos, sin (diffusers: `flip_sin_to_cos=True`, `downscale_freq_shift=0`),
    with frequencies exp(-ln(max_period) * i / half) for i in 0..half-1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of LCM guidance weights w [B] -> [B, dim], sin half first.

    The w-conditioning of Latent Consistency Models (Luo et al. 2023, arXiv 2310.04378, sec. 4.2), as
    diffusers' LCM pipelines embed it (after VDM's get_timestep_embedding): w is scaled by 1000 to the
    timesteps' range, frequencies are exp(-ln(10000) * i / (half - 1)) (so the last one is exactly
    1/10000), and the halves are ordered sin, cos, unlike `timestep_embedding`. An odd dim gets a zero.
    """
    half = dim // 2
    # in the reference's order of float32 operations, so that the embeddings agree bit for bit
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step.to(w.device))
    args = (1000.0 * w.float())[:, None] * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> nn.GroupNorm:
    # 32 groups everywhere in SD (diffusers' `norm_num_groups`); tiny test configs use fewer.
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between, plus a skip.

    The VAE uses the same block without a time embedding (temb_dim=None) and with eps 1e-6.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None = None, eps: float = 1e-5,
                 groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_ch, eps, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch) if temb_dim else None
        self.norm2 = group_norm(out_ch, eps, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention over tokens [B, N, C]; self-attention, or cross-attention to `context`.

    upcast: compute in fp32 when the inputs are half precision (SD-v2.1 768 overflows in fp16).
    causal: each token attends only to itself and the tokens before it (CLIP's text tower).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False,
                 upcast: bool = False, causal: bool = False):
        super().__init__()
        self.heads, self.upcast, self.causal, self.cross = heads, upcast, causal, context_dim is not None
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.to_qkv: nn.Linear | None = None  # set by fuse_qkv()

    def fuse_qkv(self) -> None:
        """Self-attention only: q, k and v project the same x, so one Linear [3*dim, dim] computes
        all three in one matmul (one larger kernel instead of three). Checkpoints keep the standard
        layout: state_dict() splits the fused weight back into to_q/to_k/to_v, and loading such a
        state dict fuses it again (the two hooks below)."""
        if self.cross or self.to_qkv is not None:
            return
        parts = (self.to_q, self.to_k, self.to_v)
        w = self.to_q.weight
        self.to_qkv = nn.Linear(w.shape[1], 3 * w.shape[0], bias=self.to_q.bias is not None,
                                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.to_qkv.weight.copy_(torch.cat([p.weight for p in parts]))
            if self.to_qkv.bias is not None:
                self.to_qkv.bias.copy_(torch.cat([p.bias for p in parts]))
        del self.to_q, self.to_k, self.to_v
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # [B, N, heads*head_dim] -> [B, heads, N, head_dim]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if q.device.type == "cpu":
            # PyTorch's CPU attention kernel can run faster on contiguous [B, heads, N, head_dim] than on
            # the transposed views (3-11% on an Intel Xeon, the copies included; even on an AMD EPYC), with
            # the same result to the bit (`python -m minisd.bench layout`, bench/RESULTS.md); CUDA's kernels
            # take the views as they are
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 is_causal=self.causal).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.to_out(out.transpose(1, 2).flatten(2))  # -> [B, N, heads*head_dim]


def fuse_all_qkv(module: nn.Module) -> None:
    """Fuse the q/k/v projections of every self-attention inside `module` (Attention.fuse_qkv): a U-Net, or
    one of its blocks alone."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.fuse_qkv()


def _split_qkv(module: Attention, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook of a fused Attention: to_qkv.{weight,bias} -> to_q, to_k, to_v (the standard keys)."""
    for kind in ("weight", "bias"):
        if (fused := state_dict.pop(f"{prefix}to_qkv.{kind}", None)) is not None:
            for name, part in zip(("to_q", "to_k", "to_v"), fused.chunk(3)):
                state_dict[f"{prefix}{name}.{kind}"] = part


def _fuse_qkv(module: Attention, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict hook of a fused Attention: standard to_q, to_k, to_v keys -> to_qkv."""
    for kind in ("weight", "bias"):
        names = [f"{prefix}{name}.{kind}" for name in ("to_q", "to_k", "to_v")]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}to_qkv.{kind}"] = torch.cat([state_dict.pop(n) for n in names])


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer, 2020): Linear to 2 x 4C, gate one half by GELU of the other."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, dim * mult * 2)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer block(s) -> feature map, plus a residual.

    linear_proj: SD-v2 projects in and out with Linear layers after flattening; SD-v1 uses 1x1
    convs before flattening. The two are the same map, applied on either side of the reshape.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1,
                 linear_proj: bool = False, upcast: bool = False, groups: int = 32):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = group_norm(channels, 1e-6, groups)
        proj = ((lambda: nn.Linear(channels, channels)) if linear_proj
                else (lambda: nn.Conv2d(channels, channels, 1)))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, upcast)
                                                for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_proj: bool = False):
        """return_proj: also return proj_out's output (before the residual), a BK-SDM KD feature."""
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        if self.linear_proj:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_proj:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)  # [B, H*W, C] -> [B, C, H, W]
        if not self.linear_proj:
            y = self.proj_out(y)
        return (x + y, y) if return_proj else x + y


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv.

    asymmetric: the VAE pads (left 0, right 1, top 0, bottom 1) instead of 1 on every side,
    as the original taming-transformers code does; the U-Net pads symmetrically.
    """

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """size: the output size, for odd inputs (the U-Net passes its skip's size); default 2x."""
        # nearest upsampling is not implemented for bf16 on some backends: go through fp32
        dtype = x.dtype
        y = x.float() if dtype == torch.bfloat16 else x
        y = F.interpolate(y, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(y.to(dtype))
