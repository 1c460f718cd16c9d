"""The tiny autoencoder's two layouts: diffusers' AutoencoderTiny folder (config.json and
diffusion_pytorch_model.safetensors, as madebyollin/taesd ships it) and TAESD's own pair of files,
taesd_encoder.pth and taesd_decoder.pth (or .safetensors).

Both keep each half as one flat nn.Sequential, so a key is a layer's position: `encoder.layers.{k}.` in
diffusers, `{k}.` in TAESD's files. The positions follow from the config, level by level
(minisd/vae_tiny.py): the encoder has conv_in, then per level its downsampling conv (not at level 0) and
blocks, then conv_out; the decoder has conv_in, a ReLU, then per level its blocks and, but at the last
level, an upsample and a conv, then conv_out. TAESD's decoder starts with its Clamp, so its positions are
diffusers' plus one. Inside a block, diffusers and TAESD both number the Sequential `conv.0`, `conv.2`,
`conv.4` (ReLUs between).
"""

from pathlib import Path

import torch

from minisd.checkpoints.files import find_weights, read_json, read_state_dict, write_json, write_state_dict
from minisd.checkpoints.remap import Rule, export, load_into
from minisd.vae_tiny import AutoencoderTiny, TinyVAEConfig

BLOCK_RULES = (("conv1.", "conv.0."), ("conv2.", "conv.2."), ("conv3.", "conv.4."))
TAESD_FILES = ("taesd_encoder", "taesd_decoder")  # file stems in madebyollin/taesd
TAESD_SUFFIXES = (".safetensors", ".pth")


def tiny_vae_rules(config: TinyVAEConfig, encoder: str = "encoder.layers.", decoder: str = "decoder.layers.",
                   decoder_offset: int = 0) -> list[Rule]:
    """Native names <-> flat positions under the `encoder` and `decoder` prefixes; diffusers' by default."""
    rules = [("encoder.conv_in.", f"{encoder}0.")]
    k = 1
    for i, n in enumerate(config.encoder_blocks):
        if i > 0:
            rules.append((f"encoder.levels.{i}.downsample.", f"{encoder}{k}."))
            k += 1
        for j in range(n):
            rules.append((f"encoder.levels.{i}.blocks.{j}.", f"{encoder}{k}.", BLOCK_RULES))
            k += 1
    rules.append(("encoder.conv_out.", f"{encoder}{k}."))
    k = decoder_offset
    rules.append(("decoder.conv_in.", f"{decoder}{k}."))
    k += 2  # conv_in, ReLU
    for i, n in enumerate(config.decoder_blocks):
        for j in range(n):
            rules.append((f"decoder.levels.{i}.blocks.{j}.", f"{decoder}{k}.", BLOCK_RULES))
            k += 1
        if i < len(config.decoder_blocks) - 1:
            rules.append((f"decoder.levels.{i}.conv.", f"{decoder}{k + 1}."))  # after the Upsample at k
            k += 2
    rules.append(("decoder.conv_out.", f"{decoder}{k}."))
    return rules


def taesd_rules(config: TinyVAEConfig) -> list[Rule]:
    """TAESD's files, read into one dict as `encoder.{k}` and `decoder.{k}` (Clamp first in the decoder)."""
    return tiny_vae_rules(config, encoder="encoder.", decoder="decoder.", decoder_offset=1)


def load_vae_tiny(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  half: bool = False) -> AutoencoderTiny:
    """Read a diffusers AutoencoderTiny folder: config.json and diffusion_pytorch_model[.fp16].safetensors
    (or .bin)."""
    folder = Path(folder)
    config = TinyVAEConfig.from_diffusers(read_json(folder / "config.json"))
    path = find_weights(folder, ("diffusion_pytorch_model",), half)
    with torch.device("meta"):
        vae = AutoencoderTiny(config)
    return load_into(vae, read_state_dict(path), tiny_vae_rules(config), what=f"tiny VAE weights {path}",
                     dtype=dtype, device=device)


def save_vae_tiny(vae: AutoencoderTiny, folder: str | Path) -> None:
    """Write config.json and diffusion_pytorch_model.safetensors, which diffusers' AutoencoderTiny loads."""
    folder = Path(folder)
    write_json(folder / "config.json", vae.config.to_diffusers())
    write_state_dict(folder / "diffusion_pytorch_model.safetensors", export(vae, tiny_vae_rules(vae.config)))


def taesd_files(folder: str | Path) -> tuple[Path, Path] | None:
    """The (encoder, decoder) files of a folder in TAESD's own layout, or None where it has no such pair."""
    found = []
    for stem in TAESD_FILES:
        paths = [Path(folder) / f"{stem}{suffix}" for suffix in TAESD_SUFFIXES]
        found.append(next((p for p in paths if p.is_file()), None))
    return tuple(found) if all(found) else None


def blocks_per_level(half: dict[str, torch.Tensor], path: Path) -> tuple[int, ...]:
    """A TAESD file's residual blocks per level, read off its positions: after conv_in, each run of blocks
    (`{k}.conv.*`) ends at a bare conv (`{k}.weight`): the next level's downsampler, a level's conv after its
    upsample, or conv_out."""
    kinds = {}
    for key in half:
        position, _, rest = key.partition(".")
        if not position.isdigit():
            raise ValueError(f"{path} is not a TAESD file: key {key!r} is not a layer position")
        kinds[int(position)] = rest.startswith("conv.")
    runs, n = [], 0
    for is_block in [kinds[k] for k in sorted(kinds)][1:]:
        if is_block:
            n += 1
        else:
            runs.append(n)
            n = 0
    return tuple(runs)


def load_taesd(folder: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> AutoencoderTiny:
    """Read TAESD's own files, taesd_encoder and taesd_decoder (.safetensors or .pth), from a folder. They
    carry no config: the widths come from conv_in's weights, the levels from the layer positions."""
    files = taesd_files(folder)
    if files is None:
        raise FileNotFoundError(f"no TAESD files in {folder}: expected taesd_encoder and taesd_decoder, .pth "
                                "or .safetensors")
    encoder, decoder = (read_state_dict(path) for path in files)
    try:
        first_encoder, first_decoder = encoder["0.weight"], decoder["1.weight"]  # decoder.0 is the Clamp
    except KeyError as e:
        raise ValueError(f"{folder}: not TAESD files, no conv_in weight {e}") from None
    config = TinyVAEConfig(in_channels=first_encoder.shape[1], latent_channels=first_decoder.shape[1],
                           encoder_channels=first_encoder.shape[0], decoder_channels=first_decoder.shape[0],
                           encoder_blocks=blocks_per_level(encoder, files[0]),
                           decoder_blocks=blocks_per_level(decoder, files[1]))
    state_dict = {f"{part}.{key}": tensor for part, half in (("encoder", encoder), ("decoder", decoder))
                  for key, tensor in half.items()}
    with torch.device("meta"):
        vae = AutoencoderTiny(config)
    return load_into(vae, state_dict, taesd_rules(config),
                     what=f"TAESD files {files[0].name} and {files[1].name} (keys as encoder.K, decoder.K)",
                     dtype=dtype, device=device)
