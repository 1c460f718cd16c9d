"""Train SD's autoencoder (AutoencoderKL) on a folder of images, as LDM trains its first stage
(Rombach et al., arXiv 2112.10752, sec. 3.1 and appendix G): L1 reconstruction plus a small KL
pull of the posterior towards N(0, I). LDM adds a perceptual (LPIPS) and an adversarial loss for
photographs; for small synthetic domains such as the toy world, reconstruction + KL is enough.

    python train_vae.py --data data/toy/train --config toy_vae.json --out weights/toy-vae --resolution 64
    python train_vae.py --data data/toy/train --init weights/toy-vae --out weights/toy-vae-2 --max-steps 2000

At the end the latents' scaling factor is set to 1 / their standard deviation on the data (LDM's
`scale_by_std`), so that the U-Net sees latents of about unit variance, as SD's 0.18215 does for SD.
The output folder is a diffusers AutoencoderKL folder (config.json + weights).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minisd.checkpoints.diffusers import load_vae, save_vae
from minisd.checkpoints.files import read_json
from minisd.data import make_loader, open_dataset
from minisd.vae import AutoencoderKL, VAEConfig

KL_WEIGHT = 1e-6  # LDM's kl-f8 autoencoder config (lossconfig.params.kl_weight)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder with metadata.csv/jsonl, or tar shards")
    p.add_argument("--out", type=Path, required=True, help="output folder (diffusers AutoencoderKL layout)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--config", type=Path,
                       help="a diffusers AutoencoderKL config.json: train from random weights")
    start.add_argument("--init", type=Path, help="a VAE folder to go on training")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=4.5e-6 * 32, help="LDM: 4.5e-6 per image of the batch")
    p.add_argument("--kl-weight", type=float, default=KL_WEIGHT)
    p.add_argument("--l2-weight", type=float, default=0.0,
                   help="adds this times the squared error: it weighs the few large errors (a small shape's "
                        "wrong colour) above the many small ones that L1 spends its gradient on (a texture's "
                        "noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--log-steps", type=int, default=50)
    p.add_argument("--save-steps", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


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
    device = torch.device(args.device)
    if args.config:
        vae = AutoencoderKL(VAEConfig.from_diffusers(read_json(args.config))).to(device)
    else:
        vae = load_vae(args.init, device=device)
    vae.train().requires_grad_(True)
    data = open_dataset(args.data, args.resolution, random_flip=False, seed=args.seed)
    loader = make_loader(data, args.batch_size, args.num_workers, pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.5, 0.9))  # LDM's autoencoder betas
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.jsonl", "w")
    sums, step, batches = torch.zeros(2, device=device), 0, iter(loader)
    bar = tqdm(total=args.max_steps, desc="training the VAE")

    while step < args.max_steps:
        batch = next(batches, StopIteration)
        if batch is StopIteration:  # one pass is one epoch; the loader starts the next by itself
            batches = iter(loader)
            continue
        if batch is None:  # a batch whose images all failed to load (counted by the data set)
            continue
        x = batch["pixels"].to(device)
        posterior = vae.encode(x)
        x_rec = vae.decode(posterior.sample())
        # LDM sums over pixels and averages over the batch, so the KL weight means the same at any size
        rec = (x - x_rec).abs().flatten(1).sum(1).mean()
        kl = posterior.kl().mean()
        loss = rec + args.kl_weight * kl + args.l2_weight * (x - x_rec).square().flatten(1).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([rec.detach(), kl.detach()])
        step += 1
        bar.update(1)
        if step % args.log_steps == 0 or step == args.max_steps:
            rec_mean, kl_mean = (sums / (step % args.log_steps or args.log_steps)).tolist()
            if not torch.isfinite(sums).all():
                sys.exit(f"train_vae.py: the loss became non-finite by step {step}; try a lower --lr")
            row = dict(step=step, rec=rec_mean, rec_per_pixel=rec_mean / x[0].numel(), kl=kl_mean)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(rec_per_pixel=f"{row['rec_per_pixel']:.4f}", kl=f"{kl_mean:.1f}")
            sums.zero_()
        if step % args.save_steps == 0:
            save_vae(vae, args.out)

    vae.eval()
    vae = with_scaling_factor(vae, loader, device)
    save_vae(vae, args.out)
    log.close()
    print(f"VAE after {step} steps: {args.out} (scaling_factor {vae.scaling_factor:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
