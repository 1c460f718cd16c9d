"""The DreamBooth data set (google/dreambooth's dataset/): subjects, their classes, the protocol's prompts.

The data set (Ruiz et al., 2023, arXiv 2208.12242, sec. 4.1) is a folder per subject (30 of them, 4-6 photos
each) and `prompts_and_classes.txt`, which lists each subject's class (`subject_name,class` rows, e.g.
`dog2,dog` or `bear_plushie,stuffed animal`) and two lists of 25 prompt templates written as Python,
`'a {0} {1} in the jungle'.format(unique_token, class_token)`: {0} is the subject's identifier (a rare token
such as "sks") and {1} its class. Objects take the first list ("Object Prompts"), live subjects the second
("Live Subject Prompts"); the live subjects are the dogs and cats (the data set's README: "9 out of these
subjects are live subjects (dogs and cats)"), which the file does not mark otherwise.

For CLIP-T the prompt is scored with the identifier removed, so "a sks dog in the jungle" is compared as "a
dog in the jungle": the identifier means nothing to CLIP.
"""

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from minisd.images import IMAGE_SUFFIXES

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")
CLASS_HEADER = "subject_name,class"
SECTIONS = {"Object Prompts": "object", "Live Subject Prompts": "live"}
# one template per line: a quoted string, then .format(unique_token, class_token) and maybe a comma
TEMPLATE_LINE = re.compile(r"""^(?P<literal>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*"""
                           r"""\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?$""")


@dataclass(frozen=True)
class PromptsFile:
    classes: dict[str, str]         # subject name -> class, in the file's order
    object_prompts: tuple[str, ...]  # templates with {0} (identifier) and {1} (class)
    live_prompts: tuple[str, ...]


@dataclass(frozen=True)
class Subject:
    name: str                 # its folder in the data set
    class_name: str           # "dog", "stuffed animal"
    images: tuple[Path, ...]  # its real photos, in name order

    @property
    def live(self) -> bool:
        return self.class_name in LIVE_CLASSES


class Row(NamedTuple):
    """One image to generate: (file_name, prompt) first, as minisd.evaluation.generate reads rows."""
    file_name: str    # SUBJECT/PP-K.png: prompt PP of the subject's list, image K of that prompt
    prompt: str       # with the identifier: "a sks dog in the jungle"
    clip_prompt: str  # without it, for CLIP-T: "a dog in the jungle"
    subject: str


def read_prompts_file(path: Path) -> PromptsFile:
    """The class table and both template lists of a prompts_and_classes.txt; errors name the line."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} (the data set's {PROMPTS_FILE}, "
                                "google/dreambooth's dataset/)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file, so not a {PROMPTS_FILE}") from None
    classes, prompts, section = {}, {"object": [], "live": []}, None
    for number, line in enumerate((line.strip() for line in lines), 1):
        if line == CLASS_HEADER or line in SECTIONS:
            section = SECTIONS.get(line, "classes")
        elif not line:
            section = None if section == "classes" else section  # a blank line ends the class table
        elif section == "classes":
            name, comma, class_name = (part.strip() for part in line.partition(","))
            if not (comma and name and class_name):
                raise ValueError(f"{path}, line {number}: expected subject_name,class, got {line!r}")
            classes[name] = class_name
        elif section in prompts and (match := TEMPLATE_LINE.match(line)):
            prompts[section].append(check_template(ast.literal_eval(match["literal"]), path, number))
        elif section in prompts and not (line.startswith("prompt_list") or line == "]"):
            raise ValueError(f"{path}, line {number}: expected a prompt template, "
                             f"'...'.format(unique_token, class_token), got {line!r}")
    missing = [what for what, found in (("subject_name,class table", classes),
                                        ("Object Prompts list", prompts["object"]),
                                        ("Live Subject Prompts list", prompts["live"])) if not found]
    if missing:
        raise ValueError(f"{path} is not in the format of google/dreambooth's {PROMPTS_FILE}: it has no "
                         f"{', no '.join(missing)}")
    return PromptsFile(classes, tuple(prompts["object"]), tuple(prompts["live"]))


def check_template(template: str, path: Path, number: int) -> str:
    """A template that fills: both {0} and {1}, and no other field."""
    try:
        filled = template.format("\0id", "\0class")
    except (IndexError, KeyError, ValueError):
        filled = ""
    if "\0id" not in filled or "\0class" not in filled:
        raise ValueError(f"{path}, line {number}: the template {template!r} must hold {{0}} (the identifier) "
                         "and {1} (the class), and no other field")
    return template


def read_subjects(folder: Path, prompts: PromptsFile) -> list[Subject]:
    """The subjects the class table lists, each with the photos in its folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"subjects folder not found: {folder} (google/dreambooth's dataset/, a "
                                "folder per subject)")
    subjects = []
    for name, class_name in prompts.classes.items():
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"no folder for subject {name!r} in {folder}; the prompts file lists it")
        images = tuple(sorted(p for p in (folder / name).iterdir()
                              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            raise ValueError(f"subject folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             "put the subject's photos there")
        subjects.append(Subject(name, class_name, images))
    return subjects


def templates(prompts: PromptsFile, subject: Subject) -> tuple[str, ...]:
    return prompts.live_prompts if subject.live else prompts.object_prompts


def expand(subjects: list[Subject], prompts: PromptsFile, identifier: str, per_prompt: int) -> list[Row]:
    """Every image of the protocol, subject by subject, prompt by prompt: 30 x 25 x 4 = 3,000 rows."""
    rows = []
    for subject in subjects:
        for p, template in enumerate(templates(prompts, subject)):
            prompt = template.format(identifier, subject.class_name)
            clip_prompt = " ".join(template.format("", subject.class_name).split())
            rows += [Row(f"{subject.name}/{p:02d}-{k}.png", prompt, clip_prompt, subject.name)
                     for k in range(per_prompt)]
    return rows
