"""DINO's ViT-S/16 weights: where they are found, and `load_dino`, which reads either layout.

Two files hold the same network: the original checkpoint, `dino_deitsmall16_pretrain.pth`
(minisd/metrics/dino_original_layout.py), and the hub repo `facebook/dino-vits16`, transformers' ViTModel
layout (minisd/metrics/dino_hub_layout.py). Loading is strict, through each layout's rule table. The two
differ in one number besides the names: the LayerNorm eps, 1e-6 in DINO's code and 1e-12 in the hub's
config.json; each loads with its own, so each equals its reference (the embeddings differ by about 1e-6).

Without a path the weights are looked up in this order: weights/metrics/dino_deitsmall16_pretrain.pth,
torch hub's checkpoint cache (where torch.hub.load("facebookresearch/dino:main", "dino_vits16") leaves the
same file), then the hub repo in weights/hub/, downloaded when online.
"""

from pathlib import Path

import huggingface_hub
import torch

from minisd.checkpoints import hub
from minisd.checkpoints.files import find_weights, read_checkpoint, read_json
from minisd.checkpoints.remap import load_into
from minisd.metrics import dino_hub_layout, dino_original_layout
from minisd.metrics.dino import DINO

ORIGINAL_FILE = "dino_deitsmall16_pretrain.pth"
ORIGINAL_URL = f"https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/{ORIGINAL_FILE}"
HUB_REPO = "facebook/dino-vits16"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in this order, as transformers looks
CACHE = Path(__file__).resolve().parents[2] / "weights" / "metrics"


def unbatched(key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Shape fix for both layouts: they keep the class token [1, 1, width] and the position embeddings
    [1, tokens, width] with a batch axis that minisd's ViT (open_clip's shapes) leaves out."""
    if key in ("class_embedding", "position_embedding") and tensor.numel() == shape.numel():
        return tensor.reshape(shape)
    return tensor


def download(repo_id: str = HUB_REPO, cache_dir: Path = hub.CACHE) -> Path:
    """The folder of a hub ViT (config.json and one weight file), from the cache when offline."""
    offline = not hub.reachable()
    try:
        config = Path(huggingface_hub.hf_hub_download(repo_id, "config.json", cache_dir=cache_dir,
                                                      local_files_only=offline))
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"no model {repo_id!r} on the hub") from None
    except Exception as e:  # no network and nothing cached
        raise ConnectionError(
            f"DINO's weights are not on this machine and cannot be downloaded ({type(e).__name__}). On a "
            f"machine with network, get {ORIGINAL_URL} into {CACHE}/ here, or run `hf download {repo_id} "
            f"config.json {HUB_WEIGHTS[0]} --local-dir DIR`, copy DIR here and pass it as the DINO "
            "weights.") from None
    for name in HUB_WEIGHTS:
        try:
            huggingface_hub.hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=offline)
            return config.parent
        except Exception:  # not in the repo, or not cached: try the next name
            continue
    raise ConnectionError(f"{repo_id} has neither {' nor '.join(HUB_WEIGHTS)} in {cache_dir} and none can be "
                          f"downloaded; get {ORIGINAL_URL} into {CACHE}/ instead")


def locate(path: str | Path | None = None, cache: Path = CACHE, hub_cache: Path = hub.CACHE) -> Path:
    """The DINO weights' local file or hub folder: `path`, else the first found in the order above."""
    if path is not None:
        if not Path(path).exists():
            raise FileNotFoundError(f"DINO weights not found: {path}")
        return Path(path)
    for folder in (cache, Path(torch.hub.get_dir()) / "checkpoints"):
        if (folder / ORIGINAL_FILE).is_file():
            return folder / ORIGINAL_FILE
    return download(HUB_REPO, hub_cache)


def read_layout(source: Path) -> tuple:
    """(config, state dict, rule table, ignored keys) of a hub folder, a hub weight file with its config.json
    beside it, or an original checkpoint; the layout is told by the keys."""
    weights = find_weights(source, dino_hub_layout.WEIGHT_STEMS) if source.is_dir() else source
    state = dino_original_layout.unwrap(read_checkpoint(weights))
    if "embeddings.cls_token" in state:
        config_path = weights.parent / "config.json"
        config = dino_hub_layout.config_from_transformers(read_json(config_path), str(config_path))
        return config, state, dino_hub_layout.RULES, dino_hub_layout.IGNORE
    config = dino_original_layout.config_from_shapes(state, str(weights))
    return config, dino_original_layout.split_qkv(state), dino_original_layout.RULES, ()


def load_dino(path: str | Path | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> DINO:
    """minisd's DINO ViT with the weights at `path` (an original .pth, a hub folder or its weight file;
    default: located as above), in eval mode."""
    source = locate(path)
    config, state, rules, ignore = read_layout(source)
    with torch.device("meta"):
        model = DINO(config)
    load_into(model, state, rules, ignore=ignore, shape_fix=unbatched, what=f"DINO weights {source}",
              dtype=dtype, device=device)
    return model.eval()
