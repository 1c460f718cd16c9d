"""DreamBooth's scores (minisd/metrics/personalization.py): CLIP-I and CLIP-T equal what open_clip computes
with the same (random) weights, DINO's similarity is the cosine of transformers' ViTModel CLS outputs, and the
means (against the real photos, real against real without a photo's own pair) are checked by hand."""

import numpy as np
import open_clip
import pytest
import torch
from reference import perturb_, rel_diff
from safetensors.torch import save_file
from test_clip_score import SMALL_QUICK, images, reference_transform
from test_dino import SMALL, reference_vit

from minisd.metrics import personalization
from minisd.metrics.dino_weights import load_dino
from minisd.metrics.open_clip_weights import load_clip

PROMPTS = ["a dog in the jungle", "a red toy", "a cube shaped stuffed animal", "a dog wearing a santa hat",
           "a backpack on top of a white rug", "a shiny sneaker"]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(open_clip's CLIP, minisd's from its file), quick-GELU as OpenAI's ViT-B/32, DreamBooth's default."""
    torch.manual_seed(1)
    reference = perturb_(open_clip.model.CLIP(**SMALL_QUICK)).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, load_clip(str(path), config=SMALL_QUICK)


def test_clip_i_and_clip_t_equal_open_clip(clip):
    reference, ours = clip
    pil = images()
    generated, real = pil[:6], pil[6:10]
    transform, tokenizer = reference_transform(112), open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        gen = unit(reference.encode_image(torch.stack([transform(im) for im in generated])))
        ref = unit(reference.encode_image(torch.stack([transform(im) for im in real])))
        text = unit(reference.encode_text(tokenizer(PROMPTS)))
    clip_i = torch.stack([torch.stack([gen[i] @ ref[j] for j in range(4)]).mean() for i in range(6)])
    clip_t = torch.stack([gen[i] @ text[i] for i in range(6)])
    bound = torch.stack([torch.stack([ref[j] @ ref[k] for k in range(4) if k != j]).mean() for j in range(4)])

    got = personalization.clip_scores(ours, generated, PROMPTS, real, batch_size=4)
    assert np.abs(got["clip_i"] - clip_i.double().numpy()).max() < 1e-5
    assert np.abs(got["clip_t"] - clip_t.double().numpy()).max() < 1e-5
    assert np.abs(got["clip_i_real"] - bound.double().numpy()).max() < 1e-5
    with pytest.raises(ValueError, match="6 images but 5 prompts"):
        personalization.clip_scores(ours, generated, PROMPTS[:5], real)


def test_dino_similarity_is_the_cosine_of_vitmodel_cls(tmp_path):
    reference = reference_vit(SMALL, seed=2)
    reference.save_pretrained(tmp_path / "hub")
    dino = load_dino(tmp_path / "hub")
    pil = images()
    similarity = personalization.embedding_similarity(dino, batch_size=3)(pil[:5], pil[5:8])
    with torch.no_grad():
        cls = unit(reference(pixel_values=dino.preprocess(pil)).last_hidden_state[:, 0])
    assert similarity.shape == (5, 3)
    assert rel_diff(cls[:5] @ cls[5:8].T, similarity) < 1e-5


def test_means_by_hand():
    similarity = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]])
    # the diagonal (a photo with itself) left out
    assert np.allclose(personalization.real_versus_real(similarity), [0.35, 0.45, 0.3])
    assert np.allclose(personalization.versus_real(similarity[:2]), [1.7 / 3, 1.9 / 3])
    with pytest.raises(ValueError, match="at least two real images"):
        personalization.real_versus_real(similarity[:1, :1])
