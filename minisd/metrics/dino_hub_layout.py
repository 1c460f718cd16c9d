"""transformers' ViTModel layout, in which the `facebook/dino-vits16` hub repo holds DINO: config.json, keys.

A hub ViT folder holds config.json (a ViTConfig) and model.safetensors or pytorch_model.bin, whose keys are
the names ViTModel has always saved under (transformers 5 renames its modules in memory, but still writes and
reads these): `embeddings.cls_token` [1, 1, width], `embeddings.position_embeddings` [1, tokens, width],
`embeddings.patch_embeddings.projection`, then per block `encoder.layer.{i}.` with `layernorm_before`,
`attention.attention.{query,key,value}`, `attention.output.dense`, `layernorm_after`, `intermediate.dense`
(fc1) and `output.dense` (fc2), and the final `layernorm`. ViTModel's pooler (a dense layer and tanh on the
class token) is no part of DINO's embedding: files that carry one load without it.
"""

from dataclasses import asdict

from minisd.clip import ACTIVATIONS
from minisd.clip_vision import VisionConfig
from minisd.checkpoints.remap import Rule

LAYER_RULES: tuple[Rule, ...] = (  # inside encoder.layer.{i}.
    ("norm1.", "layernorm_before."),
    ("attn.to_q.", "attention.attention.query."),
    ("attn.to_k.", "attention.attention.key."),
    ("attn.to_v.", "attention.attention.value."),
    ("attn.to_out.", "attention.output.dense."),
    ("norm2.", "layernorm_after."),
    ("fc1.", "intermediate.dense."),
    ("fc2.", "output.dense."),
)
RULES: list[Rule] = [
    ("patch_embed.", "embeddings.patch_embeddings.projection."),
    ("class_embedding", "embeddings.cls_token"),
    ("position_embedding", "embeddings.position_embeddings"),
    ("layers.{i}.", "encoder.layer.{i}.", LAYER_RULES),
    ("norm_post.", "layernorm."),
]
IGNORE = (r"pooler\.",)
WEIGHT_STEMS = ("model", "pytorch_model")  # model.safetensors first, then pytorch_model.bin

# VisionConfig field -> (ViTConfig key, ViTConfig's default, which config.json may leave out)
HF_KEYS = {"image_size": ("image_size", 224), "patch_size": ("patch_size", 16), "width": ("hidden_size", 768),
           "layers": ("num_hidden_layers", 12), "heads": ("num_attention_heads", 12),
           "mlp_width": ("intermediate_size", 3072), "activation": ("hidden_act", "gelu"),
           "layer_norm_eps": ("layer_norm_eps", 1e-12)}


def config_from_transformers(config: dict, where: str = "config.json") -> VisionConfig:
    """The VisionConfig of a ViTModel config.json; what minisd's ViT does not build is refused by name."""
    unsupported = []
    if config.get("model_type", "vit") != "vit":
        unsupported.append(f"model_type={config['model_type']!r} (expected 'vit')")
    if not config.get("qkv_bias", True):
        unsupported.append("qkv_bias=false")
    if config.get("num_channels", 3) != 3:
        unsupported.append(f"num_channels={config['num_channels']}")
    if config.get("hidden_act", "gelu") not in ACTIVATIONS:
        unsupported.append(f"hidden_act={config['hidden_act']!r}")
    values = {field: config.get(key, default) for field, (key, default) in HF_KEYS.items()}
    for field in ("image_size", "patch_size"):
        if not isinstance(values[field], int):
            unsupported.append(f"{HF_KEYS[field][0]}={values[field]!r} (only square images and patches)")
    if unsupported:
        raise ValueError(f"{where}: a ViT minisd does not build: {', '.join(unsupported)}")
    return VisionConfig(**values, embed_dim=None, patch_bias=True, norm_pre=False)


def config_to_transformers(config: VisionConfig) -> dict:
    """A config.json that transformers' ViTModel reads as this ViT."""
    fields = asdict(config)
    return {"architectures": ["ViTModel"], "model_type": "vit", "qkv_bias": True, "num_channels": 3,
            **{key: fields[field] for field, (key, _) in HF_KEYS.items()}}

