"""Parity of minisd's CLIP tokenizer with transformers' CLIPTokenizer, as diffusers calls it
(padding="max_length", max_length=77, truncation=True), on SD-v1 and SD-v2 tokenizer folders
built from the real CLIP vocabulary (open-clip-torch's copy, as docs/testing.md describes)."""

import json
import random
from pathlib import Path

import pytest
import torch
from reference import hub_folder
from tokenizers.models import BPE
from transformers import CLIPTokenizer as HFTokenizer

from minisd.checkpoints.diffusers import load_tokenizer, save_tokenizer
from minisd.tokenizer import CLIPTokenizer, builtin_vocab

PADS = {"v1": "<|endoftext|>", "v2": "!"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {family: hub_folder(root / family, pad) for family, pad in PADS.items()}


WORDS = ["a", "black", "vase", "holding", "bouquet", "of", "roses", "Photo", "HDR", "4k", "8K", "3.14",
         "1,000", "2024-01-01", "don't", "it's", "I'M", "we'll", "they've", "you'd", "o'clock", "rock'n'roll",
         "hello!!!", "wow?!", "!", "...", "--", "&amp;", "#hashtag", "@user", "e-mail", "C++", "x86_64",
         "best_quality", "(masterpiece:1.2)", "[bracket]", "{brace}", '"quoted"', "\\",
         "café", "naïve", "cafe\u0301", "Ångström", "ﬁne", "Straße", "İstanbul", "Σίσυφος",
         "Москва",
         "こんにちは", "東京タワー", "한국어", "中文字符",
         "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "♥", "™", "½", "①", "٣",
         "<|endoftext|>", "<|EndOfText|>", "<|startoftext|>", "<|", "|>", "\u200b",
         "ARTSTATION", "by", "greg", "rutkowski", "1girl"]
SEPARATORS = [" "] * 8 + ["  ", "\t", "\n", " \n\t ", "\u3000", "\u00a0", "", ",", ", "]
ODD_CHARS = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x4E00, 0x4E80),
             (0x1F300, 0x1F64F)]


def prompts(n: int = 1200) -> list[str]:
    rng = random.Random(0)
    out = ["", " ", "\t\n ", "a black vase", "A  BLACK\tvase\n", "x " * 100, "!!!" * 40]
    while len(out) < n:
        if rng.random() < 0.15:  # random characters from scripts, marks and emoji blocks
            lo, hi = rng.choice(ODD_CHARS)
            text = "".join(chr(rng.randint(lo, hi)) if rng.random() < 0.8 else " "
                           for _ in range(rng.randint(1, 30)))
        else:  # words; one in ten prompts too long for 77 tokens
            length = rng.randint(40, 120) if rng.random() < 0.1 else rng.randint(1, 20)
            text = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(length))
        out.append(rng.choice(["", " ", "\n"]) + text)
    return out


def reference_ids(tokenizer: HFTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


def assert_same_ids(ours: torch.Tensor, want: torch.Tensor, texts: list[str]) -> None:
    assert ours.shape == want.shape == (len(texts), 77)
    wrong = [(texts[i], ours[i].tolist(), want[i].tolist()) for i in range(len(texts))
             if not torch.equal(ours[i], want[i])]
    assert not wrong, f"{len(wrong)} prompts differ, first: {wrong[0]}"


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_matches_transformers(family, folders):
    texts = prompts()
    ref = HFTokenizer.from_pretrained(folders[family])
    ours = load_tokenizer(folders[family])
    assert sum(ours.truncated(t) is not None for t in texts) > 50  # enough prompts that need truncating
    assert ours.pad_token == PADS[family] and ours.max_length == ref.model_max_length == 77
    assert_same_ids(ours(texts), reference_ids(ref, texts), texts)


def test_known_ids(folders):
    for tokenizer in (CLIPTokenizer.builtin(), load_tokenizer(folders["v1"])):
        ids = tokenizer("a black vase")
        assert ids[0, :5].tolist() == [49406, 320, 1449, 20431, 49407]
        assert ids[0, 5:].eq(49407).all()
    assert CLIPTokenizer.builtin(pad_token="!")(["a black vase", ""])[:, 5:].eq(0).all()
    # "!!!" is one token, unless "!" pads
    assert CLIPTokenizer.builtin()("hello!!!")[0, :4].tolist() == [49406, 3306, 995, 49407]
    assert CLIPTokenizer.builtin("!")("hello!!!")[0, :6].tolist() == [49406, 3306, 0, 0, 0, 49407]


def test_builtin_equals_files(folders):
    vocab, merges = BPE.read_file(str(folders["v1"] / "vocab.json"), str(folders["v1"] / "merges.txt"))
    assert builtin_vocab() == (vocab, merges)
    texts = prompts(200)
    assert torch.equal(CLIPTokenizer.builtin("!")(texts), load_tokenizer(folders["v2"])(texts))


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_save_round_trip(family, folders, tmp_path):
    ours = CLIPTokenizer.builtin(pad_token=PADS[family])
    save_tokenizer(ours, tmp_path)
    for name in ("vocab.json", "special_tokens_map.json", "tokenizer_config.json"):
        json.loads((tmp_path / name).read_text(encoding="utf-8"))
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8") == \
        (folders[family] / "merges.txt").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == \
        json.loads((folders[family] / "vocab.json").read_text(encoding="utf-8"))
    texts = prompts(300)
    ref = HFTokenizer.from_pretrained(tmp_path)
    assert ref.pad_token == PADS[family] and ref.model_max_length == 77
    assert_same_ids(ours(texts), reference_ids(ref, texts), texts)
    again = load_tokenizer(tmp_path)
    assert again.pad_token == PADS[family] and torch.equal(again(texts), ours(texts))


def test_truncated_reports_what_diffusers_warns_about(folders):
    ours, ref = load_tokenizer(folders["v1"]), HFTokenizer.from_pretrained(folders["v1"])
    assert ours.truncated("a black vase") is None
    assert ours.truncated("x " * 75) is None
    for text in [t for t in prompts(400) if ours.truncated(t)][:20]:
        kept, dropped = ours.truncated(text)
        # StableDiffusionPipeline.encode_prompt: the ids past the 76th, decoded, are what it warns were
        # removed
        untruncated = ref(text, padding="longest", return_tensors="pt").input_ids
        assert dropped == ref.batch_decode(untruncated[:, 76:-1])[0]
        assert kept == ref.decode(untruncated[0, 1:76])
