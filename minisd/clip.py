"""CLIP's text transformer: Stable Diffusion's text encoder.

CLIP (Radford et al., 2021, arXiv 2103.00020, sec. 2.4) encodes text with a GPT-2 style
transformer: token + learned position embeddings, pre-LayerNorm blocks with causal (masked)
self-attention, and a final LayerNorm. SD's U-Net cross-attends to all 77 output vectors.
This follows transformers' CLIPTextModel (models/clip/modeling_clip.py), which holds both
towers SD uses:
- SD-v1: OpenAI's CLIP ViT-L/14 text tower, with quick-GELU;
- SD-v2: OpenCLIP ViT-H/14's (Cherti et al., 2023), with exact GELU. SD-v2 conditions on the
  penultimate block's output (ldm/modules/encoders/modules.py, FrozenOpenCLIPEmbedder with
  layer="penultimate"), still passed through the final LayerNorm, so diffusers ships the 23 of
  24 blocks that run, and so do we.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisd.blocks import Attention


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (openai/CLIP model.py, QuickGELU)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu": the exact, erf-based GELU


# transformers' config.json key for each CLIPTextConfig field
HF_KEYS = {"width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
           "mlp_width": "intermediate_size", "activation": "hidden_act", "vocab_size": "vocab_size",
           "max_positions": "max_position_embeddings", "layer_norm_eps": "layer_norm_eps",
           "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}


@dataclass(frozen=True)
class CLIPTextConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    vocab_size: int = 49408       # 256 bytes + 256 bytes+"</w>" + 48,894 merges + 2 specials
    max_positions: int = 77       # CLIP's context length, and so SD's 77 text tokens
    layer_norm_eps: float = 1e-5
    # The token ids in SD's hub configs are transformers' legacy defaults, not the tokenizer's
    # (<|startoftext|> is 49406, <|endoftext|> 49407). They are kept as the files have them
    # because eos_token_id == 2 selects the pooling rule (see CLIPTextEncoder.pooled).
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def from_transformers(cls, config: dict) -> "CLIPTextConfig":
        """From a CLIPTextModel config.json (or a full CLIPModel one, via its text_config).
        Keys it lacks take the ViT-L/14 values."""
        config = config.get("text_config", config)
        defaults = asdict(cls())
        return cls(**{field: config.get(key, defaults[field]) for field, key in HF_KEYS.items()})

    def to_transformers(self) -> dict:
        """A config.json that transformers' CLIPTextModel.from_pretrained accepts."""
        out = {key: getattr(self, field) for field, key in HF_KEYS.items()}
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                "attention_dropout": 0.0, "dropout": 0.0, **out}


CLIP_VIT_L14 = CLIPTextConfig()  # SD-v1; 123.1M parameters
# SD-v2; 340.4M parameters
OPENCLIP_VIT_H14 = CLIPTextConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")

# The text encoder of each SD family. Its width is the width of the U-Net's context (the cross-attention
# keys, UNetTable.context_dim), which is how a U-Net, or a single file's weights, tell their family.
TEXT_ENCODERS = {"v1": CLIP_VIT_L14, "v2": OPENCLIP_VIT_H14}


def family_of(context_dim: int) -> str:
    """The SD family of a U-Net that attends to context_dim-wide text states: "v1" for CLIP ViT-L/14's
    768, "v2" otherwise: OpenCLIP ViT-H/14's 1024, and widths that no SD family has (reduced test
    models), which a single file then holds in SD-v2's layout."""
    return "v1" if context_dim == TEXT_ENCODERS["v1"].width else "v2"


class CLIPLayer(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); the MLP is fc1 -> activation -> fc2.

    Both CLIP towers stack this layer: the text tower with a causal mask (each token sees only
    itself and the tokens before it), the image tower (minisd/clip_vision.py) without one.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, eps: float, causal: bool):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias=True, causal=causal)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class CLIPTextEncoder(nn.Module):
    """Token ids [B, N] (N <= 77) -> hidden states [B, N, width], after the final LayerNorm.

    Has no buffers (positions come from arange), so it can be built on the meta device and
    filled from a checkpoint.
    """

    def __init__(self, config: CLIPTextConfig = CLIP_VIT_L14):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)
        self.layers = nn.ModuleList(
            CLIPLayer(config.width, config.heads, config.mlp_width, config.activation, config.layer_norm_eps,
                      causal=True) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)

    def pooled(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Each prompt's features at its end-of-text token [B, width]: CLIP's text embedding
        before the text projection (what CLIP score compares with the image).

        As transformers' CLIPTextTransformer: configs with the legacy eos_token_id 2 (SD's)
        take the position of the largest id, which is <|endoftext|> (49407) in CLIP's vocabulary;
        others take the first position holding eos_token_id.
        """
        if self.config.eos_token_id == 2:
            pos = ids.argmax(dim=-1)
        else:
            pos = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return hidden[torch.arange(ids.shape[0], device=hidden.device), pos.to(hidden.device)]
