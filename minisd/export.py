"""Export a pipeline to ONNX, for onnxruntime (python -m minisd.onnx_runner) and the runtimes that read ONNX.

    python -m minisd.export weights/toy-sd weights/toy-onnx
    python -m minisd.export nota-ai/bk-sdm-tiny weights/bk-tiny-onnx --height 512 --width 512
    python -m minisd.export weights/toy-sd weights/toy-onnx-fp16 --dtype fp16
    python -m minisd.export weights/toy-sd weights/toy-onnx-int8 --quantize int8
    python -m minisd.export weights/toy-sd weights/dog-onnx --lora dog.safetensors --lora-scale 0.8
    python -m minisd.export weights/my-tiny-lcm weights/lcm-onnx --vae weights/taesd

MODEL is anything load_pipeline reads: a hub id, a diffusers folder (train.py's and train_lcm.py's outputs
too), a single file. LoRAs are merged into the weights first and --vae swaps the VAE (TAESD), so the graphs
are plain ones. OUT_DIR gets:

    text_encoder.onnx   ids [B, 77] (int64) -> context [B, 77, D]
    unet.onnx           latents [B, 4, h, w], timestep [B] (float32), context [B, 77, D], and w [B] for an
                        LCM U-Net with a guidance embedding -> model_output (eps or v)
    vae_decoder.onnx    latents [B, 4, h, w] (the U-Net's; the 1 / scaling factor is inside) -> images
                        [B, 3, 8h, 8w] in [-1, 1]
    vae_encoder.onnx    images [B, 3, H, W] in [-1, 1] -> latent_mean, latent_std on the U-Net's scale
                        (TAESD: latents), for img2img
    tokenizer/          vocab.json, merges.txt and the special tokens, in transformers' layout
    scheduler/          scheduler_config.json
    manifest.json       the files and settings the runner reads; written last

B is dynamic; h and w too, unless --height and --width fix them. A graph whose weights pass 2 GB (protobuf's
limit on one file) keeps them in one NAME.onnx.data file beside it (ONNX's external data).

The graphs come from torch.onnx.export's TorchScript path (dynamo=False), which traces minisd's modules as
they run. The torch.export-based path, the default since torch 2.9, needs the onnxscript package; the
TorchScript one needs only torch, and with torch 2.14.1 gives graphs that equal minisd's modules to ~1e-6
(tests/test_export.py). torch 2.14 marks it deprecated. Each graph is run once in onnxruntime on the
inputs it was traced with, and its largest difference to minisd is printed and kept in the manifest.
"""

import argparse
import copy
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minisd.checkpoints.files import write_json
from minisd.checkpoints.lora_files import open_lora
from minisd.cli import BAD_INPUT, UsageError, check_writable_folder, finite_float
from minisd.clip import TEXT_ENCODERS
from minisd.onnx_runner import INSTALL, MANIFEST, import_onnxruntime
from minisd.pipeline import DTYPES, Pipeline, load_pipeline, load_vae, sampler_of
from minisd.table import VARIANTS
from minisd.vae_tiny import AutoencoderTiny

PROG = "python -m minisd.export"  # what its errors start with, argparse's and its own
FILES = {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx", "vae_decoder": "vae_decoder.onnx",
         "vae_encoder": "vae_encoder.onnx"}
# 14: the first opset with the TorchScript exporter's scaled_dot_product_attention; 20: its last
OPSETS = range(14, 21)
DEFAULT_OPSET = 17  # LayerNormalization as one node; read by onnxruntime, its mobile builds included
EXTERNAL_DATA_ABOVE = 2**31 - 1  # bytes: protobuf cannot write a larger message, so one file cannot hold more
TRACE_BATCH = 2  # at batch 1 the tracer could take a size-1 broadcast for the batch axis
# What the export prints and need not: the TorchScript exporter's deprecation notice (see above); the
# tracer on UNet.forward's `torch.as_tensor(t)` (t is already a tensor: it stays the input) and its
# `t.numel() == 1` branch (traced at batch 2, it takes t.reshape(-1), right for the graph's [B] timesteps),
# and on guidance_embedding's torch.tensor(10000.0), a constant indeed; and a note that strided slices are
# not constant-folded.
QUIET = ("You are using the legacy TorchScript-based ONNX export", "torch.as_tensor results are registered",
         "torch.tensor results are registered", "Converting a tensor to a Python boolean",
         "Constant folding - Only steps=1")


def require_onnx():
    """onnx and onnxruntime, the optional packages this command needs: missing, a one-line error."""
    try:
        import onnx
    except ImportError:
        raise UsageError(f"onnx is not installed (python -m minisd.export needs it): {INSTALL}") from None
    return onnx, import_onnxruntime()


# ---- the graphs -----------------------------------------------------------------------------------

class UNetGraph(nn.Module):
    """The U-Net with the graph's inputs in order: latents, timestep, context, and w where it takes one."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timestep, context, w=None):
        return self.unet(latents, timestep, context, w=w)


class DecoderGraph(nn.Module):
    """U-Net latents -> images in [-1, 1]; divides by the VAE's scaling factor (0.18215 for SD's, 1 for TAESD)
    first, as Pipeline.decode does, so an app never needs to know it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.scaling_factor)


class EncoderGraph(nn.Module):
    """Images in [-1, 1] -> latents on the U-Net's scale. For the KL VAE, its posterior's mean and std, from
    which the runner draws mean + std * noise as DiagonalGaussian.sample does; TAESD's are deterministic."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        scale = self.vae.scaling_factor
        if isinstance(self.vae, AutoencoderTiny):
            return self.vae.encode(images) * scale
        posterior = self.vae.encode(images)
        return posterior.mean * scale, posterior.std * scale


@dataclass
class Graph:
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # the inputs it is traced with, by name, in the order forward takes them
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def graphs(pipe: Pipeline, latent_size: tuple[int, int], dynamic_size: bool) -> dict[str, Graph]:
    """The four graphs of a pipeline, with inputs to trace them at (in the pipeline's dtype)."""
    unet, scale = pipe.unet.config, pipe.vae_scale
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(pipe.dtype)

    h, w = latent_size
    batch = {0: "batch"}
    latent_axes = {0: "batch", 2: "latent_height", 3: "latent_width"} if dynamic_size else batch
    image_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else batch
    ids = torch.tensor(pipe.tokenizer.padded_ids(["a black vase holding a bouquet of roses", ""]))
    text_encoder = pipe.text_encoder
    if pipe.dtype == torch.float16:
        # fp32 always: the TorchScript exporter builds the causal attention mask of CLIP's text tower in fp32
        # whatever the query's type, and so turns that attention fp32 in an fp16 graph, which onnxruntime
        # refuses to load (torch 2.14.1). It runs once per prompt; only its file stays at fp32's size.
        text_encoder = copy.deepcopy(text_encoder).float()
    unet_inputs = dict(latents=randn(TRACE_BATCH, unet.in_channels, h, w),
                       timestep=torch.tensor([999.0, 1.0]), context=randn(TRACE_BATCH, 77, unet.context_dim))
    if unet.guidance_embed_dim:
        unet_inputs["w"] = torch.tensor([6.5, 0.0])  # LCM's omega = guidance - 1
    encoded = ["latents"] if isinstance(pipe.vae, AutoencoderTiny) else ["latent_mean", "latent_std"]
    return {
        "text_encoder": Graph(text_encoder, dict(ids=ids), ["context"], dict(ids=batch, context=batch)),
        "unet": Graph(UNetGraph(pipe.unet), unet_inputs, ["model_output"],
                      dict(latents=latent_axes, timestep=batch, context=batch, w=batch,
                           model_output=latent_axes)),
        "vae_decoder": Graph(DecoderGraph(pipe.vae), dict(latents=randn(TRACE_BATCH, unet.in_channels, h, w)),
                             ["images"], dict(latents=latent_axes, images=image_axes)),
        "vae_encoder": Graph(EncoderGraph(pipe.vae),
                             dict(images=randn(TRACE_BATCH, 3, h * scale, w * scale).clamp(-1, 1)),
                             encoded, dict(images=image_axes, **{name: latent_axes for name in encoded})),
    }


# ---- writing ----------------------------------------------------------------------------------------

def save_model(written: Path, path: Path) -> None:
    """Move a model that a tool wrote into a scratch folder to `path`: as it is where it is one file within
    protobuf's limit, else loaded and saved with every weight in one `path`.data (the exporter writes one
    file per weight past 2 GB)."""
    onnx, _ = require_onnx()
    if len(os.listdir(written.parent)) == 1 and written.stat().st_size <= EXTERNAL_DATA_ABOVE:
        written.replace(path)
        return
    onnx.save_model(onnx.load(str(written)), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=path.name + ".data")


@torch.no_grad()
def export_graph(graph: Graph, path: Path, opset: int) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        traced = Path(scratch) / path.name
        names = [*graph.inputs, *graph.outputs]
        axes = {name: axes for name, axes in graph.dynamic_axes.items() if name in names}
        torch.onnx.export(graph.module, tuple(graph.inputs.values()), str(traced), dynamo=False,
                          opset_version=opset, input_names=list(graph.inputs), output_names=graph.outputs,
                          dynamic_axes=axes)
        save_model(traced, path)


@torch.no_grad()
def difference(graph: Graph, path: Path) -> float:
    """The graph in onnxruntime against the module in torch, on the trace inputs: max |a - b| over the
    outputs, relative to their scale (max |b|, at least 1)."""
    _, ort = require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: x.numpy() for name, x in graph.inputs.items()})
    want = graph.module(*graph.inputs.values())
    want = want if isinstance(want, tuple) else (want,)
    gaps = [(torch.from_numpy(a).float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)
            for a, b in zip(got, want)]
    return float(max(gaps))


def quantize_int8(path: Path) -> None:
    """onnxruntime's dynamic quantization, in place: the weights of Conv, MatMul and Gemm stored as 8 bits
    with a scale and zero point per tensor; activations are quantized on the fly at run time. Unsigned
    weights (uint8): onnxruntime's quantization guide warns that signed ones can saturate on x86 CPUs without
    VNNI (this machine's AMD EPYC has AVX2 only), and here they moved the toy teacher's U-Net output 1.3x as
    far from fp32 (mean), a reduced random U-Net's 4x."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = path.with_name(path.name + ".data").exists()
    logging.getLogger().addFilter(no_preprocessing_advice)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            quantized = Path(scratch) / path.name
            quantize_dynamic(path, quantized, weight_type=QuantType.QUInt8, use_external_data_format=external)
            path.with_name(path.name + ".data").unlink(missing_ok=True)
            save_model(quantized, path)
    finally:
        logging.getLogger().removeFilter(no_preprocessing_advice)


def no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """onnxruntime's quantizer advises its pre-processing at every call; that step's shape inference fails on
    graphs with dynamic height and width (a Reshape to traced shapes), so the advice is of no use here."""
    return "pre-processing before quantization" not in record.getMessage()


def file_bytes(path: Path) -> int:
    """A graph's size on disk, its external data included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def export_pipeline(pipe: Pipeline, out: Path, opset: int = DEFAULT_OPSET,
                    size: tuple[int, int] | None = None, quantize: str | None = None, log=print) -> dict:
    """Write the graphs, tokenizer, scheduler config and manifest of `pipe` into `out` (which must hold no
    earlier export). size: (height, width) in pixels for static graphs; None: any size. quantize: "int8" for
    an int8 U-Net. Returns the manifest."""
    scale = pipe.vae_scale
    if size is None:  # traced small (any size gives the same graph), at one latent per U-Net stage's halving
        latent_size = (2 ** len(pipe.unet.config.stages),) * 2
    else:
        latent_size = (size[0] // scale, size[1] // scale)
    out.mkdir(parents=True, exist_ok=True)
    bytes_, differences, dtypes = {}, {}, {}
    for name, graph in graphs(pipe, latent_size, dynamic_size=size is None).items():
        path = out / FILES[name]
        dtypes[name] = {torch.float32: "fp32", torch.float16: "fp16"}[next(graph.module.parameters()).dtype]
        export_graph(graph, path, opset)
        differences[name] = difference(graph, path)
        note = ""
        if name == "unet" and quantize == "int8":
            quantize_int8(path)
            differences["unet_int8"] = difference(graph, path)
            note = f"; int8: {differences['unet_int8']:.1e}"
        bytes_[name] = file_bytes(path)
        log(f"{path}: {bytes_[name] / 2**20:.1f} MiB, max difference to minisd {differences[name]:.1e}{note}")
    pipe.tokenizer.save(out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json", pipe.scheduler_config)
    manifest = dict(
        format="minisd-onnx", version=1, source=pipe.source, unet=pipe.unet.config.name, family=pipe.family,
        dtype={torch.float32: "fp32", torch.float16: "fp16"}[pipe.dtype], dtypes=dtypes, quantize=quantize,
        opset=opset,
        height=size[0] if size else None, width=size[1] if size else None, native_size=pipe.native_size,
        vae_scale=scale, latent_channels=pipe.unet.config.in_channels, vae=type(pipe.vae).__name__,
        guidance_embed=pipe.unet.config.guidance_embed_dim is not None,
        prediction_type=pipe.scheduler_config.get("prediction_type", "epsilon"),
        sampler=sampler_of(pipe.scheduler_config),
        loras=[[name, scale] for name, scale in pipe.loras], files=FILES, bytes=bytes_,
        max_difference=differences,
        exporter=f"torch {torch.__version__.split('+')[0]} torch.onnx.export (TorchScript)")
    write_json(out / MANIFEST, manifest)
    return manifest


def clear(out: Path) -> None:
    """Remove an earlier export's files from `out` (and nothing else)."""
    for name in [MANIFEST, *FILES.values()]:
        (out / name).unlink(missing_ok=True)
        (out / (name + ".data")).unlink(missing_ok=True)
    for folder in ("tokenizer", "scheduler"):
        shutil.rmtree(out / folder, ignore_errors=True)


# ---- the command ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="hub id, diffusers folder, or .safetensors/.ckpt single file")
    p.add_argument("out", type=Path, help="the folder to write (see above)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="the graphs' precision (default fp32; fp16 halves the files)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    p.add_argument("--height", type=int, default=None, help="pixels: graphs of this size only (with --width)")
    p.add_argument("--width", type=int, default=None, help="pixels: graphs of this size only (with --height)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: quantize the U-Net's weights (onnxruntime's dynamic quantization; with "
                        "--dtype fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    p.add_argument("--lora", type=Path, action="append", default=[], metavar="PATH",
                   help="a LoRA to merge into the weights before export (as sample.py --lora); repeat for "
                        "several")
    p.add_argument("--lora-scale", type=finite_float, action="append", default=[], metavar="S",
                   help="the i-th --lora's strength (default 1)")
    p.add_argument("--vae", type=Path, default=None, metavar="PATH",
                   help="export this VAE instead of the model's, e.g. TAESD (as sample.py --vae)")
    p.add_argument("--family", choices=sorted(TEXT_ENCODERS),
                   help="single-file model: SD family (default: detected)")
    p.add_argument("--variant", choices=sorted(VARIANTS),
                   help="single-file model: U-Net variant (default: detected)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override the model's prediction type")
    args = p.parse_args(argv)
    if args.opset not in OPSETS:
        p.error(f"--opset {args.opset}: the TorchScript exporter writes opsets {OPSETS.start} to "
                f"{OPSETS.stop - 1}")
    if (args.height is None) != (args.width is None):
        p.error("give --height and --width together (static graphs), or neither (any size)")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            p.error(f"--{name} must be a positive multiple of 8, not {value}")
    if args.quantize and args.dtype != "fp32":
        p.error("--quantize int8 quantizes fp32 weights: use it with --dtype fp32")
    if len(args.lora_scale) > len(args.lora):
        p.error(f"{len(args.lora_scale)} --lora-scale for {len(args.lora)} --lora: the i-th --lora-scale "
                "goes with the i-th --lora")
    args.lora_scale += [1.0] * (len(args.lora) - len(args.lora_scale))
    return args


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"OUT_DIR {out} exists and is not empty; pass --overwrite to replace an earlier "
                         "export there, or choose another folder")
    check_writable_folder(out, "OUT_DIR")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # every input is checked before the model loads
        require_onnx()
        check_out(args.out, args.overwrite)
        loras = []
        for path in args.lora:
            if not path.exists():
                raise UsageError(f"--lora {path}: no such file or folder")
            loras.append(open_lora(path))
        if args.vae and not args.vae.exists():
            raise UsageError(f"--vae {args.vae}: no such folder")
        dtype = DTYPES[args.dtype]
        vae = load_vae(args.vae, dtype) if args.vae else None
        pipe = load_pipeline(args.model, dtype=dtype, family=args.family, variant=args.variant,
                             prediction_type=args.prediction_type, vae=vae)
        for lora, scale in zip(loras, args.lora_scale):
            pipe.load_lora(lora, scale)
        size = None
        if args.height:
            size = (args.height, args.width)
            if args.height % pipe.vae_scale or args.width % pipe.vae_scale:
                raise UsageError(f"--height and --width must be multiples of {pipe.vae_scale} for this VAE")
    except BAD_INPUT as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.overwrite:
        clear(args.out)
    export_pipeline(pipe, args.out, args.opset, size, args.quantize)
    precision = args.dtype + (", int8 U-Net" if args.quantize else "")
    print(f"wrote {args.out} ({pipe.unet.config.name}, {precision}); run it with "
          f"python -m minisd.onnx_runner {args.out} \"a prompt\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
