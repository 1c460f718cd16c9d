"""open_clip's tokenizer (open_clip/tokenizer.py, SimpleTokenizer), as the CLIP score uses it.

It shares CLIP's vocabulary and BPE merges with SD's tokenizer (minisd/tokenizer.py), but prepares
the text differently, so the same prompt can give other ids:
1. clean: ftfy.fix_text, html.unescape twice, strip; then every whitespace run -> one space, and
   Python's str.lower() (which writes a word-final Greek sigma as "ς");
2. split with CLIP's regex, case-insensitively (so "'ſ" is a contraction, as in open_clip); the
   specials are spelled "<start_of_text>"/"<end_of_text>" and are only recognised where the regex
   starts a piece; no other text is special (a prompt's "<|endoftext|>" is plain text here);
3. BPE each piece's UTF-8 bytes; <start_of_text> + ids + <end_of_text>, cut to 77 with
   <end_of_text> kept last, padded with 0.

`clean` carries ftfy 6's text fixes (ftfy/__init__.py fix_text, ftfy/fixes.py, ftfy/chardata.py),
ported since ftfy is no minisd dependency: HTML entities, C1 controls read as Windows-1252, Latin
ligatures, full/half-width forms, curly quotes, line breaks, UTF-16 surrogates, terminal escapes,
control characters and NFC, repeated until nothing changes. Not ported: ftfy's mojibake repair
(fix_encoding, e.g. "cafÃ©" -> "café"), a statistical guess that changes only text that decodes as
mis-encoded UTF-8; such prompts keep their mojibake here.
"""

import functools
import html
import itertools
import re
import unicodedata

import torch
from tokenizers import Regex, pre_tokenizers
from tokenizers.models import BPE

from minisd.tokenizer import MAX_LENGTH, builtin_vocab, bytes_to_unicode

SPECIALS = {"<start_of_text>": 49406, "<end_of_text>": 49407}  # open_clip's names for ids 49406/49407
PATTERN = r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
PAD_ID = 0  # open_clip pads with zeros (the id of "!")

# ---- ftfy's fixes, in fix_text's order -------------------------------------------------------

_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ENTITIES = {}  # HTML5's entities ending in ";", and the all-caps forms of the lowercase ones
for _name, _char in html.entities.html5.items():
    if _name.endswith(";"):
        _ENTITIES["&" + _name] = _char
        if _name == _name.lower() and html.unescape("&" + _name.upper()) == "&" + _name.upper():
            _ENTITIES["&" + _name.upper()] = _char.upper()
# C1 controls U+80..U+9F read as Windows-1252 bytes; its five undefined bytes stay as they are.
_C1 = {c: bytes([c]).decode("cp1252", errors="ignore") or chr(c) for c in range(0x80, 0xA0)}
_LIGATURES = dict(zip(map(ord, "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ"),
                      ["IJ", "ij", "ʼn", "DZ", "Dz", "dz", "DŽ", "Dž", "dž", "LJ", "Lj", "lj", "NJ", "Nj",
                       "nj", "ff", "fi", "fl", "ffi", "ffl", "ſt", "st"]))
_WIDTH = {0x3000: " "} | {c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(c)) != chr(c)}
_QUOTES = {**{c: "'" for c in [0x2BC, *range(0x2018, 0x201C)]}, **{c: '"' for c in range(0x201C, 0x2020)}}
_LINE_BREAKS = {"\r\n": "\n", "\r": "\n", "\u2028": "\n", "\u2029": "\n", "\u0085": "\n"}
_SURROGATE_PAIR, _SURROGATE = re.compile("[\ud800-\udbff][\udc00-\udfff]"), re.compile("[\ud800-\udfff]")
_ANSI = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_CONTROL = dict.fromkeys(itertools.chain(range(0x00, 0x09), [0x0B], range(0x0E, 0x20), [0x7F],
                                         range(0x206A, 0x2070), [0xFEFF], range(0xFFF9, 0xFFFD)))


def _unescape(m: re.Match) -> str:
    entity = m.group(0)
    if entity in _ENTITIES:
        return _ENTITIES[entity]
    if entity.startswith("&#"):
        out = html.unescape(entity)
        return entity if ";" in out else out  # only whole references, semicolon consumed
    return entity


def _pair(m: re.Match) -> str:
    high, low = map(ord, m.group(0))
    return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))


def _fix_segment(text: str) -> str:
    unescape = "<" not in text  # ftfy's "auto": a literal "<" means HTML, whose entities stay
    while True:
        before = text
        if unescape:
            text = _ENTITY.sub(_unescape, text)
        text = re.sub("[\x80-\x9f]", lambda m: _C1[ord(m.group(0))], text)
        text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
        for old, new in _LINE_BREAKS.items():
            text = text.replace(old, new)
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_pair, text))
        text = _ANSI.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """ftfy.fix_text without its mojibake repair: each line (with its newline) is fixed on its own."""
    return "".join(_fix_segment(line) for line in re.findall(r"[^\n]*\n|[^\n]+", text))


def clean(text: str) -> str:
    """open_clip's `_clean_lower`: basic_clean, whitespace_clean, lower."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split()).lower()


# ---- the tokenizer --------------------------------------------------------------------------


class OpenCLIPTokenizer:
    """Prompts -> token ids [B, 77], equal to `open_clip.get_tokenizer("ViT-g-14")(prompts)`."""

    def __init__(self, context_length: int = MAX_LENGTH):
        vocab, merges = builtin_vocab()
        self.context_length = context_length
        self.bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
        self.split = pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True)
        self.byte_chars = bytes_to_unicode()

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids, without <start_of_text>, <end_of_text>, truncation or padding."""
        ids = []
        for piece, _ in self.split.pre_tokenize_str(clean(prompt)):
            if piece in SPECIALS:
                ids.append(SPECIALS[piece])
            else:
                ids += [t.id
                        for t in self.bpe.tokenize("".join(self.byte_chars[b]
                                                           for b in piece.encode("utf-8")))]
        return ids

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = torch.full((len(prompts), self.context_length), PAD_ID, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = [SPECIALS["<start_of_text>"], *self.encode(prompt), SPECIALS["<end_of_text>"]]
            if len(ids) > self.context_length:  # cut, and still end with <end_of_text>
                ids = ids[:self.context_length - 1] + ids[-1:]
            out[row, :len(ids)] = torch.tensor(ids)
        return out


@functools.lru_cache(maxsize=4)
def open_clip_tokenizer(context_length: int = MAX_LENGTH) -> OpenCLIPTokenizer:
    """A shared tokenizer (building one reads the merge list, about half a second)."""
    return OpenCLIPTokenizer(context_length)
