"""The toy world's models: SD's three networks with smaller tables, and the random pipeline a teacher starts
from.

Nothing here is a new class. The U-Net has SD's four stages (attention in the outer three, cross-attention to
the text, a mid block), so BK-SDM's base/small/tiny removals (minisd/table.py, VARIANTS) apply to it
unchanged; only the widths, head counts and norm groups shrink. The VAE is SD's AutoencoderKL with three
levels instead of four, so it downsamples 4x, not 8x: a 64 px toy image becomes 16x16x4 latents, and its
smallest shape (12 px) still spans three latent pixels. The text tower is CLIP's, with the real 49,408-token
vocabulary and tokenizer, 64 wide and 4 deep: its embedding table (3.2 M of its 3.4 M parameters) is more than
a third of the shipped weights. The schedule is SD-v2's way of training (v-prediction) on SD's betas rescaled to
zero terminal SNR, sampled with DDIM's trailing spacing (docs/toy-world.md says why).

    python -m minisd.toy init --vae weights/toy-sd/vae --out data/toy-init
        # random U-Net and text tower, trained VAE
"""

import dataclasses
from pathlib import Path

import torch

from minisd.checkpoints.diffusers import load_vae, save_folder
from minisd.checkpoints.ldm import SD_SCHEDULER
from minisd.clip import CLIPTextConfig, CLIPTextEncoder
from minisd.pipeline import load_pipeline
from minisd.table import Stage, UNetTable
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import AutoencoderKL

# The U-Net: 5,523,876 params, 220 M MACs per 16x16 latent. SD-v1's table (minisd/table.py, SD_V1) with widths
# 320/640/1280/1280 -> 32/64/96/96 and heads sized for a head width of 16 (2/4/6/6 heads). Most of the compute
# is in the outer two stages (16x16 and 8x8), as in SD. BK-SDM students of it: base 3,707,652, small 3,151,332,
# tiny 2,245,380 params.
HEAD_WIDTH = 16


def toy_stages(widths: tuple[int, ...]) -> tuple[Stage, ...]:
    """SD-v1's four stages (attention in the outer three) at these widths, with heads HEAD_WIDTH wide."""
    return tuple(Stage(c, a, c // HEAD_WIDTH, down=(0, 1), up=(0, 1, 2))
                 for c, a in zip(widths, (True, True, True, False)))


TOY_UNET = UNetTable(
    "toy",
    toy_stages((32, 64, 96, 96)),
    mid=True,
    context_dim=64,  # the text tower's width
    groups=8,  # GroupNorm groups: SD's 32 would leave the 32-wide stage one channel a group
    sample_size=16,  # latents of a 64 px image
)

# The VAE, as a diffusers AutoencoderKL config.json (train_vae.py --config reads it): 3 levels -> 4x
# downsampling. The bottom level stays at 32 channels: its mid block (ResBlocks + attention over 16x16) is the
# costliest part at 64 (50 M MACs of the encoder's 106 M), and flat shapes need no more.
TOY_VAE = {
    "_class_name": "AutoencoderKL", "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4, "sample_size": 64,
}

# The text tower: CLIP ViT-L/14's text transformer (minisd/clip.py) at width 64, 4 layers, 4 heads. The
# captions use ~40 words, but the vocabulary stays CLIP's so that the real tokenizer and every minisd loader
# apply as is.
TOY_TEXT = CLIPTextConfig(width=64, layers=4, heads=4, mlp_width=256)

# The schedule: SD's scaled-linear betas (they suit latents scaled to unit variance, as train_vae.py scales
# them) rescaled to zero terminal SNR, so that x_T holds no signal at all and the U-Net must read the caption
# at the noisiest steps, where a scene's layout is decided; v-prediction, since epsilon is undefined there;
# DDIM with trailing spacing, which starts at t = 999 (PNDM cannot). As a diffusers scheduler_config.json.
TOY_SCHEDULER = {key: value for key, value in SD_SCHEDULER.items() if key != "skip_prk_steps"} | dict(
    _class_name="DDIMScheduler", prediction_type="v_prediction", rescale_betas_zero_snr=True,
    timestep_spacing="trailing", steps_offset=0)

TOY_GUIDANCE = 4.0  # classifier-free guidance for the toy models


def initial_pipeline(vae: str | Path, out: str | Path, seed: int = 0, widths: tuple[int, ...] | None = None,
                     text_layers: int | None = None, sd_schedule: bool = False,
                     prediction_type: str = "v_prediction") -> Path:
    """A pipeline folder to train a toy teacher from (train.py --plain --teacher OUT --train-text-encoder): a
    random U-Net and text tower of the tables above, the trained VAE in `vae`, CLIP's tokenizer and
    TOY_SCHEDULER. `widths` (four stage widths, multiples of 16) and `text_layers` change those tables for a
    new teacher; `sd_schedule` gives SD-v1's PNDM schedule instead (no zero terminal SNR), whose
    `prediction_type` may be "epsilon" (SD-v1) or "v_prediction" (SD-v2). Training follows the folder's
    scheduler config."""
    if widths is not None and (len(widths) != 4 or any(w <= 0 or w % HEAD_WIDTH for w in widths)):
        raise ValueError(f"widths {widths}: give four stage widths, each a positive multiple of {HEAD_WIDTH}")
    if not sd_schedule and prediction_type != "v_prediction":
        raise ValueError(f"prediction_type {prediction_type!r} on a zero terminal SNR schedule: the noise is "
                         "undefined at t = T; use v_prediction, or the SD schedule (--sd-schedule)")
    unet_table = TOY_UNET if widths is None else dataclasses.replace(TOY_UNET, stages=toy_stages(widths))
    text_table = TOY_TEXT if text_layers is None else dataclasses.replace(TOY_TEXT, layers=text_layers)
    torch.manual_seed(seed)
    vae_model = load_vae(vae)
    if vae_model.config.latent_channels != TOY_UNET.in_channels:
        raise ValueError(f"{vae} has {vae_model.config.latent_channels} latent channels; the toy U-Net takes "
                         f"{TOY_UNET.in_channels}: train it with train_vae.py --config holding TOY_VAE")
    components = dict(unet=UNet(unet_table), vae=vae_model, text_encoder=CLIPTextEncoder(text_table),
                      tokenizer=CLIPTokenizer.builtin(),
                      scheduler_config=dict(SD_SCHEDULER if sd_schedule else TOY_SCHEDULER,
                                            prediction_type=prediction_type))
    save_folder(components, out)
    return Path(out)


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp16",
           vae: str | Path | None = None) -> Path:
    """A train.py checkpoint (whose vae/, tokenizer/ and scheduler/ link to its run folder) as a standalone
    pipeline folder, in half precision by default: the toy models sample the same in fp16 weights upcast to
    fp32.

    `vae` ships another VAE in place of the run's: a decoder fine-tuned afterwards (train_vae.py
    --decoder-only). Its encoder must be the run's, weight for weight, with the same scaling factor: the U-Net
    learnt that encoder's latents, and any other encoder's would be foreign to it.
    """
    pipe = load_pipeline(checkpoint)
    if vae is not None:
        pipe.vae = same_latents(pipe.vae, load_vae(vae), vae)
    if dtype == "fp16":
        pipe.to(dtype=torch.float16)
    save_folder(pipe.components(), out)
    return Path(out)


def same_latents(old: AutoencoderKL, new: AutoencoderKL, where) -> AutoencoderKL:
    """`new` if it makes the latents `old` makes (same encoder, quant_conv, scaling factor); else raises."""
    new_modules = new.encoding_modules()
    differ = []
    for name, module in old.encoding_modules().items():
        new_weights = new_modules[name].state_dict()
        differ += [f"{name}.{k}" for k, w in module.state_dict().items()
                   if k not in new_weights or not torch.equal(w.float(), new_weights[k].float())]
    if differ or old.scaling_factor != new.scaling_factor:
        raise ValueError(f"the VAE in {where} encodes other latents than the run's "
                         f"({differ[0] if differ else 'scaling_factor'} differs): give a VAE whose decoder "
                         "alone was fine-tuned from the run's (train_vae.py --decoder-only --init <its vae>)")
    return new
