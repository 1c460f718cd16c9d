"""The original DINO checkpoints' layout (facebookresearch/dino, vision_transformer.py; timm's ViT names).

`dino_deitsmall16_pretrain.pth`, the file torch.hub.load("facebookresearch/dino:main", "dino_vits16") fetches,
is a plain state dict: `cls_token` [1, 1, width], `pos_embed` [1, tokens, width], `patch_embed.proj`, per
block `blocks.{i}.` with `norm1`, `attn.qkv` (q, k and v fused: [3*width, width], rows q then k then v),
`attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, and the final `norm`. DINO's full training checkpoints
(`dino_deitsmall16_pretrain_full_checkpoint.pth`) hold the same backbone under `teacher` with `module.` and
`backbone.` prefixes and a projection `head.` that the embedding does not use; utils.load_pretrained_weights
unwraps them so, and so does `unwrap`.

The file carries no config: the architecture follows from the shapes, with DINO's 64-wide heads and its
LayerNorm eps of 1e-6.
"""

import dataclasses

import torch

from minisd.checkpoints.remap import Rule
from minisd.clip_vision import VisionConfig
from minisd.metrics.dino import DINO_VITS16, HEAD_WIDTH

LAYER_RULES: tuple[Rule, ...] = (  # inside blocks.{i}.; q, k, v as split_qkv names them
    ("attn.to_q.", "attn.q."),
    ("attn.to_k.", "attn.k."),
    ("attn.to_v.", "attn.v."),
    ("attn.to_out.", "attn.proj."),
    ("fc1.", "mlp.fc1."),
    ("fc2.", "mlp.fc2."),
)
RULES: list[Rule] = [
    ("patch_embed.", "patch_embed.proj."),
    ("class_embedding", "cls_token"),
    ("position_embedding", "pos_embed"),
    ("layers.{i}.", "blocks.{i}.", LAYER_RULES),  # norm1, norm2 keep their names
    ("norm_post.", "norm."),
]


def unwrap(state: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors: a plain state dict as it is; a full training checkpoint's teacher without its
    `module.` and `backbone.` prefixes and its projection head."""
    if isinstance(state.get("teacher"), dict):
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state["teacher"].items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`attn.qkv.{weight,bias}` [3*width, ...] -> `attn.{q,k,v}.{weight,bias}`; other keys pass through.
    The fused rows are q, then k, then v (the forward's reshape to [B, N, 3, heads, head_dim])."""
    out = {}
    for key, tensor in state.items():
        stem, _, kind = key.rpartition(".qkv.")
        if not stem:
            out[key] = tensor
            continue
        for name, part in zip("qkv", tensor.chunk(3)):
            out[f"{stem}.{name}.{kind}"] = part.clone()  # own storage, so the model can be saved
    return out


def config_from_shapes(state: dict[str, torch.Tensor], where: str = "checkpoint") -> VisionConfig:
    """The ViT a DINO backbone's tensors describe: width, patch, depth, MLP width and image size from the
    shapes (the position embeddings count the patches of the training size, 224)."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{where} is not an original DINO ViT checkpoint: no {', '.join(missing)}")
    width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return dataclasses.replace(DINO_VITS16, image_size=grid * patch, patch_size=patch, width=width,
                               layers=layers, heads=width // HEAD_WIDTH,
                               mlp_width=state["blocks.0.mlp.fc1.weight"].shape[0])
