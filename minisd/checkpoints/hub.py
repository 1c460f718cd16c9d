"""Download a diffusers-layout repo from the Hugging Face hub into weights/hub/.

Only what minisd needs is fetched: the five components' configs, the tokenizer files and one
weight file per model component (safetensors first, .bin only as a fallback; the fp16 copy,
NAME.fp16.safetensors, when half precision is asked for and the repo has it). The safety checker
is never fetched.
"""

import functools
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError

CACHE = Path(__file__).resolve().parents[2] / "weights" / "hub"
COMPONENTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
              "text_encoder": ("model", "pytorch_model")}
ALWAYS = ["model_index.json", "*/config.json", "tokenizer/*", "scheduler/*"]
TIMEOUT = 5  # seconds for the first request to the hub: answers come in well under one


def looks_like_hub_id(source: str) -> bool:
    """`owner/name`, not an existing path."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists() and not source.startswith((".", "~"))


@functools.cache
def reachable() -> bool:
    """Whether the hub answers one short request (asked once per process). huggingface_hub retries a failed
    download five times, a warning each, for half a minute: offline, ask for the cached copy at once
    instead."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        huggingface_hub.utils.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=TIMEOUT)
    except Exception:  # no network, no DNS, a proxy that refuses: all mean the same here
        return False
    return True


def select_files(repo_files: list[str], half: bool) -> list[str]:
    """The one weight file per component that minisd loads, from a repo's file list."""
    precisions = ([".fp16"] if half else []) + [""]  # NAME.fp16.safetensors: the half-precision copy
    chosen = []
    for component, stems in COMPONENTS.items():
        candidates = [f"{component}/{stem}{precision}{suffix}" for precision in precisions
                      for suffix in (".safetensors", ".bin") for stem in stems]
        found = next((c for c in candidates if c in repo_files), None)
        if found is None:
            raise FileNotFoundError(f"the repo has no {component} weights "
                                    f"(looked for {', '.join(candidates)})")
        chosen.append(found)
    return chosen


def download(repo_id: str, half: bool = False, cache_dir: Path | None = None) -> Path:
    """The local folder of a hub repo's snapshot, downloading what is missing (into `cache_dir`, default
    CACHE)."""
    cache_dir = cache_dir or CACHE
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        # one request with a short timeout: model_info does not retry (list_repo_files retries five times,
        # with a warning each, for half a minute), so without network the error comes at once
        info = huggingface_hub.model_info(repo_id, timeout=TIMEOUT)
        files = select_files([s.rfilename for s in info.siblings or []], half)
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir,
                                                      allow_patterns=ALWAYS + files))
    except FileNotFoundError:
        raise
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"no model {repo_id!r} on the hub (and no such local path)") from None
    except Exception as online_error:  # no network, hub down, offline mode: fall back on the cache
        try:
            cached = ALWAYS + [f"{c}/*" for c in COMPONENTS]
            return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True,
                                                          allow_patterns=cached))
        except LocalEntryNotFoundError:
            reason = str(online_error).strip().split("\n")[0]
            raise ConnectionError(
                f"cannot download {repo_id!r} ({type(online_error).__name__}: {reason}) and it is not in "
                f"{cache_dir}. Without network, --model weights/toy-sd (the toy model in this repository) "
                f"still makes an image; for this model, run `hf download {repo_id} --local-dir DIR` on a "
                "machine with network and pass DIR (or a single .safetensors/.ckpt file) instead of the hub "
                "id.") from None
