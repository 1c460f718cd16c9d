"""The shipped toy teacher (weights/toy-sd): small, fp16, loads in minisd and diffusers alike, and draws
held-out captions right (all attributes at once, and each one) far more often than the same images match other
captions; the toy metric scores real images perfectly and mismatched captions poorly; and train.py trains a
text tower jointly with a U-Net from scratch (--plain --train-text-encoder), saving it in each checkpoint."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors import safe_open

import sample
from minisd.checkpoints.diffusers import load_text_encoder
from minisd.pipeline import load_pipeline
from minisd.toy.checker import check_caption
from minisd.toy.configs import TOY_GUIDANCE, TOY_UNET, initial_pipeline
from minisd.toy.dataset import example, heldout_pairs, write_dataset
from minisd.toy.metric import evaluate_folder
from minisd.vae import AutoencoderKL, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "weights" / "toy-sd"
PROMPTS = 48  # held-out captions the accuracy test draws
# Measured on those 48 (25 steps of the teacher's own sampler, DDIM trailing; guidance TOY_GUIDANCE, seed b for
# the batch from prompt b; torch 2.14.1 CPU): caption accuracy 91.7% (44 of 48; 91.0% on 200 prompts), colour
# 97.9%, shape 91.7%, size 97.9%, count 97.9%, position 21 of 21; against the next prompt's caption: caption 0%,
# colour 14.6%, shape 6.3%, size 8.3%. The bounds sit 3-4 standard errors (at 48 prompts) below the measured
# values. (The second toy teacher: caption 68.8%, colour 91.7%, shape 77.1%, size 89.6%, count 87.5%, position
# 19 of 21; the first: caption 33.3%, colour 89.6%, shape 45.8%, size 72.9%, count 93.8%.)
MIN_CAPTION, MIN_CAPTION_GAP = 0.75, 0.70
MIN_COLOUR, MIN_COLOUR_GAP = 0.90, 0.75
MIN_SHAPE, MIN_SIZE, MIN_COUNT, MIN_POSITION = 0.80, 0.90, 0.90, 0.85


def heldout_prompts(count: int) -> list[str]:
    """Captions of the held-out split of `python -m minisd.toy data --seed 0 --heldout 0.1`, without writing
    it."""
    pairs = heldout_pairs(0, 0.1)
    return [example(0, "heldout", i, pairs)[1] for i in range(count)]


def test_teacher_is_small_and_half_precision():
    files = [p for p in TEACHER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for path in TEACHER.rglob("*.safetensors"):
        with safe_open(path, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), path


def test_teacher_loads_in_minisd_and_diffusers():
    """The folder is the toy table in diffusers' layout: diffusers' U-Net gives minisd's output."""
    pipe = load_pipeline(TEACHER)
    assert pipe.unet.config.stages == TOY_UNET.stages and pipe.native_size == 64
    reference = UNet2DConditionModel.from_pretrained(TEACHER / "unet", torch_dtype=torch.float32).eval()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    with torch.no_grad():
        ours, theirs = pipe.unet(x, torch.tensor([10, 900]),
                                 context), reference(x, torch.tensor([10, 900]), context).sample
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow  # 48 prompts, 25 steps each
def test_teacher_draws_heldout_captions(tmp_path):
    pipe = load_pipeline(TEACHER)
    prompts = heldout_prompts(PROMPTS)
    images = []
    for b in range(0, PROMPTS, 16):
        images += pipe(prompts[b:b + 16], steps=25, guidance=TOY_GUIDANCE, seed=b, seed_mode="per_image",
                       progress=False)
    rows = [(f"{i:03d}.png", text) for i, text in enumerate(prompts)]
    for (name, _), image in zip(rows, images):
        image.save(tmp_path / name)
    scores = evaluate_folder(tmp_path, rows, workers=1)
    mismatched = evaluate_folder(tmp_path,
                                 [(name, rows[(i + 1) % PROMPTS][1]) for i, (name, _) in enumerate(rows)],
                                 workers=1)
    assert scores["caption_accuracy"] >= MIN_CAPTION, scores
    assert (scores["caption_accuracy"] - mismatched["caption_accuracy"]
            >= MIN_CAPTION_GAP), (scores, mismatched)
    accuracy = scores["accuracy"]
    assert accuracy["colour"] - mismatched["accuracy"]["colour"] >= MIN_COLOUR_GAP, (scores, mismatched)
    for name, bound in dict(colour=MIN_COLOUR, shape=MIN_SHAPE, size=MIN_SIZE, count=MIN_COUNT,
                            position=MIN_POSITION).items():
        assert accuracy[name] >= bound, (name, scores)
    for name in ("shape", "size"):  # above what the same images score against other captions
        assert accuracy[name] > mismatched["accuracy"][name], (name, scores, mismatched)


def readme_example() -> list[str]:
    """The arguments of README.md's offline example, `python sample.py "..." --model weights/...`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    line = next(x for x in lines if x.startswith("python sample.py ") and "--model weights/" in x)
    return shlex.split(line)[2:]


# The README's example drawn from seeds 0-7, 4 images each, as its command draws them (the batch shares
# sample.py's seed). Measured on the shipped teacher (torch 2.14.1, CPU): 31 of 32 right, 4 of 4 at seed 0 (the
# README's, where the goal is 3 of 4); the first toy teacher drew 1 of 4 at seed 0. The rate's bound sits well
# below the measured rate.
MIN_EXAMPLE_RATE, MIN_AT_README_SEED = 0.75, 3


@pytest.mark.slow  # 32 images
def test_readme_example_draws_what_it_says(tmp_path):
    """The README's first offline command, as written, then the same from seeds 1-7: the checker finds the
    caption drawn right in at least MIN_AT_README_SEED of the 4 images at the README's seed (sample.py's
    default, 0), and in at least MIN_EXAMPLE_RATE of the 32 images."""
    argv = readme_example()
    right = []
    for seed in range(8):
        out = tmp_path / f"seed{seed}.png"
        assert sample.main(argv + ["--out", str(out), "--seed", str(seed), "--no-progress"]) == 0
        images = sorted(tmp_path.glob(f"seed{seed}-0*.png"))
        assert len(images) == 4
        right += [check_caption(Image.open(p).convert("RGB"), argv[0])["caption_correct"] for p in images]
    assert "--seed" not in argv and sum(right[:4]) >= MIN_AT_README_SEED, (argv, right)
    assert np.mean(right) >= MIN_EXAMPLE_RATE, (argv, right)


def test_metric_scores_real_images(tmp_path):
    """Real held-out images score 100% against their own captions (FID ~0 against themselves), and poorly
    against another image's caption."""
    write_dataset(tmp_path, n=40, seed=0, heldout=0.5, workers=1)
    folder = tmp_path / "heldout"
    lines = [json.loads(line) for line in open(folder / "scenes.jsonl")]
    rows = [(line["file_name"], line["text"]) for line in lines]
    right = evaluate_folder(folder, rows, real_dir=folder, workers=1)
    assert right["caption_accuracy"] == 1.0 and abs(right["toy_fid"]) < 1e-6
    assert set(right["accuracy"]) >= {"colour", "shape", "size", "count"}
    wrong = evaluate_folder(folder, [(name, rows[i - 1][1]) for i, (name, _) in enumerate(rows)], workers=1)
    assert wrong["caption_accuracy"] < 0.2


@pytest.mark.slow
def test_train_text_encoder_jointly(tmp_path):
    """train.py --plain --train-text-encoder on a random toy pipeline: the text tower changes and is saved in
    the checkpoint (not linked), and a resumed run starts from it."""
    import train

    vae = AutoencoderKL(VAEConfig(block_channels=(8, 8, 8), layers_per_block=1, norm_groups=4,
                                  sample_size=64))
    from minisd.checkpoints.diffusers import save_vae

    save_vae(vae, tmp_path / "vae")
    initial_pipeline(tmp_path / "vae", tmp_path / "init")
    write_dataset(tmp_path / "toy", n=16, seed=0, heldout=0.0, workers=1)
    args = ["--plain", "--variant", "sd", "--teacher", str(tmp_path / "init"), "--train-text-encoder",
            "--caption-dropout", "0.5", "--data", str(tmp_path / "toy" / "train"), "--resolution", "64",
            "--no-flip", "--batch-size", "4", "--global-batch", "4", "--lr", "1e-3", "--num-workers", "0",
            "--log-steps", "1", "--save-steps", "2", "--valid-steps", "0", "--out", str(tmp_path / "run")]
    assert train.main(args + ["--max-steps", "2"]) == 0
    first = tmp_path / "run" / "checkpoint-0000002"
    assert (first / "text_encoder").is_dir() and not (first / "text_encoder").is_symlink()
    before = load_text_encoder(tmp_path / "init" / "text_encoder").state_dict()
    after = load_text_encoder(first / "text_encoder").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "token_embedding.weight" in changed and len(changed) > len(before) // 2
    assert train.main(args + ["--max-steps", "3"]) == 0  # resumes from step 2, text tower included
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["sd"]) for r in rows)
    pipe = load_pipeline(tmp_path / "run" / "checkpoint-0000003")
    assert pipe.text_encoder.token_embedding.weight.shape == (49408, 64)


def test_initial_pipeline_of_other_tables(tmp_path, capsys):
    """`toy init`: by default a random pipeline of the shipped teacher's tables and schedule; with `--widths
    --text-layers --sd-schedule --prediction-type` one of other tables on SD-v1's schedule, which loads in
    minisd and whose U-Net diffusers reads with the same output. Epsilon on the zero terminal SNR schedule
    is refused (exit 2): the noise cannot be told from x_T there."""
    from minisd.toy.__main__ import main as toy

    shipped = load_pipeline(TEACHER)
    toy(["init", "--vae", str(TEACHER / "vae"), "--out", str(tmp_path / "default")])
    pipe = load_pipeline(tmp_path / "default")
    assert pipe.unet.config == shipped.unet.config and pipe.text_encoder.config == shipped.text_encoder.config
    assert {k: v for k, v in pipe.scheduler_config.items() if k != "_diffusers_version"} == \
        {k: v for k, v in shipped.scheduler_config.items() if k != "_diffusers_version"}
    toy(["init", "--vae", str(TEACHER / "vae"), "--out", str(tmp_path / "init"), "--widths", "16", "32", "64",
         "64", "--text-layers", "3", "--sd-schedule", "--prediction-type", "epsilon"])
    pipe = load_pipeline(tmp_path / "init")
    assert [s.channels for s in pipe.unet.config.stages] == [16, 32, 64, 64]
    assert [s.heads for s in pipe.unet.config.stages] == [1, 2, 4, 4]
    assert pipe.text_encoder.config.layers == 3 and pipe.scheduler_config["prediction_type"] == "epsilon"
    assert pipe.scheduler_config["_class_name"] == "PNDMScheduler"
    assert not pipe.scheduler_config.get("rescale_betas_zero_snr")
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "init" / "unet").eval()
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, torch.tensor([500]), context),
                              reference(x, torch.tensor([500]), context).sample, atol=1e-4)
    with pytest.raises(SystemExit) as e:
        toy(["init", "--vae", str(TEACHER / "vae"), "--out", str(tmp_path / "eps"), "--prediction-type",
             "epsilon"])
    assert e.value.code == 2 and "--sd-schedule" in capsys.readouterr().err
    assert not (tmp_path / "eps").exists()


def test_export_ships_a_fine_tuned_decoder(tmp_path, capsys):
    """`toy export --vae`: the exported pipeline carries the given VAE when only its decoder differs from the
    run's, and is refused (exit 2, naming the weight) when its encoder differs, as its latents would."""
    from minisd.checkpoints.diffusers import load_vae, save_vae
    from minisd.toy.__main__ import main as toy

    def variant(part: str):
        vae = load_vae(TEACHER / "vae")
        with torch.no_grad():
            getattr(vae, part).conv_in.weight.add_(0.01)
        save_vae(vae, tmp_path / part)
        return vae

    decoder = variant("decoder")
    toy(["export", "--checkpoint", str(TEACHER), "--out", str(tmp_path / "out"),
         "--vae", str(tmp_path / "decoder")])
    shipped = load_vae(tmp_path / "out" / "vae")
    assert torch.equal(shipped.decoder.conv_in.weight, decoder.decoder.conv_in.weight.half().float())
    variant("encoder")
    with pytest.raises(SystemExit) as exit_:
        toy(["export", "--checkpoint", str(TEACHER), "--out", str(tmp_path / "bad"),
             "--vae", str(tmp_path / "encoder")])
    assert exit_.value.code == 2 and "encoder.conv_in.weight differs" in capsys.readouterr().err
