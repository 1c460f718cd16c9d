"""onnxruntime against minisd's PyTorch path on the CPU: seconds per image, file sizes, image differences.

    python -m minisd.export_bench                                  # the toy teacher and BK-SDM-Tiny, 256 px
    python -m minisd.export_bench --keep weights/onnx-bench        # keep the exports; reuse them next time
    python -m minisd.export_bench --models toy --size 64 --steps 3 --repeats 1 --out /tmp/smoke   # smoke run

Each model is exported three times with python -m minisd.export's own function: fp32, fp16, and fp32 with an
int8 U-Net. Then one image at a time, with the same prompt, seed, sampler (PNDM) and steps, CFG on (7.5),
from minisd's Pipeline and from the runner (minisd/onnx_runner.py) on each export, its onnxruntime sessions
opened beforehand (opening optimises the graphs, once per app start): `repeats` rounds, alternating the order
(A B C D, D C B A, ...), the median kept. Each export's image is compared with minisd's, pixel by pixel.

Each run is timed twice: CPU seconds (time.process_time, every thread of the process), the figure that other
jobs on a shared CPU disturb least, and wall seconds. With one thread for both libraries (the default), CPU
seconds are the time the image takes on one core.

BK-SDM-Tiny has random weights at its real architecture (CLIP ViT-L/14, SD's VAE): its speed does not depend
on the weights, but its image differences mean little; the toy teacher's are of trained weights.
Writes OUT/onnx-cpu-TAG.json and .md.
"""

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minisd.checkpoints.ldm import SD_SCHEDULER
from minisd.cli import positive_int
from minisd.clip import CLIPTextEncoder
from minisd.export import export_pipeline, file_bytes
from minisd.onnx_runner import MANIFEST, OnnxPipeline, import_onnxruntime, read_manifest
from minisd.pipeline import Pipeline, load_pipeline
from minisd.table import TEACHERS, variant
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae import AutoencoderKL

TOY = Path(__file__).resolve().parents[1] / "weights" / "toy-sd"
PROMPT = "a red circle above a blue square"
EXPORTS = {"fp32": dict(), "fp16": dict(dtype=torch.float16), "int8": dict(quantize="int8")}


def bk_tiny(dtype: torch.dtype = torch.float32) -> Pipeline:
    """BK-SDM-Tiny at its real size with random weights: 323M U-Net, CLIP ViT-L/14, SD's VAE."""
    torch.manual_seed(0)
    pipe = Pipeline(tokenizer=CLIPTokenizer.builtin(), text_encoder=CLIPTextEncoder(),
                    unet=UNet(variant(TEACHERS["v1"], "tiny")), vae=AutoencoderKL(),
                    scheduler_config=dict(SD_SCHEDULER), source="random BK-SDM-Tiny")
    return pipe.to(dtype=dtype)


MODELS = {"toy": lambda dtype: load_pipeline(TOY, dtype=dtype), "bk-tiny": bk_tiny}


def measure(name: str, size: int, steps: int, repeats: int, threads: int, exports: Path) -> dict:
    """One model's rows. Its exports go to `exports`, or come from there where a manifest shows them done."""
    pipe = MODELS[name](torch.float32)
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        model.eval().requires_grad_(False)
    runs, sizes = {"minisd": lambda: pipe(PROMPT, steps=steps, guidance=7.5, seed=0, height=size, width=size,
                                          progress=False, output="np")}, {}
    for kind, options in EXPORTS.items():
        folder = exports / f"{name}-{kind}"
        if (folder / MANIFEST).is_file():
            manifest = read_manifest(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # an export cut short
            source = MODELS[name](options["dtype"]) if "dtype" in options else pipe
            manifest = export_pipeline(source, folder, quantize=options.get("quantize"),
                                       log=lambda line: None)
        sizes[kind] = {part: file_bytes(folder / file) for part, file in manifest["files"].items()}
        runner = OnnxPipeline(folder, threads=threads)
        for graph in ("text_encoder", "unet", "vae_decoder"):
            runner.session(graph)
        runs[f"onnxruntime {kind}"] = (lambda runner=runner: runner(PROMPT, steps=steps, guidance=7.5, seed=0,
                                                                    height=size, width=size, output="np"))
    images, cpu, wall = {}, {label: [] for label in runs}, {label: [] for label in runs}
    order = list(runs)
    for r in range(repeats):
        for label in order if r % 2 == 0 else order[::-1]:
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            images[label] = runs[label]()
            cpu[label].append(time.process_time() - start_cpu)
            wall[label].append(time.perf_counter() - start_wall)
    rows = []
    for label in runs:
        gap = np.abs(images[label] - images["minisd"]) * 255
        kind = label.split()[-1]
        rows.append(dict(model=name, runtime=label, cpu_seconds=statistics.median(cpu[label]),
                         wall_seconds=statistics.median(wall[label]), all_cpu_seconds=cpu[label],
                         all_wall_seconds=wall[label], max_diff_255=float(gap.max()),
                         mean_diff_255=float(gap.mean()),
                         unet_bytes=sizes[kind]["unet"] if kind in sizes else None,
                         total_bytes=sum(sizes[kind].values()) if kind in sizes else None))
    return dict(rows=rows, parameters=sum(p.numel() for m in (pipe.text_encoder, pipe.unet, pipe.vae)
                                          for p in m.parameters()))


def mib(size: int | None) -> str:
    return "" if size is None else f"{size / 2**20:.1f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['size']} px, {s['steps']} PNDM steps ({s['steps'] + 1} U-Net calls at batch 2, CFG 7.5), "
             f"one image, {s['threads']} thread(s), median of {s['repeats']}",
             "",
             "| model | runtime | CPU s/image | speed vs minisd | wall s/image | U-Net MiB | all graphs MiB "
             "| max diff /255 | mean diff /255 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, model in result["models"].items():
        base = next(r["cpu_seconds"] for r in model["rows"] if r["runtime"] == "minisd")
        for r in model["rows"]:
            lines.append(f"| {name} | {r['runtime']} | {r['cpu_seconds']:.1f} | "
                         f"{base / r['cpu_seconds']:.2f}x | {r['wall_seconds']:.1f} | "
                         f"{mib(r['unet_bytes'])} | {mib(r['total_bytes'])} | "
                         f"{r['max_diff_255']:.2f} | {r['mean_diff_255']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisd.export_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["toy", "bk-tiny"])
    p.add_argument("--size", type=positive_int, default=256, help="pixels (default 256)")
    p.add_argument("--steps", type=positive_int, default=25, help="PNDM steps (default 25)")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed rounds (default 2)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="threads for torch and onnxruntime alike (default 1: a CPU shared with other jobs)")
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="write the exports here and keep them; finished ones found here are reused "
                        "(default: a temporary folder)")
    p.add_argument("--tag", default=None, help="file name tag (default: the models and size)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(size=args.size, steps=args.steps, repeats=args.repeats, threads=args.threads,
                    date=time.strftime("%Y-%m-%d"), cpu=platform.processor() or platform.machine(),
                    python=platform.python_version(), torch=torch.__version__,
                    onnxruntime=import_onnxruntime().__version__)
    result = dict(settings=settings, models={})
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            result["models"][name] = measure(name, args.size, args.steps, args.repeats, args.threads,
                                             args.keep or Path(scratch))
            print(markdown(result), flush=True)
    tag = args.tag or f"{'-'.join(args.models)}-{args.size}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"onnx-cpu-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"onnx-cpu-{tag}.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
