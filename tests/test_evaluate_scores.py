"""evaluate.py end to end: a tiny random-weight pipeline generates a handful of images, and the scores in
scores.json equal what the reference tools compute on the same files with the same (random) metric weights:
pytorch-fid for FID (real statistics built by --fid-stats-from), torch-fidelity for IS, open_clip for the CLIP
score, computed as BK-SDM's scripts compute it."""

import json
from unittest import mock

import numpy as np
import open_clip
import pytest
import pytorch_fid.inception as pfid_inception
import torch
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path
from reference import VAE_SMALL, perturb_, reduced_config, reference_parts, save_hub_layout, text_config
from safetensors.torch import save_file
from test_clip_score import SMALL, bk_sdm_scores, reference_transform
from test_evaluate import write_prompts
from test_metrics_inception import random_inception_state
from torch_fidelity import calculate_metrics

from evaluate import main as evaluate
from minisd.metrics import inception_weights as inception_layout

pytestmark = pytest.mark.slow  # a full-size Inception on the CPU over a dozen images
N = 10  # IS needs at least its 10 splits' worth of images
PROMPTS = [(f"img{i:02d}.png", text) for i, text in enumerate(
    ["a red apple", "a cat on a mat", "a dog", "a boat at sea", "two birds", "a green field", "an old castle",
     "a bowl of soup", "a tall tree", "a yellow bus"])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores")
    parts = reference_parts("v1", reduced_config("v1", "tiny"), text_config("v1", 96, 2, 4), VAE_SMALL,
                            seed=7)
    model = save_hub_layout(parts, "v1", root / "model")[1]
    state = random_inception_state(seed=1)
    torch.save(state, root / inception_layout.FILENAMES[0])
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
               root / inception_layout.FILENAMES[1])
    torch.manual_seed(0)
    clip = perturb_(open_clip.model.CLIP(**SMALL)).eval()
    (root / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(root / "clip" / "open_clip_model.safetensors"))
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL}))
    rng = np.random.default_rng(0)
    (root / "real").mkdir()
    for i in range(N):  # real photos come in all sizes; the protocol squashes them to 256 (here 32)
        h, w = rng.integers(24, 80, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "real" / f"r{i}.png")
    return root, model, state, clip


def test_scores_equal_the_reference_tools(setup, tmp_path):
    root, model, state, clip = setup
    common = ["--inception-weights", str(root / inception_layout.FILENAMES[0]), "--eval-size", "32",
              "--no-progress"]
    assert evaluate(["--fid-stats-from", str(root / "real"), "--save-stats", str(tmp_path / "real.npz"),
                     *common]) == 0
    prompts = write_prompts(tmp_path / "metadata.csv", PROMPTS)
    out = tmp_path / "run"
    assert evaluate(["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--size", "64",
                     "--steps", "2", "--batch-size", "4", "--fid-stats", str(tmp_path / "real.npz"),
                     "--clip-model", str(root / "clip"), "--score-batch-size", "4", *common]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_images"] == N and scores["eval_size"] == 32 and (out / "grid.png").is_file()
    assert (out / "scores.md").read_text().splitlines()[-1].startswith(f"| run | {scores['fid']:.2f} | ")

    # FID: pytorch-fid's net with the same weights; the real images squashed to 32 px as the protocol does
    (tmp_path / "real32").mkdir()
    for path in sorted((root / "real").iterdir()):
        Image.open(path).convert("RGB").resize((32, 32)).save(tmp_path / "real32" / path.name)
    with mock.patch.object(pfid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        net = pfid_inception.InceptionV3([3]).eval()
    real = compute_statistics_of_path(str(tmp_path / "real32"), net, 5, 2048, "cpu", 0)
    fake = compute_statistics_of_path(str(out / "im256"), net, 5, 2048, "cpu", 0)
    assert scores["fid"] == pytest.approx(calculate_frechet_distance(*fake, *real), rel=1e-4)
    saved = np.load(tmp_path / "real.npz")
    assert np.abs(saved["mu"] - real[0]).max() <= 1e-4 * np.abs(real[0]).max() and int(saved["size"]) == 32

    # IS: torch-fidelity on the folder; random weights give near-flat posteriors, so compare the part above 1
    ref = calculate_metrics(input1=str(out / "im256"), isc=True, cuda=False, cache=False, verbose=False,
                            feature_extractor_weights_path=str(root / inception_layout.FILENAMES[1]),
                            save_cpu_ram=True)
    assert scores["is_mean"] - 1 == pytest.approx(ref["inception_score_mean"] - 1, rel=1e-3)
    assert scores["is_std"] == pytest.approx(ref["inception_score_std"], rel=1e-3, abs=1e-9)

    # CLIP score: BK-SDM's loop over open_clip's model, transform and tokenizer
    tokenizer = open_clip.get_tokenizer("ViT-g-14")
    images = [Image.open(out / "im256" / name) for name, _ in PROMPTS]
    expected = bk_sdm_scores(clip, reference_transform(224), tokenizer, images,
                             [text for _, text in PROMPTS]).mean()
    assert scores["clip_score"] == pytest.approx(float(expected), abs=1e-5)
