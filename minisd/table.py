"""The stage/block table: one piece of data that defines an SD U-Net and its BK-SDM students.

A U-Net has stages, outermost (full latent resolution) first. Each stage has a down path of
blocks, each a ResBlock followed by a SpatialTransformer where the stage has attention, and an
up path of such blocks that also take skip connections. A mid block may sit at the bottom.

BK-SDM (Kim et al., arXiv 2305.15798, sec. 3.1) removes blocks from the SD teacher. A student
table records, per stage, which of the teacher's blocks it keeps, by teacher index. So the module
tree, the teacher -> student weight map and the KD feature pairs are all read off this table.
Removing the innermost stage (BK-SDM-Tiny) just leaves fewer stages: stage s of the student is
stage s of the teacher, which is why diffusers' `up_blocks.{j}` of tiny is `up_blocks.{j+1}` of SD.

Data only: minisd/unet.py builds the U-Net from a table, and `python -m minisd.unet --variant tiny
--family v1` prints a table with the parameters of each stage.
"""

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    channels: int
    attention: bool          # a SpatialTransformer after each ResBlock
    heads: int               # attention heads (SD-v1: 8 everywhere; SD-v2: head dim 64)
    down: tuple[int, ...]    # teacher down blocks this table keeps, by teacher index
    up: tuple[int, ...]      # teacher up blocks this table keeps, by teacher index


@dataclass(frozen=True)
class UNetTable:
    name: str
    stages: tuple[Stage, ...]    # outermost first; a down stage halves the resolution unless it is the last
    mid: bool                    # ResBlock + SpatialTransformer + ResBlock at the bottom
    context_dim: int             # width of the text encoder's hidden states (cross-attention keys)
    linear_proj: bool = False    # SD-v2: Linear proj_in/proj_out instead of 1x1 convs
    upcast_attention: bool = False  # SD-v2.1 768: attention in fp32
    teacher_down: int = 2        # blocks per down stage in the teacher
    # blocks per up stage in the teacher (one more: it also eats the downsampler's skip)
    teacher_up: int = 3
    in_channels: int = 4         # latent channels of SD's VAE
    out_channels: int = 4
    depth: int = 1               # transformer blocks per SpatialTransformer
    groups: int = 32             # GroupNorm groups
    sample_size: int = 64        # native latent size: 512 px / 8
    # LCM U-Nets distilled with guidance (LCD's w-conditioning, arXiv 2310.04378 sec. 4.2): the width of the
    # guidance-weight embedding that a bias-free Linear adds to the timestep features (diffusers'
    # `time_cond_proj_dim`, 256 in the LCM releases); None for SD and every U-Net that samples with CFG
    guidance_embed_dim: int | None = None

    @property
    def temb_dim(self) -> int:
        return 4 * self.stages[0].channels  # LDM: time_embed_dim = model_channels * 4

    @property
    def mid_heads(self) -> int:
        return self.stages[-1].heads


def _sd_stages(heads: tuple[int, ...], channels=(320, 640, 1280, 1280), attention=(True, True, True, False)):
    return tuple(Stage(c, a, h, down=(0, 1), up=(0, 1, 2)) for c, a, h in zip(channels, attention, heads))


# SD-v1.x (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5): 859,520,964 params.
SD_V1 = UNetTable("sd-v1", _sd_stages((8, 8, 8, 8)), mid=True, context_dim=768)
# SD-v2.x-base (stabilityai/stable-diffusion-2-1-base, 512 px, epsilon): 865,910,724 params.
SD_V2 = UNetTable("sd-v2", _sd_stages((5, 10, 20, 20)), mid=True, context_dim=1024, linear_proj=True)
# SD-v2.x (stabilityai/stable-diffusion-2-1, 768 px, v-prediction): same weights shape, fp32 attention.
SD_V2_768 = dataclasses.replace(SD_V2, name="sd-v2-768", upcast_attention=True, sample_size=96)

TEACHERS = {"v1": SD_V1, "v2": SD_V2, "v2-768": SD_V2_768}

# The guidance embedding's width in LCM's releases (SimianLuo/LCM_Dreamshaper_v7's time_cond_proj_dim) and
# the default of diffusers' latent consistency distillation script: a U-Net distilled with guidance is its
# table with guidance_embed_dim=LCM_GUIDANCE_EMBED_DIM (82k more parameters in SD's stem)
LCM_GUIDANCE_EMBED_DIM = 256

# BK-SDM's removals (sec. 3.1), as kept teacher block indices. Up stages keep their 1st and 3rd
# blocks (BK-SDM's `up_blocks.i.resnets.1 <- resnets.2`). stages: how many stages remain.
VARIANTS = {
    "sd":    dict(down=(0, 1), up=(0, 1, 2), mid=True, stages=4),   # the teacher itself
    # BK-SDM-Base:  579,384,964 (v1) / 583,480,964 (v2)
    "base":  dict(down=(0,), up=(0, 2), mid=True, stages=4),
    # BK-SDM-Small: 482,346,884 (v1) / 485,787,524 (v2)
    "small": dict(down=(0,), up=(0, 2), mid=False, stages=4),
    # BK-SDM-Tiny:  323,384,964 (v1) / 326,825,604 (v2)
    "tiny":  dict(down=(0,), up=(0, 2), mid=False, stages=3),
}


def variant(teacher: UNetTable, name: str, down=None, up=None, mid=None, stages=None) -> UNetTable:
    """A student table: `name` from VARIANTS, with any field overridden for a custom variant."""
    if name not in VARIANTS and None in (down, up, mid, stages):
        raise ValueError(f"unknown variant {name!r}: choose one of {', '.join(VARIANTS)} "
                         "or give down, up, mid and stages for a custom one")
    spec = dict(VARIANTS.get(name, {}))
    spec.update({k: v for k, v in dict(down=down, up=up, mid=mid, stages=stages).items() if v is not None})
    if not 1 <= spec["stages"] <= len(teacher.stages):
        raise ValueError(f"a {teacher.name} student has 1 to {len(teacher.stages)} stages, not "
                         f"{spec['stages']}")
    new_stages = tuple(dataclasses.replace(st, down=tuple(d for d in spec["down"] if d in st.down),
                                           up=tuple(u for u in spec["up"] if u in st.up))
                       for st in teacher.stages[:spec["stages"]])
    label = teacher.name if name == "sd" else f"{teacher.name}-{name}"
    return dataclasses.replace(teacher, name=label, stages=new_stages, mid=spec["mid"])


def _shape(table: UNetTable) -> tuple:
    """What decides a U-Net's weights: everything but names, kept indices and run-time settings."""
    return (tuple((s.channels, s.attention, s.heads, len(s.down), len(s.up)) for s in table.stages),
            table.mid, table.context_dim, table.linear_proj, table.in_channels, table.out_channels,
            table.depth, table.groups)


def identify(table: UNetTable) -> str:
    """The name of the SD or BK-SDM table with this architecture ("sd-v1-small"), or "custom"; with "-lcm"
    appended for an LCM U-Net with a guidance embedding ("sd-v1-tiny-lcm")."""
    suffix = "-lcm" if table.guidance_embed_dim else ""
    for teacher in (SD_V1, SD_V2):
        for name in VARIANTS:
            known = variant(teacher, name)
            if _shape(known) == _shape(table):
                return known.name + suffix
    return "custom" + suffix
