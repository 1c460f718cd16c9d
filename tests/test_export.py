"""ONNX export (python -m minisd.export) and the torch-free runner (minisd/onnx_runner.py).

Each exported graph equals minisd's module in fp32, within 1e-4 of the output's scale, on inputs of another
batch size and image size than it was traced at (random weights: reduced BK-SDM-Tiny with the KL VAE, reduced
SD-v2 BK-Small, an LCM U-Net with a guidance embedding and TAESD; the real-size BK-SDM-Tiny U-Net, slow). The
runner gives minisd's image for the same prompt, seed, sampler and steps within 2/255, for the toy teacher in
weights/toy-sd and for the LCM U-Net, and it runs with torch's import blocked. fp16, int8 and the
external-data format (forced small here: real models pass 2 GB only at SD's full size) load and run."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from reference import perturb_

import minisd
from minisd import export
from minisd.bench.models import random_pipeline, reduced
from minisd.checkpoints.ldm import SD_SCHEDULER
from minisd.checkpoints.lora_files import write_lora
from minisd.images import read_settings
from minisd.lora import LowRank, adaptable_layers
from minisd.onnx_runner import OnnxPipeline
from minisd.onnx_runner import main as runner_main
from minisd.pipeline import Pipeline
from minisd.table import TEACHERS, variant
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet
from minisd.vae_tiny import AutoencoderTiny, TinyVAEConfig

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "toy-sd"
PROMPTS = ["a red circle above a blue square", "a green triangle"]
IMAGE_TOLERANCE = 2 / 255  # per pixel, images in [0, 1]
GRAPH_TOLERANCE = 1e-4  # of the output's scale (max |minisd|)
# TAESD at 1/8 of the width with fewer blocks (as tests/test_vae_tiny.py)
SMALL_TAESD = TinyVAEConfig(encoder_channels=8, decoder_channels=8, encoder_blocks=(1, 2, 2, 2),
                            decoder_blocks=(2, 2, 2, 1))


def quiet(log_line: str) -> None:
    pass


def perturbed(pipe: Pipeline, seed: int) -> Pipeline:
    for i, model in enumerate((pipe.text_encoder, pipe.unet, pipe.vae)):
        perturb_(model, seed + i)
    return pipe


def lcm_pipeline() -> Pipeline:
    """A reduced BK-SDM-Tiny U-Net with LCM's guidance embedding, TAESD as its VAE, the LCM sampler."""
    base = random_pipeline("v1", "tiny", small=True, seed=3)
    torch.manual_seed(3)
    table = dataclasses.replace(reduced(variant(TEACHERS["v1"], "tiny")), guidance_embed_dim=32)
    pipe = Pipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, unet=UNet(table),
                    vae=AutoencoderTiny(SMALL_TAESD),
                    scheduler_config=dict(SD_SCHEDULER, _class_name="LCMScheduler"), source="random LCM")
    for model in (pipe.unet, pipe.vae):
        model.eval().requires_grad_(False)
    perturbed(pipe, 3)
    with torch.no_grad():
        pipe.unet.guidance_proj.weight.mul_(20)  # so that w moves the image well past the tolerance
    return pipe


MODELS = {
    "v1-tiny": lambda: perturbed(random_pipeline("v1", "tiny", small=True), 0),
    "v2-small": lambda: perturbed(random_pipeline("v2", "small", small=True, seed=1), 1),
    "lcm-taesd": lcm_pipeline,
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (pipeline, its export folder, manifest), each exported once for the whole module."""
    done = {}

    def get(name: str) -> tuple[Pipeline, Path, dict]:
        if name not in done:
            pipe, out = MODELS[name](), tmp_path_factory.mktemp(name)
            done[name] = pipe, out, export.export_pipeline(pipe, out, log=quiet)
        return done[name]
    return get


@pytest.fixture(params=["v1-tiny", pytest.param("v2-small", marks=pytest.mark.slow), "lcm-taesd"])
def exported(request, exports) -> tuple[Pipeline, Path, dict]:
    return exports(request.param)


def exported_folder(tmp_path_factory, folder: Path) -> tuple[Pipeline, Path]:
    pipe = minisd.load_pipeline(folder)
    out = tmp_path_factory.mktemp(f"{folder.name}-onnx")
    export.export_pipeline(pipe, out, log=quiet)
    return pipe, out


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_epsilon) -> tuple[Pipeline, Path]:
    """The toy teacher on SD-v1's schedule (PNDM, epsilon): the runner's path for SD-v1 and BK-SDM."""
    return exported_folder(tmp_path_factory, toy_epsilon)


@pytest.fixture(scope="module")
def toy_zero_snr(tmp_path_factory) -> tuple[Pipeline, Path]:
    """The toy teacher as shipped: v-prediction on a zero terminal SNR schedule, DDIM (trailing)."""
    return exported_folder(tmp_path_factory, TOY)


def run(path: Path, **feeds) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_close(got: np.ndarray, expected: torch.Tensor, tolerance: float = GRAPH_TOLERANCE) -> None:
    expected = expected.float().numpy()
    assert got.shape == expected.shape
    assert np.abs(got.astype(np.float32) - expected).max() <= tolerance * np.abs(expected).max()


# ---- the graphs -------------------------------------------------------------------------------------

@torch.no_grad()
def test_graphs_equal_minisd(exported):
    """Batch 3 and an odd latent size (7 x 9), where the graphs were traced at batch 2 and a square size."""
    pipe, out, manifest = exported
    gen = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer([*PROMPTS, ""])
    (context,) = run(out / "text_encoder.onnx", ids=ids.numpy())
    assert_close(context, pipe.text_encoder(ids))

    latents = torch.randn(3, 4, 7, 9, generator=gen)
    t = torch.tensor([999.0, 500.0, 1.0])
    feeds = dict(latents=latents.numpy(), timestep=t.numpy(), context=context)
    w = None
    if pipe.unet.config.guidance_embed_dim:
        w = torch.tensor([7.5, 3.0, 0.0])
        feeds["w"] = w.numpy()
    (eps,) = run(out / "unet.onnx", **feeds)
    assert_close(eps, pipe.unet(latents, t, torch.from_numpy(context), w=w))

    (images,) = run(out / "vae_decoder.onnx", latents=latents.numpy())
    assert_close(images, pipe.decode(latents))
    scale = pipe.vae_scale
    images = torch.rand(3, 3, 7 * scale, 9 * scale, generator=gen) * 2 - 1
    encoded = run(out / "vae_encoder.onnx", images=images.numpy())
    if isinstance(pipe.vae, AutoencoderTiny):
        assert_close(encoded[0], pipe.vae.encode(images))
    else:
        posterior = pipe.vae.encode(images)
        assert_close(encoded[0], posterior.mean * pipe.vae.scaling_factor)
        assert_close(encoded[1], posterior.std * pipe.vae.scaling_factor)
    assert max(manifest["max_difference"].values()) <= GRAPH_TOLERANCE


def test_folder_and_manifest(exported):
    pipe, out, manifest = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "scheduler", "text_encoder.onnx",
                                                      "tokenizer", "unet.onnx", "vae_decoder.onnx",
                                                      "vae_encoder.onnx"]
    assert CLIPTokenizer.from_folder(out / "tokenizer")(PROMPTS).equal(pipe.tokenizer(PROMPTS))
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == pipe.scheduler_config
    unet = onnx.load(str(out / "unet.onnx"), load_external_data=False)
    inputs = [i.name for i in unet.graph.input]
    assert inputs == ["latents", "timestep", "context"] + (["w"] if manifest["guidance_embed"] else [])
    dims = [d.dim_param or d.dim_value for d in unet.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "latent_height", "latent_width"]
    assert manifest["sampler"] == ("lcm" if manifest["guidance_embed"] else "pndm")
    assert manifest["opset"] == export.DEFAULT_OPSET and unet.opset_import[0].version == export.DEFAULT_OPSET


@pytest.mark.slow
@torch.no_grad()
def test_real_size_bk_tiny_unet(tmp_path):
    """BK-SDM-Tiny's U-Net at its real size (323M parameters, a 1.3 GB graph), random weights."""
    torch.manual_seed(0)
    unet = perturb_(UNet(variant(TEACHERS["v1"], "tiny"))).eval()
    spatial, batch = {0: "batch", 2: "h", 3: "w"}, {0: "batch"}
    inputs = dict(latents=torch.randn(2, 4, 16, 16), timestep=torch.tensor([999.0, 1.0]),
                  context=torch.randn(2, 77, 768))
    graph = export.Graph(export.UNetGraph(unet), inputs, ["model_output"],
                         dict(latents=spatial, timestep=batch, context=batch, model_output=spatial))
    export.export_graph(graph, tmp_path / "unet.onnx", export.DEFAULT_OPSET)
    assert (tmp_path / "unet.onnx").stat().st_size > 1.2e9
    latents, context = torch.randn(1, 4, 24, 20), torch.randn(1, 77, 768)
    (eps,) = run(tmp_path / "unet.onnx", latents=latents.numpy(), timestep=np.array([321.0], np.float32),
                 context=context.numpy())
    assert_close(eps, unet(latents, torch.tensor([321.0]), context))


# ---- the runner -----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler, steps, guidance, num_images",
                         [(None, 25, 4.0, 1), ("dpm", 10, 4.0, 2), ("lcm", 4, 1.0, 2)])
def test_runner_same_image_as_minisd(toy, scheduler, steps, guidance, num_images):
    """Two prompts with negative prompts, images from one seed (the LCM sampler also draws fresh noise at
    every step from it). None: the folder's own sampler, PNDM, with SD's 25 steps."""
    pipe, out = toy
    kwargs = dict(steps=steps, guidance=guidance, seed=7, scheduler=scheduler, num_images=num_images,
                  negative_prompt=["a blue square", ""])
    ours = OnnxPipeline(out, threads=1)(PROMPTS, output="np", **kwargs)
    theirs = pipe(PROMPTS, progress=False, output="np", **kwargs)
    assert ours.shape == theirs.shape == (2 * num_images, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= IMAGE_TOLERANCE


@pytest.mark.parametrize("scheduler, steps", [(None, 25), ("dpm", 10)])
def test_runner_zero_terminal_snr_same_image_as_minisd(toy_zero_snr, scheduler, steps):
    """The toy teacher as shipped: v-prediction, a zero terminal SNR schedule, its own DDIM sampler from
    t = 999 (trailing), and DPM-Solver++ on the same schedule with its finite sigma at T."""
    pipe, out = toy_zero_snr
    kwargs = dict(steps=steps, guidance=4.0, seed=7, scheduler=scheduler, num_images=2)
    ours = OnnxPipeline(out, threads=1)(PROMPTS, output="np", **kwargs)
    theirs = pipe(PROMPTS, progress=False, output="np", **kwargs)
    assert ours.shape == theirs.shape == (4, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= IMAGE_TOLERANCE


def test_runner_guidance_rescale_same_image_as_minisd(toy_zero_snr):
    """CFG rescale (--guidance-rescale) at a guidance high enough for it to change the image."""
    pipe, out = toy_zero_snr
    kwargs = dict(steps=10, guidance=12.0, seed=7, num_images=2)
    runner = OnnxPipeline(out, threads=1)
    ours = runner(PROMPTS, output="np", guidance_rescale=0.7, **kwargs)
    assert np.abs(ours - pipe(PROMPTS, progress=False, output="np", guidance_rescale=0.7, **kwargs)).max() \
        <= IMAGE_TOLERANCE
    assert np.abs(ours - runner(PROMPTS, output="np", **kwargs)).max() > 10 * IMAGE_TOLERANCE


def test_runner_img2img_same_image_as_minisd(toy):
    pipe, out = toy
    init = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    kwargs = dict(steps=10, guidance=4.0, seed=3, init_image=init, strength=0.6, height=64, width=48)
    ours = OnnxPipeline(out, threads=1)(PROMPTS[0], output="np", **kwargs)
    theirs = pipe(PROMPTS[0], progress=False, output="np", **kwargs)
    assert np.abs(ours - theirs).max() <= IMAGE_TOLERANCE


def test_runner_lcm_guidance_embedding_and_tiny_vae(exports):
    """w is an input of the U-Net (no CFG pass); TAESD decodes and, for img2img, encodes (no posterior)."""
    pipe, out, _ = exports("lcm-taesd")
    runner = OnnxPipeline(out, threads=1)
    kwargs = dict(steps=4, seed=5, height=64, width=64)
    ours = runner(PROMPTS[0], guidance=8.5, output="np", **kwargs)
    assert np.abs(ours - pipe(PROMPTS[0], guidance=8.5, progress=False, output="np", **kwargs)).max() \
        <= IMAGE_TOLERANCE
    assert np.abs(runner(PROMPTS[0], guidance=3.0, output="np", **kwargs) - ours).max() > 10 * IMAGE_TOLERANCE
    init = Image.fromarray((ours[0] * 255).round().astype(np.uint8))
    again = runner(PROMPTS[1], guidance=8.5, init_image=init, strength=0.5, output="np", **kwargs)
    assert np.abs(again - pipe(PROMPTS[1], guidance=8.5, init_image=init, strength=0.5, progress=False,
                               output="np", **kwargs)).max() <= IMAGE_TOLERANCE


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
from minisd.onnx_runner import main
code = main({argv!r})
loaded = sorted(name for name in sys.modules if name.startswith(("torch", "minisd")) and sys.modules[name])
print(loaded)
sys.exit(code)
"""


def test_runner_needs_no_torch(toy, tmp_path):
    _, out = toy
    argv = [str(out), PROMPTS[0], "--steps", "3", "--seed", "1", "--threads", "1",
            "--out", str(tmp_path / "a.png")]
    result = subprocess.run([sys.executable, "-c", TORCH_FREE.format(argv=argv)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == str(["minisd", "minisd.images", "minisd.numpy_samplers",
                                                   "minisd.onnx_runner", "minisd.tokenizer"])
    settings = read_settings(tmp_path / "a.png")
    assert settings["prompt"] == PROMPTS[0] and settings["runner"] == "onnxruntime"
    assert settings["scheduler"] == "pndm" and settings["guidance"] == "7.5"


def test_runner_errors_are_one_line(toy, tmp_path, capsys):
    _, out = toy
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "empty"), "a"], "holds no ONNX export"),
             ([str(out), "a", "--height", "30"], "multiples of 4"),
             ([str(out), "a", "--scheduler", "lcm", "--steps", "60"], "original_inference_steps = 50"),
             ([str(out), "a", "--init-image", str(out / "manifest.json")], "cannot read init image")]
    for argv, words in cases:
        assert runner_main([*argv, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m minisd.onnx_runner: error: ") and words in err
        assert "Traceback" not in err and len(err.splitlines()) == 1
    for flags, words in ((["--guidance", "nan"], "--guidance must be"), (["--strength", "nan"], "--strength"),
                         (["--strength", "0"], "(0, 1]"), (["--threads", "0"], "--threads"),
                         (["--guidance-rescale", "1.5"], "--guidance-rescale must be")):
        with pytest.raises(SystemExit) as stop:
            runner_main([str(out), "a", *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and words in err and "error:" in err


# ---- precision, static size, LoRAs, external data -------------------------------------------------

@pytest.mark.slow
def test_fp16_export_image_near_fp32(toy_zero_snr, tmp_path):
    """fp16 graphs take and give fp16 (about half the file); the text encoder stays fp32 (export.graphs says
    why). The image stays within mean 0.5/255 and max 8/255 of minisd's fp32 one (measured on the shipped
    teacher: 0.01 and 0.54; on the second toy teacher 0.02 and 0.97, on the first 0.13 and 4.3)."""
    pipe, out = toy_zero_snr
    manifest = export.export_pipeline(minisd.load_pipeline(TOY, dtype=torch.float16), tmp_path, log=quiet)
    assert manifest["dtypes"] == dict(text_encoder="fp32", unet="fp16", vae_decoder="fp16",
                                      vae_encoder="fp16")
    # the graph itself is ~0.5 MB
    assert manifest["bytes"]["unet"] < 0.6 * export.file_bytes(out / "unet.onnx")
    unet = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in unet.get_inputs()] == ["tensor(float16)", "tensor(float)", "tensor(float16)"]
    kwargs = dict(steps=10, guidance=4.0, seed=7)
    ours = OnnxPipeline(tmp_path, threads=1)(PROMPTS, output="np", **kwargs)
    gap = np.abs(ours - pipe(PROMPTS, progress=False, output="np", **kwargs))
    assert gap.mean() <= 0.5 / 255 and gap.max() <= 8 / 255


@pytest.mark.slow
@torch.no_grad()
def test_int8_unet_runs_near_fp32(toy, tmp_path):
    """The int8 U-Net: about a quarter of the weights' bytes (biases, norms and scales stay fp32), its output
    within a tenth of the output's scale of minisd's (the image differences are in docs/performance.md)."""
    pipe, out = toy
    shutil.copy(out / "unet.onnx", tmp_path / "unet.onnx")
    export.quantize_int8(tmp_path / "unet.onnx")
    assert (tmp_path / "unet.onnx").stat().st_size < 0.5 * (out / "unet.onnx").stat().st_size
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 16, 16, generator=gen), pipe.text_encoder(pipe.tokenizer(PROMPTS))
    t = torch.tensor([600.0, 600.0])
    (eps,) = run(tmp_path / "unet.onnx", latents=latents.numpy(), timestep=t.numpy(), context=context.numpy())
    assert_close(eps, pipe.unet(latents, t, context), tolerance=0.1)


@pytest.mark.slow
def test_command_static_size_with_a_lora(tmp_path, capsys):
    """python -m minisd.export with a LoRA merged in and a fixed size; --overwrite replaces the export."""
    pipe = minisd.load_pipeline(TOY)
    layers = {name: LowRank(down=0.3 * torch.randn(2, m.in_features), up=0.3 * torch.randn(m.out_features, 2))
              for name, m in adaptable_layers(pipe.unet).items() if name.endswith("attn2.to_k")}
    write_lora(tmp_path / "lora.safetensors", {"unet": layers}, {"unet": pipe.unet}, "minisd")
    out = tmp_path / "out"
    argv = [str(TOY), str(out), "--lora", str(tmp_path / "lora.safetensors"), "--lora-scale", "0.7",
            "--height", "64", "--width", "48"]
    assert export.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loras"] == [[str(tmp_path / "lora.safetensors"), 0.7]]
    assert (manifest["height"], manifest["width"]) == (64, 48)
    unet = onnx.load(str(out / "unet.onnx"))
    assert [d.dim_param or d.dim_value for d in unet.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", 4, 16, 12]
    runner = OnnxPipeline(out, threads=1)
    kwargs = dict(steps=5, guidance=4.0, seed=2)
    ours = runner(PROMPTS[0], output="np", **kwargs)
    theirs = pipe.load_lora(tmp_path / "lora.safetensors", 0.7)(PROMPTS[0], progress=False, output="np",
                                                               height=64, width=48, **kwargs)
    assert np.abs(ours - theirs).max() <= IMAGE_TOLERANCE
    plain = pipe.unload_loras()(PROMPTS[0], progress=False, output="np", height=64, width=48, **kwargs)
    assert np.abs(ours - plain).max() > 10 * IMAGE_TOLERANCE  # the LoRA is in the graphs
    with pytest.raises(ValueError, match="takes 64x48 images only"):
        runner(PROMPTS[0], height=64, width=64)
    capsys.readouterr()
    assert export.main([str(TOY), str(out), "--overwrite", "--quantize", "int8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantize"] == "int8" and manifest["height"] is None and manifest["loras"] == []
    assert "int8:" in capsys.readouterr().out


@pytest.mark.slow
def test_weights_past_the_limit_go_to_one_data_file(toy, tmp_path, monkeypatch):
    """What a graph over 2 GB gets (SD-v1's U-Net is 3.4 GB in fp32), with the limit lowered to 0 bytes."""
    pipe, _ = toy
    monkeypatch.setattr(export, "EXTERNAL_DATA_ABOVE", 0)
    graph = export.graphs(pipe, (8, 8), dynamic_size=True)["unet"]
    path = tmp_path / "unet.onnx"
    export.export_graph(graph, path, export.DEFAULT_OPSET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert path.stat().st_size < 0.2 * (tmp_path / "unet.onnx.data").stat().st_size  # tensors < 1 KB stay
    assert export.file_bytes(path) > 9e6
    assert export.difference(graph, path) <= GRAPH_TOLERANCE
    export.quantize_int8(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert export.difference(graph, path) <= 0.1


@pytest.mark.slow
def test_export_bench_smoke(tmp_path, capsys):
    """python -m minisd.export_bench at smoke size: its table and files (no timing asserted)."""
    from minisd import export_bench

    argv = ["--models", "toy", "--size", "32", "--steps", "1", "--repeats", "1", "--out", str(tmp_path),
            "--keep", str(tmp_path / "exports")]
    assert export_bench.main(argv) == 0
    result = json.loads((tmp_path / "onnx-cpu-toy-32.json").read_text())
    rows = {r["runtime"]: r for r in result["models"]["toy"]["rows"]}
    assert list(rows) == ["minisd", "onnxruntime fp32", "onnxruntime fp16", "onnxruntime int8"]
    assert rows["onnxruntime fp32"]["max_diff_255"] <= 2
    assert rows["onnxruntime int8"]["unet_bytes"] < rows["onnxruntime fp32"]["unet_bytes"]
    assert "| toy | onnxruntime fp16 |" in capsys.readouterr().out
    assert export_bench.main(argv) == 0  # the second time, the kept exports are reused
