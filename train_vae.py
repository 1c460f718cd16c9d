"""Train SD's autoencoder (AutoencoderKL) on a folder of images, as LDM trains its first stage
(Rombach et al., arXiv 2112.10752, sec. 3.1 and appendix G): L1 reconstruction plus a small KL
pull of the posterior towards N(0, I). LDM adds a perceptual (LPIPS) and an adversarial loss for
photographs; for small synthetic domains such as the toy world, reconstruction + KL is enough.

    python train_vae.py --data data/toy/train --config toy_vae.json --out weights/toy-vae --resolution 64
    python train_vae.py --data data/toy/train --init weights/toy-vae --out weights/toy-vae-2 --max-steps 2000
        # re-run: resumes from its last checkpoint
    python train_vae.py --data data/toy/train --init weights/toy-sd/vae --decoder-only --out data/toy-vae-ft
        # a sharper decoder for latents a U-Net was already trained on

--decoder-only is how Stability's sd-vae-ft-mse improved SD's decoder after SD was trained: the encoder (and
so the latent space, its scaling factor included) stays as it is, and only the decoder learns, so the new VAE
drops into any pipeline trained on the old one.

At the end the latents' scaling factor is set to 1 / their standard deviation on the data (LDM's
`scale_by_std`), so that the U-Net sees latents of about unit variance, as SD's 0.18215 does for SD.
The output folder is then a diffusers AutoencoderKL folder (config.json + weights); on the way it holds
checkpoints (checkpoint-N/vae/ and the optimizer's state), log.jsonl and run.json, as train.py's run folders
do, with the same atomic saves, resume and stops (minisd/training.py). The --init model is never written to.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from minisd.checkpoints.diffusers import load_vae, save_vae
from minisd.checkpoints.files import read_json
from minisd.cli import (
    UsageError,
    bad_input_exits,
    check_device,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from minisd.data import make_loader
from minisd.training import (
    Checkpoints,
    Every,
    LossMeter,
    RunLog,
    TrainingError,
    TrainState,
    batches,
    checkpoints,
    loop,
    open_data,
    open_run,
    read_training_state,
)
from minisd.vae import AutoencoderKL, VAEConfig

KL_WEIGHT = 1e-6  # LDM's kl-f8 autoencoder config (lossconfig.params.kl_weight)
# what the output folder holds of a run, and --overwrite removes
RUN_OUTPUTS = ("checkpoint-*", ".tmp-checkpoint-*", "log.jsonl", "losses.png", "run.json", "config.json",
               "diffusion_pytorch_model.safetensors")

PROG = "train_vae.py"  # argparse would name __main__.py under torchrun or python -m


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder with metadata.csv/jsonl, or tar shards")
    p.add_argument("--out", type=Path, required=True, help="output folder (diffusers AutoencoderKL layout)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--config", type=Path,
                       help="a diffusers AutoencoderKL config.json: train from random weights")
    start.add_argument("--init", type=Path, help="a VAE folder to go on training (it is never written to)")
    p.add_argument("--resolution", type=positive_int, default=64, help="a multiple of 8")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-steps", type=positive_int, default=5000)
    p.add_argument("--lr", type=positive_float, default=4.5e-6 * 32,
                   help="LDM: 4.5e-6 per image of the batch")
    p.add_argument("--kl-weight", type=nonnegative_float, default=KL_WEIGHT)
    p.add_argument("--l2-weight", type=nonnegative_float, default=0.0,
                   help="adds this times the squared error: it weighs the few large errors (a small shape's "
                        "wrong colour) above the many small ones that L1 spends its gradient on (a texture's "
                        "noise)")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init: train the decoder alone; the encoder, its latents and their scaling "
                        "factor stay as they are, so the VAE still fits a U-Net trained on them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=nonnegative_int, default=2)
    p.add_argument("--log-steps", type=positive_int, default=50,
                   help="log (and check for NaN) every N steps, and at each save")
    p.add_argument("--save-steps", type=positive_int, default=1000)
    p.add_argument("--keep", type=positive_int, default=2, help="checkpoints to keep")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh when it holds another run; without it such an --out is refused")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.decoder_only and not args.init:
        p.error("--decoder-only keeps an encoder that is already trained: give it with --init, not --config")
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution}: the VAE halves the size 3 times; give a multiple of 8")
    return args


def with_scaling_factor(vae: AutoencoderKL, loader, device, batches: int = 8) -> AutoencoderKL:
    """The same VAE with scaling_factor = 1 / std of its latents over a few batches (LDM scale_by_std)."""
    latents = []
    with torch.no_grad():
        for i, batch in zip(range(batches), loader):
            if batch is not None:
                latents.append(vae.encode(batch["pixels"].to(device))
                               .sample(torch.Generator().manual_seed(i)))
    config = dataclasses.replace(vae.config, scaling_factor=1.0 / torch.cat(latents).std().item())
    scaled = AutoencoderKL(config).to(device)
    scaled.load_state_dict(vae.state_dict())
    return scaled


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with bad_input_exits("train_vae.py"):
        device = check_device(args.device)
        if args.init and args.init.resolve() == args.out.resolve():
            raise UsageError(f"--out {args.out} is the --init model, which training would overwrite; give a "
                             "new --out (the model it starts from is never written to)")
        data = open_data(args.data, args.resolution, args.batch_size, flip=False, seed=args.seed)
        config = dict(data=str(args.data), resolution=args.resolution,
                      start=f"--config {args.config}" if args.config else f"--init {args.init}",
                      decoder_only=args.decoder_only)
        open_run(args.out, config, args.overwrite, RUN_OUTPUTS)
        if args.config:
            vae = AutoencoderKL(VAEConfig.from_diffusers(read_json(args.config))).to(device)
        else:
            vae = load_vae(args.init, device=device)
        vae.train().requires_grad_(True)
        if args.decoder_only:  # eval(): the encoder is a fixed function (it has no dropout or batch norm)
            for frozen in vae.encoding_modules().values():
                frozen.eval().requires_grad_(False)
        trained = [p for p in vae.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.5, 0.9))  # LDM's autoencoder's
        state = TrainState({"vae": vae}, optimizer)
        if found := checkpoints(args.out):  # a re-run goes on from the last checkpoint
            state.restore(found[-1], read_training_state(found[-1]))
        loader = make_loader(data, args.batch_size, args.num_workers, pin_memory=device.type == "cuda")

    saves = Checkpoints(args.out, args.keep, dict(args=json.dumps(vars(args), default=str)), "train_vae.py")
    fixed = torch.rand(1, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))

    def probe() -> torch.Tensor:  # what a save checks the weights with: one fixed image through the VAE
        return vae.decode(vae.encode(fixed.to(device) * 2 - 1).mean)

    log = RunLog(args.out, 0, args.max_steps, state.step, "training the VAE", shown=("rec_per_pixel", "kl"),
                 plotted=("rec", "kl"))
    meter = LossMeter(device, 1, terms=("rec", "kl"))
    stream = batches(loader, state)

    def step() -> None:
        batch = next(stream)
        x = batch["pixels"].to(device)
        posterior = vae.encode(x)
        # the posterior's draw comes from the batch's seeds, so a resumed run draws the same
        x_rec = vae.decode(posterior.sample(torch.Generator().manual_seed(int(batch["seed"][0]))))
        # LDM sums over pixels and averages over the batch: the KL weight means the same at any size
        rec = (x - x_rec).abs().flatten(1).sum(1).mean()
        kl = posterior.kl().mean()
        l2 = (x - x_rec).square().flatten(1).sum(1).mean()
        loss = rec + args.kl_weight * kl + args.l2_weight * l2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add({"rec": rec, "kl": kl}, 1, len(x))

    def row(logged: dict) -> dict:
        pixels = 3 * args.resolution**2
        return logged | dict(rec_per_pixel=logged["rec"] / pixels, skipped=loader.dataset.skipped)

    try:
        every = Every(args.max_steps, args.log_steps, args.save_steps)
        finished = loop(state, step, every, saves, log, meter, row, probe, device=device)
    except TrainingError as e:
        print(f"train_vae.py: error: {e}", file=sys.stderr)
        return 1
    if not finished:
        return 0

    vae.eval()
    if not args.decoder_only:  # a kept encoder keeps its scaling factor, which the U-Net was trained with
        vae = with_scaling_factor(vae, loader, device)
    save_vae(vae, args.out)
    print(f"VAE after {state.step} steps: {args.out} (scaling_factor {vae.scaling_factor:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
