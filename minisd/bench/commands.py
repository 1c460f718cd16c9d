"""python -m minisd.bench {sample,train,layout}: their arguments, and the run that writes their files (see
minisd/bench/__init__.py). gpu-check runs the same measurements through measure() below."""

import argparse
import sys
from pathlib import Path

import torch

from minisd.bench import layout, report, sampling, training
from minisd.bench.measure import device_peak, environment
from minisd.cli import nonnegative_int, positive_float, positive_int
from minisd.pipeline import DTYPES, default_dtype
from minisd.table import VARIANTS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minisd.bench", description=__doc__,
                                epilog="gpu-check, gpu-wheels: python -m minisd.bench gpu-check --help")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("sample", "minisd's pipeline against diffusers' StableDiffusionPipeline"),
                           ("train", "minisd's KD step against BK-SDM's reference KD step")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", nargs="+", choices=sorted(VARIANTS),
                       default=["small"] if name == "train" else ["sd"],
                       help="U-Net(s): the SD teacher or a BK-SDM student (train: the student; the teacher "
                            "is SD)")
        s.add_argument("--family", choices=["v1", "v2"], default="v1")
        s.add_argument("--small", action="store_true",
                       help="every model at reduced size (1/8-width U-Net, 2-layer text encoder, 2-level "
                            "VAE): smoke runs")
        s.add_argument("--size", type=positive_int, default=None,
                       help="pixels (default: the model's native 512)")
        s.add_argument("--batch", type=positive_int, nargs="+",
                       default=[1, 8, 32] if name == "sample" else [64],
                       help="batch sizes (train: per GPU)")
        s.add_argument("--compile", choices=["off", "on", "both"],
                       default="off" if name == "sample" else "on",
                       help="torch.compile the U-Nets (train: minisd's, on CUDA only, as train.py)")
        s.add_argument("--repeats", type=positive_int, default=3,
                       help="timed runs per library, alternating (median kept)")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads for torch (default: torch's); 1 on a CPU shared with other jobs, "
                            "where threads that wait for each other at every op stall for whole scheduler "
                            "slices")
        s.add_argument("--peak-tflops", type=positive_float, default=None,
                       help="the device's peak, for %% of peak (default: spec sheet on known GPUs, else a "
                            "measured matmul)")
        s.add_argument("--out", type=Path, default=Path("bench"),
                       help="folder for the JSON, Markdown and PNG")
        s.add_argument("--tag", default=None, help="file name tag (default: device and configs)")
        s.add_argument("--no-reference", action="store_true",
                       help="minisd alone (no diffusers or transformers needed)")
    s = sub.choices["sample"]
    s.add_argument("--scheduler", nargs="+", choices=["pndm", "lcm"], default=["pndm"],
                   help="pndm: 25 steps with CFG; lcm: an LCM U-Net (guidance distilled in), 4 steps, no CFG "
                        "pass; each --config runs with each")
    s.add_argument("--vae", nargs="+", choices=["sd", "tiny"], default=["sd"],
                   help="decoder: SD's KL VAE or TAESD, the tiny one; each --config runs with each")
    s.add_argument("--steps", type=positive_int, default=None,
                   help="steps for every --scheduler (default: pndm 25, so 26 U-Net calls; lcm 4)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    s.add_argument("--mode", default=None,
                   help="torch.compile mode for both libraries, e.g. reduce-overhead (CUDA graphs), "
                        "max-autotune")
    s.add_argument("--backend", default="inductor",
                   help="torch.compile backend for both libraries; eager: dynamo traces the U-Net as one "
                        "graph and runs it as traced, without generating code (gpu-check's dry run on a CPU)")
    s.add_argument("--unet-calls", type=positive_int, default=20, help="U-Net calls per timed block for it/s")
    lay = sub.add_parser("layout", help="the U-Net, its transformer and attention alone, minisd's layouts "
                                        "against diffusers, at 512 px on the CPU")
    lay.add_argument("--config", nargs="+", choices=sorted(VARIANTS), default=["sd", "tiny"])
    lay.add_argument("--small", action="store_true", help="reduced-size models: smoke runs")
    lay.add_argument("--size", type=positive_int, default=512, help="pixels (the latent is size / 8)")
    lay.add_argument("--variants", nargs="+", choices=list(layout.VARIANTS),
                     default=["plain", "fused + channels_last"],
                     help="minisd's layouts timed on the whole U-Net (each but plain holds a copy of it); "
                          "the transformer level times all four")
    lay.add_argument("--repeats", type=positive_int, default=5, help="timed calls per variant (median kept)")
    lay.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    lay.add_argument("--out", type=Path, default=Path("bench"), help="folder for the JSON and Markdown")
    lay.add_argument("--tag", default=None, help="file name tag (default: cpu and configs)")
    lay.add_argument("--no-reference", action="store_true", help="minisd alone")
    t = sub.choices["train"]
    t.add_argument("--steps", type=positive_int, default=5, help="steps per timed block")
    t.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps per library first")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="minisd's student with activation checkpointing")
    t.add_argument("--memory-probe", action="store_true",
                   help="CUDA: minisd's step alone at each --batch: fits or out of memory, and its peak")
    t.add_argument("--reference-only", action="store_true",
                   help="BK-SDM's reference step alone (gpu-check times train.py itself for minisd's side)")
    args = p.parse_args(argv)
    if args.command == "train" and args.reference_only and (args.no_reference or args.memory_probe):
        p.error("--reference-only times the reference step alone: leave out --no-reference and "
                "--memory-probe")
    if args.size is not None and (args.size < 16 or args.size % 16):
        p.error(f"--size must be a positive multiple of 16, not {args.size}")
    if args.command == "train" and args.memory_probe and not str(args.device).startswith("cuda"):
        p.error("--memory-probe measures GPU memory: it needs --device cuda")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process


def run(args, argv: list[str]) -> int:
    if args.command == "layout":
        return run_layout(args, argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("minisd.bench: error: --device cuda, but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 2
    try:
        rows, peak = measure(args)
    except ImportError as e:
        return no_reference(e)
    device = torch.device(args.device)
    settings = ([s for s in args.scheduler if s != "pndm"] + ["taesd" for v in args.vae if v == "tiny"]
                if args.command == "sample" else [])
    tag = args.tag or (f"{device.type}-{args.family}-{'-'.join(args.config + settings)}"
                       + ("-reduced" if args.small else ""))
    kind = "probe" if args.command == "train" and args.memory_probe else args.command
    paths = report.write(kind, rows, environment(device, argv), peak, args.out, tag)
    print(paths[1].read_text())
    print("\n".join(map(str, paths)))
    return 0


def no_reference(e: ImportError) -> int:
    print(f"minisd.bench: error: the reference side needs diffusers and transformers "
          f"(pip install -r requirements-test.txt): {e}", file=sys.stderr)
    return 2


def run_layout(args, argv: list[str]) -> int:
    try:
        rows = layout.run(args)
    except ImportError as e:
        return no_reference(e)
    env = environment(torch.device("cpu"), argv)
    tag = args.tag or f"cpu-{'-'.join(args.config)}-{args.size}" + ("-reduced" if args.small else "")
    paths = report.write("layout", rows, env, None, args.out, tag)
    print(paths[1].read_text())
    print("\n".join(map(str, paths)))
    return 0


def measure(args) -> tuple[list[dict], tuple[float, str]]:
    """The rows of `sample` or `train` as parse_args gave them, and the device's peak (TFLOP/s, its
    source)."""
    device = torch.device(args.device)
    if args.command == "sample":
        dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    else:
        dtype = default_dtype(device, training=True)  # the student's autocast dtype
    peak = device_peak(device, dtype, args.peak_tflops)
    args.peak_tflops = peak[0]  # measured once (on the CPU a matmul), then used by every row
    return (sampling if args.command == "sample" else training).run(args, device, dtype), peak
