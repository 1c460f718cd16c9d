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
OPENCLIP_VIT_H14 = CLIPTextConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")  # SD-v2; 340.4M


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each token sees only itself and the tokens before it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, heads*head_dim] -> [B, heads, N, head_dim]
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(out.transpose(1, 2).flatten(2))  # -> [B, N, heads*head_dim]


class CLIPLayer(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); the MLP is fc1 -> activation -> fc2."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class CLIPTextEncoder(nn.Module):
    """Token ids [B, N] (N <= 77) -> hidden states [B, N, width], after the final LayerNorm.

    Has no buffers (positions come from arange), so it can be built on the meta device and
    filled from a checkpoint.
    """

    def __init__(self, cfg: CLIPTextConfig = CLIP_VIT_L14):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

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
        if self.cfg.eos_token_id == 2:
            pos = ids.argmax(dim=-1)
        else:
            pos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        return hidden[torch.arange(ids.shape[0], device=hidden.device), pos.to(hidden.device)]
