"""The FID Inception weights (`pt_inception-2015-12-05`): key layout, strict loading, where the file comes
from.

pytorch-fid's FID_WEIGHTS_URL file and torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`
are both converted from TensorFlow's inception-2015-12-05 graph under torchvision's Inception3
names (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight`; see
torch-fidelity's utils/util_convert_inception_weights.py), and carry the same hash prefix. So one
rule table reads both. Inside the blocks minisd keeps torchvision's branch names (branch5x5_1...);
the table renames the stem convs and the mixed blocks to the names of minisd's block table.

The file is looked up in this order: an explicit path, weights/metrics/, torch hub's checkpoint
cache (where pytorch-fid and torch-fidelity leave it), then downloaded into weights/metrics/.
"""

from pathlib import Path

import torch

from minisd.checkpoints.files import read_state_dict
from minisd.checkpoints.remap import Rule, load_into
from minisd.metrics.inception import InceptionV3

URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
       "pt_inception-2015-12-05-6726825d.pth")
# pytorch-fid, torch-fidelity
FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
HASH_PREFIX = "6726825d"  # the first hex digits of the file's sha256, as torch.hub names files
CACHE = Path(__file__).resolve().parents[2] / "weights" / "metrics"

# (native, layout): TF's layer names 1a...4a for the stem; Mixed_5b...7c for blocks a1...e2.
RULES: list[Rule] = [
    ("stem.conv1a.", "Conv2d_1a_3x3."),
    ("stem.conv2a.", "Conv2d_2a_3x3."),
    ("stem.conv2b.", "Conv2d_2b_3x3."),
    ("stem.conv3b.", "Conv2d_3b_1x1."),
    ("stem.conv4a.", "Conv2d_4a_3x3."),
    ("mixed.a1.", "Mixed_5b."),
    ("mixed.a2.", "Mixed_5c."),
    ("mixed.a3.", "Mixed_5d."),
    ("mixed.b.", "Mixed_6a."),
    ("mixed.c1.", "Mixed_6b."),
    ("mixed.c2.", "Mixed_6c."),
    ("mixed.c3.", "Mixed_6d."),
    ("mixed.c4.", "Mixed_6e."),
    ("mixed.d.", "Mixed_7a."),
    ("mixed.e1.", "Mixed_7b."),
    ("mixed.e2.", "Mixed_7c."),
]
# BatchNorm's step counter: saved by torch's BatchNorm2d (pytorch-fid's model), unused at inference.
IGNORE = (r".*\.num_batches_tracked$",)


def load_inception_state(model: InceptionV3, state: dict[str, torch.Tensor],
                         what: str = "Inception weights") -> InceptionV3:
    """Fill minisd's Inception from a state dict in the pt_inception layout; strict."""
    return load_into(model, state, RULES, ignore=IGNORE, what=what)


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dest), hash_prefix=HASH_PREFIX, progress=True)


def find_weights(cache: Path = CACHE) -> Path:
    """The local weight file, downloading it into `cache` if it is nowhere on this machine."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for folder in (cache, hub):
        for name in FILENAMES:
            if (folder / name).is_file():
                return folder / name
    dest = cache / FILENAMES[0]
    try:
        _download(URL, dest)
    except Exception as e:
        raise ConnectionError(
            f"the FID Inception weights are not on this machine and cannot be downloaded "
            f"({type(e).__name__}: {e}). Get {URL} (on any machine with network) and put it at {dest}, "
            f"or pass its path (torch-fidelity's {FILENAMES[1]} works too).") from None
    return dest


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionV3:
    """minisd's FID Inception-v3 with the pt_inception-2015-12-05 weights, in eval mode, on `device`."""
    path = Path(path) if path is not None else find_weights()
    model = load_inception_state(InceptionV3(), read_state_dict(path), what=f"Inception weights {path}")
    return model.float().eval().to(device)
