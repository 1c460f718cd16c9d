"""The training noise schedule: betas, cumulative alphas, the forward process and the v target.

DDPM (Ho et al. 2020, arXiv 2006.11239) noises data in T = 1000 steps with variances beta_t; all
that training and sampling need is their running product alpha_bar_t = prod_s (1 - beta_s), the
share of signal left at step t (eq. 4). SD trains with the "scaled_linear" betas of the LDM repo:
beta_t is linear in sqrt between 0.00085 and 0.012 (configs/stable-diffusion/v1-inference.yaml).
Betas are computed exactly as diffusers computes them (float32 linspace), so that timesteps index
the same alphas in both.

SD's schedule never reaches pure noise: alpha_bar_T = 0.0047, so the noisiest training input still
holds a trace of the image (its layout, its mean colour), which the sampler's pure-noise start does
not. Lin et al. 2023 (arXiv 2305.08891) rescale the betas so that alpha_bar_T = 0 ("zero terminal
SNR"); diffusers' configs say so with rescale_betas_zero_snr. Such a model must predict v (at
alpha_bar = 0 an epsilon model cannot tell x0 at all) and is sampled from t = T ("trailing" spacing).
"""

import torch

# diffusers' defaults (the DDPM paper's linear schedule), used where a config lacks the key
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_BETA_START, DEFAULT_BETA_END = 0.0001, 0.02
PREDICTION_TYPES = ("epsilon", "v_prediction")
# what diffusers' sigma-based samplers (Euler, DPM-Solver) put in place of a zero terminal alpha_bar, so
# that sigma_T is finite (4096): float16's smallest subnormal
FINITE_TERMINAL_ALPHA_BAR = 2.0**-24


def option(config: dict, key: str, supported: tuple, default=None):
    """config[key], or diffusers' default where the key is absent (`default`, else supported[0]).

    A value minisd does not implement is refused by name rather than silently sampled wrongly.
    """
    value = config.get(key, supported[0] if default is None else default)
    if value not in supported:
        raise ValueError(f"scheduler config {key}={value!r} is not supported by minisd "
                         f"(supported: {', '.join(map(repr, supported))})")
    return value


def explicit(config: dict) -> dict:
    """The config without the keys that diffusers marks as filled-in defaults.

    A live diffusers scheduler's config (`dict(scheduler.config)`) lists under `_use_default_values`
    the keys its class filled in, and `X.from_config` drops them so that X applies its own defaults:
    PNDM's default "leading" spacing does not carry over to Euler. Saved JSON files have no such list.
    """
    defaults = config.get("_use_default_values", ())
    return {key: value for key, value in config.items() if key not in defaults}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose alpha_bar_T is 0 (Lin et al. 2023, Algorithm 1): sqrt(alpha_bar) is shifted so that its
    last value is 0 and scaled so that its first is unchanged, then turned back into betas."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))  # this order of operations rounds as diffusers'
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the running product
    return 1 - alphas


class NoiseSchedule:
    """betas [T] and alphas_cumprod [T] (float32), and the model's prediction type."""

    def __init__(self, betas: torch.Tensor, prediction_type: str = "epsilon",
                 terminal_alpha_bar: float | None = None):
        """terminal_alpha_bar: replaces alphas_cumprod[-1] (a sigma-based sampler's floor for a zero terminal
        SNR)."""
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if terminal_alpha_bar is not None:
            self.alphas_cumprod[-1] = terminal_alpha_bar
        self.prediction_type = prediction_type
        # Karras et al. 2022 (arXiv 2206.00364) view the same process as x0 + sigma * eps: dividing
        # x_t by sqrt(alpha_bar_t) gives sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.on_device: dict[tuple, torch.Tensor] = {}  # alphas_cumprod per (device, dtype), copied once

    @classmethod
    def from_config(cls, config: dict, finite_sigmas: bool = False) -> "NoiseSchedule":
        """From a diffusers scheduler_config.json dict (any scheduler class); unknown keys are ignored.

        finite_sigmas: for the samplers that work in Karras' sigma, which is infinite at alpha_bar = 0: a zero
        terminal alpha_bar is raised to FINITE_TERMINAL_ALPHA_BAR, as diffusers' Euler and DPM-Solver do.
        """
        config = explicit(config)
        zero_snr = option(config, "rescale_betas_zero_snr", (False, True))
        prediction_type = option(config, "prediction_type", PREDICTION_TYPES)
        if zero_snr and prediction_type == "epsilon":
            raise ValueError("scheduler config rescale_betas_zero_snr=True needs prediction_type "
                             "'v_prediction': at zero terminal SNR an epsilon model cannot estimate the "
                             "image")
        if config.get("trained_betas") is not None:  # diffusers lets explicit betas override beta_schedule
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        else:
            schedule = option(config, "beta_schedule", ("linear", "scaled_linear"))
            start = config.get("beta_start", DEFAULT_BETA_START)
            end = config.get("beta_end", DEFAULT_BETA_END)
            steps = config.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)
            if schedule == "linear":
                betas = torch.linspace(start, end, steps, dtype=torch.float32)
            else:  # "scaled_linear": linear in sqrt(beta), then squared (the LDM repo's "linear")
                betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, prediction_type, FINITE_TERMINAL_ALPHA_BAR if zero_snr and finite_sigmas else None)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alphas_cumprod[t] on `device`."""
        # copied to the device once: a blocking copy at every training step would make the host wait for the
        # GPU
        key = (device, dtype)
        if key not in self.on_device:
            self.on_device[key] = self.alphas_cumprod.to(device, dtype)
        return self.on_device[key][torch.as_tensor(t, device=device)]

    def scales(self, t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over x [B, C, H, W]."""
        # t [B] or scalar -> [B or 1, 1, 1, 1]
        alpha_bar = self.alpha_bar(t, x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return alpha_bar**0.5, (1 - alpha_bar) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """A sample of q(x_t | x_0) (Ho et al. 2020, eq. 4): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t)
        noise."""
        signal, noise_scale = self.scales(t, x0)
        return signal * x0 + noise_scale * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The v target (Salimans & Ho 2022, arXiv 2202.00512, Sec. 4):
        sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
        signal, noise_scale = self.scales(t, x0)
        return signal * noise - noise_scale * x0

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """[B] loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556, eq. 7), as diffusers'
        train_text_to_image.py --snr_gamma applies them: min(SNR_t, gamma) / SNR_t for an epsilon target,
        / (SNR_t + 1) for v. SNR_t = alpha_bar_t / (1 - alpha_bar_t). Uniform timesteps spend most of the
        gradient on the nearly clean steps (SNR up to ~1000), where the noise is easy to see and a caption
        barely matters; capping the weight there leaves more of it to the noisy steps that lay out the
        scene. (At zero terminal SNR the v weight at t = T is 0, which drops the one step where the layout
        can come from the caption alone.)"""
        alpha_bar = self.alpha_bar(t, t.device)
        snr = alpha_bar / (1 - alpha_bar)
        capped = snr.clamp(max=gamma)
        return capped / snr if self.prediction_type == "epsilon" else capped / (snr + 1)

    def sigmas_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Karras' sigma at (possibly fractional) timesteps, linear between training steps.

        Interpolated in float64 and rounded to float32, as diffusers does with np.interp.
        """
        t = timesteps.double()
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_train_timesteps - 1)
        sigmas = self.sigmas.double()
        return (sigmas[low] + (t - low) * (sigmas[high] - sigmas[low])).float()
