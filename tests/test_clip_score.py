"""CLIP score: minisd's CLIP (both towers, preprocessing, tokenizer, open_clip loading) against open_clip.

The reference is open_clip's own CLIP with random weights (every 1-d parameter perturbed, and the
position embeddings too), saved in open_clip's file layouts and loaded through `load_clip`, the
path real weights take. The score is computed as BK-SDM's eval_clip_score.py computes it.
"""

import json

import numpy as np
import open_clip
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from reference import perturb_, rel_diff
from safetensors.torch import save_file

from minisd.metrics import open_clip_weights as oc_layout
from minisd.checkpoints.ldm import split_in_proj
from minisd.metrics.open_clip_weights import PRETRAINED, config_from_open_clip, load_clip
from minisd.checkpoints.remap import CheckpointError, rename
from minisd.clip_vision import preprocess
from minisd.metrics.clip_model import PRESETS, CLIPModel
from minisd.metrics.clip_score import clip_score, folder_clip_score
from minisd.metrics.clip_tokenizer import OpenCLIPTokenizer

# Small open_clip configs: ViT-g-14's fractional mlp_ratio with exact GELU; quick-GELU at 112 px.
SMALL = {"embed_dim": 32,
         "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 16, "mlp_ratio": 4.3637,
                        "patch_size": 16},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
SMALL_QUICK = {"embed_dim": 48, "quick_gelu": True,
               "vision_cfg": {"image_size": 112, "layers": 3, "width": 96, "head_width": 32,
                              "patch_size": 14},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}

PROMPTS = [
    "a black vase holding a bouquet of roses", "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park.", "the man’s “hat” — isn’t it odd?",
    "fish &amp; chips &EACUTE;", "ﬁsh and ﬂowers ＡＢＣ　ｘ", "wow!!! amazing!!",
    "a <|endoftext|> b",
    "x <end_of_text> y", "hello.<end_of_text> z", "  lots   of\tspace\n and\r\nlines\u2028",
    "café crème brûlée", "ΟΔΟΣ ΣΑΣ", "'ſ and I'M HERE, you'll see", "3.14159 apples, 42 pears",
    "日本語のテキスト 🚀🎉",
    "", "   ", "\x93quoted\x94 \x85 tail", "ctrl\x00\x1b[31mred\x1b[0m\ufeff",
    "\ud83d\udca9 and a lone \ud800", "a < b &amp; c &lt;tag&gt;",
    "&#65;&#x42; &#99999999; &notanentity; &not this", "ǅemal ĳs ﬂuﬃeﬆ",
    "An İstanbul street, Straße",
    "a\u00a0b\u2009c\u3000d", "e-mail: someone@example.com #tag", "A RED BUS on a STREET", "pizza🍕pizza",
    "word " * 100, "a photo of " + "a very long caption, " * 20,
]


def images() -> list[Image.Image]:
    """Noise and smooth images of several sizes, aspects and modes."""
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
             for w, h in [(256, 256), (300, 200), (200, 300), (224, 224), (225, 641), (257, 257), (20, 30)]]
    ramp = np.linspace(0, 255, 640 * 427 * 3).reshape(427, 640, 3).astype(np.uint8)
    return noise + [Image.fromarray(ramp), noise[0].convert("L"), noise[1].convert("RGBA"),
                    noise[2].convert("P", palette=Image.ADAPTIVE)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{config name: (open_clip model, safetensors path)} for both small configs."""
    out = {}
    for name, cfg in (("small", SMALL), ("quick", SMALL_QUICK)):
        torch.manual_seed(0)
        model = perturb_(open_clip.model.CLIP(**cfg)).eval()
        with torch.no_grad():
            for p in (model.positional_embedding, model.visual.positional_embedding):
                p.add_(0.1 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(name) / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        out[name] = (model, path)
    return out


def reference_transform(size: int):
    """What create_model_and_transforms returns as `preprocess` for laion2b_s34b_b88k."""
    return open_clip.image_transform(size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                                     resize_mode="shortest", interpolation="bicubic")


def bk_sdm_scores(model, transform, tokenizer, pil_images, prompts) -> np.ndarray:
    """BK-SDM's eval_clip_score.py loop: one image and one prompt at a time."""
    scores = []
    for image, prompt in zip(pil_images, prompts):
        with torch.no_grad():
            image_features = model.encode_image(transform(image).unsqueeze(0))
            text_features = model.encode_text(tokenizer([prompt]))
        image_features /= image_features.norm(dim=-1, keepdim=True)
        text_features /= text_features.norm(dim=-1, keepdim=True)
        scores.append((text_features.numpy() @ image_features.numpy().T)[0][0])
    return np.array(scores)


@pytest.mark.parametrize("size", [224, 112])
def test_preprocess_equals_open_clip_transform(size):
    transform = reference_transform(size)
    for image in images():
        ours, theirs = preprocess(image, size), transform(image)
        assert ours.shape == theirs.shape == (3, size, size)
        assert torch.equal(ours, theirs), (image.size, image.mode, (ours - theirs).abs().max().item())


def test_pretrained_table_matches_open_clip():
    """Hub repos and normalisation of the tags minisd knows are open_clip's own."""
    for (name, tag), (repo, mean, std) in PRETRAINED.items():
        cfg = open_clip.get_pretrained_cfg(name, tag)
        assert cfg["hf_hub"] == repo + "/"
        assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (mean, std)
        assert (cfg["interpolation"], cfg["resize_mode"]) == ("bicubic", "shortest")


def test_tokenizer_equals_open_clip():
    theirs = open_clip.get_tokenizer("ViT-g-14")(PROMPTS)
    ours = OpenCLIPTokenizer()(PROMPTS)
    for prompt, a, b in zip(PROMPTS, theirs, ours):
        assert torch.equal(a, b), (prompt, a[:12].tolist(), b[:12].tolist())
    assert ours[PROMPTS.index("word " * 100), -1] == 49407  # cut to 77, <end_of_text> kept last
    empty = ours[PROMPTS.index("")]
    assert empty[:2].tolist() == [49406, 49407] and empty[2:].eq(0).all()  # padded with zeros


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_equal_open_clip(name):
    """Each preset is what open_clip's config gives, with open_clip's parameter count (on the meta device)."""
    assert config_from_open_clip(open_clip.get_model_config(name)) == PRESETS[name]
    with torch.device("meta"):
        ours, theirs = CLIPModel(PRESETS[name]), open_clip.model.CLIP(**open_clip.get_model_config(name))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel()
               for p in ours.visual.parameters()) == sum(p.numel() for p in theirs.visual.parameters())


@pytest.mark.slow  # 31 ViTs up to ViT-e-14, built twice (ours and open_clip's)
def test_every_plain_open_clip_vit_maps_key_for_key():
    """Each open_clip config minisd accepts (31 plain ViTs, ViT-B-16-plus-240 to ViT-e-14) builds a model
    whose remapped keys and shapes are exactly open_clip's; the others (ResNets, SigLIP, EVA, CoCa...)
    are refused by name. Built on the meta device."""
    accepted = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        try:
            ours_cfg = config_from_open_clip(cfg)
        except ValueError as e:
            assert "not supported" in str(e)
            continue
        accepted.append(name)
        with torch.device("meta"):
            ours, theirs = CLIPModel(ours_cfg), open_clip.model.CLIP(**cfg)
        want = {k: v.shape for k, v in split_in_proj(theirs.state_dict()).items()}
        got = {rename(k, oc_layout.RULES): v.shape for k, v in ours.state_dict().items()}
        assert got == want, name
    assert len(accepted) >= 31 and {"ViT-g-14", "ViT-H-14-378-quickgelu", "ViT-bigG-14"} <= set(accepted)


@pytest.mark.parametrize("name,cfg", [("small", SMALL), ("quick", SMALL_QUICK)])
def test_embeddings_and_score_equal_open_clip(references, name, cfg):
    reference, path = references[name]
    model = load_clip(str(path), config=cfg)
    size = cfg["vision_cfg"]["image_size"]
    transform, tokenizer = reference_transform(size), open_clip.get_tokenizer("ViT-g-14")
    pil = images()
    with torch.no_grad():
        image_ref = reference.encode_image(torch.stack([transform(im) for im in pil]))
        image_ours = model.encode_image(model.preprocess(pil))
        text_ref = reference.encode_text(tokenizer(PROMPTS))
        text_ours = model.encode_text(model.tokenize(PROMPTS))
    assert rel_diff(image_ref, image_ours) < 1e-4
    assert rel_diff(text_ref, text_ours) < 1e-4
    assert model.logit_scale.item() == reference.logit_scale.item()

    pil, prompts = pil[:6], PROMPTS[:6]
    expected = bk_sdm_scores(reference, transform, tokenizer, pil, prompts)
    mean, per_image = clip_score(model, pil, prompts, batch_size=4)
    assert per_image.shape == (6,) and np.abs(per_image - expected).max() < 1e-4
    assert abs(mean - expected.mean()) < 1e-4


def test_file_layouts_load_alike(references, tmp_path):
    """A .pt with a `state_dict` wrapper and DDP's `module.` prefix, and a hub-style folder whose
    open_clip_config.json gives the architecture, load the same weights as the safetensors file."""
    reference, path = references["small"]
    wrapped = tmp_path / "epoch_32.pt"
    ddp = {"module." + k: v.reshape(1) if k == "logit_scale" else v
           for k, v in reference.state_dict().items()}
    torch.save({"epoch": 32, "state_dict": ddp}, wrapped)  # logit_scale as [1], as some checkpoints have it
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL, "preprocess_cfg": {
        "mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
        "resize_mode": "shortest"}}))
    expected = load_clip(str(path), config=SMALL).state_dict()
    for model in (load_clip(str(wrapped), config=SMALL), load_clip(str(folder))):
        got = model.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_folder_clip_score(references, tmp_path):
    reference, path = references["small"]
    model = load_clip(str(path), config=SMALL)
    pil = [im.convert("RGB") for im in images()[:5]]
    rows = [(f"{i:05d}.png", prompt) for i, prompt in enumerate(PROMPTS[:5])]
    for image, (name, _) in zip(pil, rows):
        image.save(tmp_path / name)
    mean, per_image = folder_clip_score(tmp_path, rows, model, batch_size=2, progress=False)
    expected = bk_sdm_scores(reference, reference_transform(224), open_clip.get_tokenizer("ViT-g-14"), pil,
                             PROMPTS[:5])
    assert np.abs(per_image - expected).max() < 1e-4 and abs(mean - expected.mean()) < 1e-4

    with pytest.raises(FileNotFoundError, match=r"2 of 7 images are missing .*00005\.png, 00006\.png"):
        folder_clip_score(tmp_path, rows + [("00005.png", "x"), ("00006.png", "y")], model, progress=False)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        folder_clip_score(tmp_path, [("broken.png", "x")], model, progress=False)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_score(model, pil[:3], PROMPTS[:2])


def test_missing_and_unexpected_keys_are_named(references, tmp_path):
    reference, _ = references["small"]
    sd = dict(reference.state_dict())
    del sd["visual.ln_post.bias"], sd["text_projection"]
    sd["visual.attn_pool.query"] = torch.zeros(3)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bad))
    with pytest.raises(CheckpointError) as err:
        load_clip(str(bad), config=SMALL)
    message = str(err.value)
    assert ("visual.ln_post.bias" in message and "text_projection" in message
            and "visual.attn_pool.query" in message)


def test_unsupported_configs_are_refused(tmp_path):
    coca_like = {**SMALL, "vision_cfg": {**SMALL["vision_cfg"], "attentional_pool": True, "no_ln_pre": True}}
    with pytest.raises(ValueError, match=r"vision_cfg\.attentional_pool=True, vision_cfg\.no_ln_pre=True"):
        config_from_open_clip(coca_like)
    with pytest.raises(ValueError, match="pass config="):
        load_clip("ViT-Q-99")
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="no model config for"):
        load_clip(str(weights))


def test_offline_download_says_what_to_do(monkeypatch, tmp_path):
    calls = []

    def offline(repo_id, filename, **kwargs):
        calls.append(filename)
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(oc_layout.huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConnectionError) as err:
        load_clip("ViT-g-14", cache_dir=tmp_path)
    message = str(err.value)
    assert calls == ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for part in ("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", "hf download", "open_clip_model.safetensors",
                 "pretrained"):
        assert part in message


def test_download_falls_back_on_the_bin_file(monkeypatch, tmp_path):
    """Repos without open_clip_model.safetensors are read from open_clip_pytorch_model.bin, as open_clip
    does."""
    def hub(repo_id, filename, **kwargs):
        if filename.endswith(".safetensors"):
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(tmp_path / filename)

    monkeypatch.setattr(oc_layout.huggingface_hub, "hf_hub_download", hub)
    assert oc_layout.download("laion/some-clip", tmp_path) == tmp_path / "open_clip_pytorch_model.bin"


@pytest.mark.slow
def test_full_size_vit_b32_by_preset_name(tmp_path):
    """The real ViT-B-32 architecture (151M), loaded by preset name with a local `pretrained` file."""
    torch.manual_seed(0)
    reference = perturb_(open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32"))).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = load_clip("ViT-B-32", pretrained=str(path))
    pil, prompts = images()[:3], PROMPTS[:3]
    expected = bk_sdm_scores(reference, reference_transform(224), open_clip.get_tokenizer("ViT-B-32"), pil,
                             prompts)
    mean, per_image = clip_score(model, pil, prompts)
    assert np.abs(per_image - expected).max() < 1e-4 and abs(mean - expected.mean()) < 1e-4
