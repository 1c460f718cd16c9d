"""The SD U-Net (LDM's `UNetModel`), built from a stage/block table (minisd/table.py).

One loop over the table builds every stage; the same loop runs the forward pass. The down path
hands every block's output (and conv_in's, and each downsampler's) to the up path, which
concatenates them back in reverse order as skip connections. Counting those hand-overs is all
it takes to know each up block's input width, so any BK-SDM removal builds without special cases.

Native parameter names follow the table: `down.{stage}.blocks.{block}.res|attn`,
`down.{stage}.downsample`, `mid.res1|attn|res2`, `up.{stage}.blocks.{block}.res|attn`,
`up.{stage}.upsample`. `up.{stage}` is indexed by stage like `down`, so up.0 runs last. An LCM U-Net
distilled with guidance (table.guidance_embed_dim) also has `guidance_proj`, which adds the guidance weight's
embedding to the timestep features (UNet(..., w=)).
`unet_part` reads a stage off those names; the parameter counts here and the MAC counts of
minisd/flops.py both group by it.

`python -m minisd.unet [--family v1|v2|v2-768] [--variant sd|base|small|tiny|all]` prints the
stage/block table of SD and its BK-SDM students with the parameters of each stage.
"""

import argparse
import dataclasses
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minisd.blocks import (Downsample, ResBlock, SpatialTransformer, Upsample, fuse_all_qkv, group_norm,
                           guidance_embedding, timestep_embedding)
from minisd.table import LCM_GUIDANCE_EMBED_DIM, TEACHERS, VARIANTS, Stage, UNetTable, variant


class Block(nn.Module):
    """A ResBlock, then a SpatialTransformer where the stage has attention."""

    def __init__(self, in_ch: int, stage: Stage, table: UNetTable):
        super().__init__()
        self.res = ResBlock(in_ch, stage.channels, table.temb_dim, groups=table.groups)
        self.attn = (SpatialTransformer(stage.channels, stage.heads, table.context_dim, table.depth,
                                        table.linear_proj, table.upcast_attention, table.groups)
                     if stage.attention else None)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, return_proj: bool = False):
        x = self.res(x, temb)
        if self.attn is None:
            return x
        return self.attn(x, context, return_proj)


class DownStage(nn.Module):
    def __init__(self, blocks: list[Block], downsample: Downsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class UpStage(nn.Module):
    def __init__(self, blocks: list[Block], upsample: Upsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = upsample


class MidBlock(nn.Module):
    def __init__(self, table: UNetTable):
        super().__init__()
        ch, t = table.stages[-1].channels, table
        self.res1 = ResBlock(ch, ch, t.temb_dim, groups=t.groups)
        self.attn = SpatialTransformer(ch, t.mid_heads, t.context_dim, t.depth, t.linear_proj,
                                       t.upcast_attention, t.groups)
        self.res2 = ResBlock(ch, ch, t.temb_dim, groups=t.groups)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, temb), context), temb)


class UNet(nn.Module):
    def __init__(self, table: UNetTable):
        super().__init__()
        self.config = table  # every model keeps its configuration in .config; a U-Net's is its table
        n, ch = len(table.stages), table.stages[0].channels
        self.conv_in = nn.Conv2d(table.in_channels, ch, 3, padding=1)
        self.time_embed = nn.Sequential(nn.Linear(ch, table.temb_dim), nn.SiLU(),
                                        nn.Linear(table.temb_dim, table.temb_dim))
        # LCM's w-conditioning: the guidance weight's embedding, projected to the width of the timestep
        # features and added to them before time_embed (diffusers' TimestepEmbedding.cond_proj)
        self.guidance_proj = (nn.Linear(table.guidance_embed_dim, ch, bias=False)
                              if table.guidance_embed_dim else None)

        skips = [ch]  # channels of each tensor the down path hands to the up path, in order
        down = []
        for s, stage in enumerate(table.stages):
            blocks = []
            for _ in stage.down:
                blocks.append(Block(ch, stage, table))
                ch = stage.channels
                skips.append(ch)
            downsample = Downsample(ch) if s < n - 1 else None
            if downsample:
                skips.append(ch)
            down.append(DownStage(blocks, downsample))
        self.down = nn.ModuleList(down)
        self.mid = MidBlock(table) if table.mid else None

        up = []
        for s in reversed(range(n)):
            stage = table.stages[s]
            blocks = []
            for _ in stage.up:
                blocks.append(Block(ch + skips.pop(), stage, table))
                ch = stage.channels
            up.append(UpStage(blocks, Upsample(ch) if s > 0 else None))
        if skips:
            raise ValueError(f"table {table.name}: the up path takes {sum(len(s.up) for s in table.stages)} "
                             f"skip connections but the down path gives "
                             f"{sum(len(s.down) for s in table.stages) + n}; "
                             "each stage needs one more up block than down blocks (the downsampler's output)")
        self.up = nn.ModuleList(reversed(up))  # stored by stage index, like self.down
        self.norm_out = group_norm(ch, 1e-5, table.groups)
        self.conv_out = nn.Conv2d(ch, table.out_channels, 3, padding=1)
        # Recompute each block's activations in the backward pass instead of storing them (less
        # memory, about a third more compute); used in training only.
        self.gradient_checkpointing = False

    def fuse_qkv(self) -> "UNet":
        """Fuse every self-attention's q/k/v projections into one Linear (blocks.Attention.fuse_qkv):
        the same outputs, fewer kernels; state_dict() and saved checkpoints keep the standard keys."""
        fuse_all_qkv(self)
        return self

    def run(self, block: nn.Module, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                taps: Collection[str] | None = None, w: torch.Tensor | float | None = None):
        """x: latents [B, 4, h, w]; t: timesteps (scalar or [B]); context: text states [B, 77, D].

        w: the guidance weight an LCM U-Net with a guidance embedding (table.guidance_embed_dim) is
        conditioned on (scalar or [B]): LCM's omega, which is the CFG scale minus 1 (eps_uncond + (1 + w)
        (eps_cond - eps_uncond), arXiv 2310.04378 eq. 9). None adds nothing, as diffusers does without
        `timestep_cond`; a U-Net without the embedding refuses a w.

        taps: intermediate outputs to return as well, as `(output, {name: tensor})` (given taps, even
        none, the result is that pair; without, the output alone), for feature
        distillation (minisd/distill.py): "down.{s}" and "up.{s}", a stage's output after its
        down/upsampler (diffusers' `down_blocks.i` / `up_blocks.i` outputs), and
        "down.{s}.blocks.{b}.attn.proj_out", a SpatialTransformer's projection before its residual.
        Returned rather than hooked, so they survive DDP, torch.compile and activation checkpointing.
        """
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        h = timestep_embedding(t, self.config.stages[0].channels).to(x.dtype)
        if w is not None:
            if self.guidance_proj is None:
                raise ValueError(f"U-Net {self.config.name} has no guidance embedding (guidance_embed_dim): "
                                 "it takes no w; guide it with CFG instead")
            w = torch.as_tensor(w, device=x.device)
            w = w.expand(x.shape[0]) if w.numel() == 1 else w.reshape(-1)
            h = h + self.guidance_proj(guidance_embedding(w, self.config.guidance_embed_dim).to(x.dtype))
        temb = self.time_embed(h)
        feats, wanted = {}, taps or ()

        x = self.conv_in(x)
        skips = [x]
        for s, stage in enumerate(self.down):
            for b, block in enumerate(stage.blocks):
                proj = f"down.{s}.blocks.{b}.attn.proj_out"
                if proj in wanted:
                    x, feats[proj] = self.run(block, x, temb, context, return_proj=True)
                else:
                    x = self.run(block, x, temb, context)
                skips.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
                skips.append(x)
            feats[f"down.{s}"] = x
        if self.mid is not None:
            x = self.run(self.mid, x, temb, context)
        for s in reversed(range(len(self.up))):
            stage = self.up[s]
            for block in stage.blocks:
                x = self.run(block, torch.cat([x, skips.pop()], dim=1), temb, context)
            if stage.upsample is not None:
                # upsample to the size of the skip it meets next, so odd latent sizes work too
                x = stage.upsample(x, size=skips[-1].shape[-2:])
            feats[f"up.{s}"] = x
        out = self.conv_out(F.silu(self.norm_out(x)))
        return (out, {name: feats[name] for name in taps}) if taps is not None else out


def with_guidance_embedding(unet: UNet, dim: int = LCM_GUIDANCE_EMBED_DIM) -> UNet:
    """A copy of `unet` that takes LCM's guidance weight (UNet(..., w=)): its table with
    guidance_embed_dim=dim, every weight copied, and a new guidance_proj with nn.Linear's default init, as
    diffusers' latent consistency distillation script starts it (a U-Net built with time_cond_proj_dim, the
    teacher's weights loaded non-strictly). The start of a full latent consistency distillation."""
    if unet.config.guidance_embed_dim:
        raise ValueError(f"U-Net {unet.config.name} has a guidance embedding already")
    table = dataclasses.replace(unet.config, name=unet.config.name + "-lcm", guidance_embed_dim=dim)
    weight = next(unet.parameters())
    out = UNet(table).to(weight.device, weight.dtype)
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False)
    if missing != ["guidance_proj.weight"] or unexpected:
        raise ValueError(f"cannot copy {unet.config.name} into an LCM U-Net: missing {missing}, unexpected "
                         f"{unexpected}")
    return out


def unet_part(name: str) -> str:
    """The part of the U-Net a native parameter or module name belongs to: `stage s` (its down and up
    blocks and resamplers), `mid`, or `stem` (time embedding, conv_in, norm_out, conv_out)."""
    part, _, rest = name.partition(".")
    if part in ("down", "up"):
        return f"stage {rest.split('.')[0]}"
    return "mid" if part == "mid" else "stem"


def count_params(table: UNetTable) -> dict[str, int]:
    """Parameters per part (`stem`, `stage s`, `mid`) and in `total`, from the table alone."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        unet = UNet(table)
    counts = {"stem": 0, "mid": 0, **{f"stage {s}": 0 for s in range(len(table.stages))}}
    for name, p in unet.named_parameters():
        counts[unet_part(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def describe(table: UNetTable, teacher: UNetTable | None = None) -> str:
    """A printable table: per stage, the teacher's blocks kept (+) and removed (-), and params."""
    teacher = teacher or table
    counts = count_params(table)
    lines = [f"{table.name}: context {table.context_dim}, "
             f"{'linear' if table.linear_proj else 'conv'} proj, "
             f"{'mid block' if table.mid else 'no mid block'}",
             f"{'stage':>5} {'ch':>5} {'attn':>4} {'heads':>5}  {'down blocks':<12} {'up blocks':<12} "
             f"{'params':>13}"]

    def marks(kept, n):
        return " ".join(("+" if i in kept else "-") + str(i) for i in range(n))

    for s, t_stage in enumerate(teacher.stages):
        if s < len(table.stages):
            st = table.stages[s]
            lines.append(f"{s:>5} {st.channels:>5} {'yes' if st.attention else 'no':>4} {st.heads:>5}  "
                         f"{marks(st.down, teacher.teacher_down):<12} {marks(st.up, teacher.teacher_up):<12} "
                         f"{counts[f'stage {s}']:>13,}")
        else:
            lines.append(f"{s:>5} {t_stage.channels:>5} {'':>4} {'':>5}  {'(stage removed)':<25} {0:>13,}")
    lines.append(f"{'mid':>5} {'':>5} {'':>4} {'':>5}  {'kept' if table.mid else 'removed':<25} "
                 f"{counts['mid']:>13,}")
    lines.append(f"{'stem':>5} {'':>5} {'':>4} {'':>5}  {'time embed, conv in/out':<25} "
                 f"{counts['stem']:>13,}")
    lines.append(f"{'total':>5} {'':>42} {counts['total']:>13,}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the U-Net stage/block table of SD and its BK-SDM "
                                                 "students, with the parameters of each stage.")
    parser.add_argument("--family", choices=sorted(TEACHERS), default="v1",
                        help="teacher family (default v1)")
    parser.add_argument("--variant", choices=sorted(VARIANTS) + ["all"], default="all")
    args = parser.parse_args(argv)
    teacher = TEACHERS[args.family]
    names = list(VARIANTS) if args.variant == "all" else [args.variant]
    print("\n\n".join(describe(variant(teacher, n), teacher) for n in names))


if __name__ == "__main__":
    main()
