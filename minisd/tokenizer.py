"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library.

It is assembled exactly as transformers' CLIPTokenizer assembles it
(transformers/models/clip/tokenization_clip.py), so a prompt gives the ids that diffusers feeds
the text encoder. A prompt goes through these steps:
1. special tokens are split out first (see `_special_tokens`);
2. normalize: Unicode NFC, every whitespace run -> one space, lowercase. OpenAI's original
   (openai/CLIP simple_tokenizer.py) also runs ftfy.fix_text and html.unescape; transformers'
   tokenizer does not, and neither does this one;
3. pre-tokenize with CLIP's regex into contractions, letter runs, single digits and runs of
   other symbols, dropping whitespace; then map every UTF-8 byte to a printable character
   (GPT-2's bytes_to_unicode), so BPE never meets an unknown symbol;
4. BPE, with "</w>" marking the end of each word ("a" -> "a</w>", id 320);
5. <|startoftext|>, at most 75 token ids, <|endoftext|>, then the pad id up to 77.

The vocabulary ships with the package: bpe_simple_vocab_16e6.txt.gz is OpenAI CLIP's merge
list (MIT licence, copied from open-clip-torch), from which `builtin()` derives vocab and merges.

The module does not need torch: `padded_ids` gives plain lists, which the ONNX runner
(minisd/onnx_runner.py) uses without PyTorch; only calling the tokenizer makes a torch tensor.
"""

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

if TYPE_CHECKING:
    import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length
BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # as simple_tokenizer.py: a 49,152-entry vocab less bytes and specials

# openai/CLIP simple_tokenizer.py's pattern, as transformers writes it for `tokenizers`
CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (openai/gpt-2
    encoder.py): printable bytes map to themselves, the others to chr(256), chr(257), ...
    Its order is the order of the first 256 vocabulary ids."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    others = [b for b in range(256) if b not in bs]
    return dict(zip(bs + others, map(chr, cs + [256 + n for n in range(len(others))])))


def builtin_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from the shipped merge list, as simple_tokenizer.py builds them:
    the 256 byte characters, the same with "</w>", one token per merge, then the two specials."""
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _special_tokens(pad_token: str) -> list[AddedToken]:
    """The tokens matched before BPE, flagged exactly as transformers ends up flagging them when it
    loads an SD hub folder (this decides what "<|ENDOFTEXT|>" or "!!!" inside a prompt encodes to).

    bos and eos are matched in the normalized (lowercased) text, as tokenizer_config.json marks
    them `normalized: true`. The pad token is written there as a plain string, which transformers
    matches in the raw text; it wins where it is also the eos (SD-v1). With SD-v2's pad "!", each
    "!" is its own token and "!!!" never merges, as in diffusers.
    """
    normalized = {BOS: True, EOS: True, pad_token: False}
    return [AddedToken(t, special=True, normalized=n) for t, n in normalized.items()]


class CLIPTokenizer:
    """Prompts -> token ids [B, 77]: <|startoftext|>, tokens (truncated to 75), <|endoftext|>, padding.

    pad_token: SD-v1 pads with "<|endoftext|>" (49407), SD-v2 with "!" (0).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 pad_token: str = EOS, max_length: int = MAX_LENGTH):
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.pad_token, self.max_length = pad_token, max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        tok = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        # invert=True keeps the regex matches as the pieces; "removed" drops what lies between
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(_special_tokens(pad_token))
        self.backend = tok

    @classmethod
    def builtin(cls, pad_token: str = EOS, max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        """CLIP's tokenizer from the vocabulary shipped in the package (no files needed)."""
        return cls(*builtin_vocab(), pad_token=pad_token, max_length=max_length)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path,
                   pad_token: str = EOS, max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        """A hub tokenizer folder: vocab.json, merges.txt, and the pad token and length from
        special_tokens_map.json (which transformers lets override) or tokenizer_config.json."""
        folder = Path(folder)

        def read(name: str) -> dict:  # {} for a file the folder does not have
            path = folder / name
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

        config, special = read("tokenizer_config.json"), read("special_tokens_map.json")
        pad = special.get("pad_token") or config.get("pad_token") or EOS
        pad = pad["content"] if isinstance(pad, dict) else pad  # an AddedToken written as a dict
        length = config.get("model_max_length", MAX_LENGTH)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=pad,
                                  max_length=length)
        if (folder / "tokenizer.json").is_file():
            # transformers >= 5 saves only tokenizer.json: its BPE model holds the same vocab and merges
            model = read("tokenizer.json")["model"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return cls(model["vocab"], merges, pad_token=pad, max_length=length)
        raise FileNotFoundError(f"no tokenizer in {folder}: expected vocab.json and merges.txt (or "
                                "tokenizer.json)")

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, without specials, truncation or padding."""
        return self.backend.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        # The byte-level decoder leaves the "</w>" word ends in the text; each stands for a space.
        return self.backend.decode(ids, skip_special_tokens=False).replace("</w>", " ").strip()

    def padded_ids(self, prompts: str | list[str]) -> list[list[int]]:
        """One row of max_length ids per prompt: <|startoftext|>, tokens (truncated), <|endoftext|>,
        padding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        keep = self.max_length - 2  # room for <|startoftext|> and <|endoftext|>
        rows = []
        for enc in self.backend.encode_batch(prompts, add_special_tokens=False):
            ids = [self.bos_id] + enc.ids[:keep] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return rows

    def __call__(self, prompts: str | list[str]) -> "torch.Tensor":
        import torch  # here only: the ONNX runner tokenizes (padded_ids) where torch is not installed

        rows = self.padded_ids(prompts)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def truncated(self, prompt: str) -> tuple[str, str] | None:
        """(kept text, dropped text) when the prompt is longer than fits, else None."""
        ids, keep = self.encode(prompt), self.max_length - 2
        return (self.decode(ids[:keep]), self.decode(ids[keep:])) if len(ids) > keep else None

    def save(self, folder: str | Path) -> None:
        """Write the four files of a hub tokenizer folder, which transformers also loads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.model.save(str(folder))  # vocab.json, and merges.txt under "#version: 0.2"
        token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        bos, eos = {"content": BOS, **token}, {"content": EOS, **token}
        added = {"__type": "AddedToken"}
        files = {"special_tokens_map.json": {"bos_token": bos, "eos_token": eos, "unk_token": eos,
                                             "pad_token": self.pad_token},
                 "tokenizer_config.json": {
                     "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                     "model_max_length": self.max_length, "tokenizer_class": "CLIPTokenizer",
                     "bos_token": {**added, **bos}, "eos_token": {**added, **eos},
                     "unk_token": {**added, **eos}, "pad_token": self.pad_token}}
        for name, data in files.items():  # as minisd.checkpoints.files writes configs: sorted keys, indent 2
            (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
