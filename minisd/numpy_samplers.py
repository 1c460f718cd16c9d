"""PNDM (PLMS), DDIM, DPM-Solver++(2M) and LCM in numpy, step for step as minisd/schedulers runs them, for the
torch-free ONNX runner (minisd/onnx_runner.py); and torch's CPU Gaussian noise, so that a seed gives the
same latents as in minisd and diffusers.

The equations, their sources and diffusers' quirks are explained in the torch versions (schedule.py, pndm.py,
ddim.py, dpm.py, lcm.py), which these follow line by line: the same config keys and defaults, the same
timesteps, the same float32 arithmetic, zero terminal SNR included. tests/test_numpy_samplers.py holds each to
its torch twin. For all four samplers the U-Net sees x as it is (scale_model_input is the identity) and the
first x is unit-variance noise.
"""

import numpy as np

# diffusers' defaults (the DDPM paper's linear schedule), used where a config lacks the key
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_BETA_START, DEFAULT_BETA_END = 0.0001, 0.02
PLMS_WEIGHTS = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}  # pndm.py
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # lcm.py
LCM_DEFAULTS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
FINITE_TERMINAL_ALPHA_BAR = np.float32(2.0**-24)  # schedule.py: a zero alpha_bar_T, for the sigma samplers


class TorchCPURandom:
    """torch.Generator("cpu").manual_seed(seed) with torch.randn(shape, generator=...) in float32, in numpy.

    torch's CPU generator is a 32-bit Mersenne Twister (MT19937) seeded by its reference init_genrand, which
    numpy's MT19937 runs as well once given the same state. torch.randn of 16 or more float32 values takes
    one 32-bit draw per value, keeps 24 bits as a uniform u = bits / 2^24, and turns blocks of 16 into normals
    by Box-Muller: u[0:8] give the radii, u[8:16] the angles. A length that is not a multiple of 16 redraws
    its last 16 values (aten/src/ATen/native/cpu/DistributionTemplates.h, normal_fill). The values agree with
    torch's to float32 rounding (~2e-7).
    """

    def __init__(self, seed: int):
        key = np.zeros(624, dtype=np.uint32)
        key[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):  # MT19937's init_genrand, as torch's mt19937 constructor seeds it
            prev = int(key[i - 1])
            key[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
        self.bits = np.random.MT19937()
        self.bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}

    def uniform(self, n: int) -> np.ndarray:
        return (self.bits.random_raw(n) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)

    def randn(self, shape: tuple) -> np.ndarray:
        n = int(np.prod(shape))
        if n < 16:
            raise ValueError(f"cannot draw noise of shape {shape}: torch draws fewer than 16 values another "
                             "way, which is not reproduced here; use larger images")
        x = self.uniform(n)
        whole = n - n % 16
        x[:whole] = box_muller(x[:whole])
        if n % 16:
            x[-16:] = box_muller(self.uniform(16))
        return x.reshape(shape)


def box_muller(u: np.ndarray) -> np.ndarray:
    """Uniforms in blocks of 16 -> as many normals: radius from the first 8, angle from the last 8."""
    u = u.reshape(-1, 16)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u[:, :8]))  # 1 - u in (0, 1]: log is finite
    theta = np.float32(2.0 * np.pi) * u[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).ravel()


# ---- the noise schedule (schedule.py) ------------------------------------------------------------

def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose alpha_bar_T is 0 (schedule.py's, in the same order of float32 operations)."""
    root = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float64).astype(np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    return np.float32(1) - np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


class Schedule:
    """alphas_cumprod [T] (float32) of a diffusers scheduler_config.json, and the prediction type.
    finite_sigmas: a zero terminal alpha_bar raised to FINITE_TERMINAL_ALPHA_BAR (DPM-Solver's)."""

    def __init__(self, config: dict, finite_sigmas: bool = False):
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler config prediction_type={self.prediction_type!r} is not supported")
        zero_snr = config.get("rescale_betas_zero_snr", False)
        if zero_snr and self.prediction_type == "epsilon":
            raise ValueError("scheduler config rescale_betas_zero_snr=True needs prediction_type "
                             "'v_prediction': at zero terminal SNR an epsilon model cannot estimate the "
                             "image")
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float32)
        else:
            start = config.get("beta_start", DEFAULT_BETA_START)
            end = config.get("beta_end", DEFAULT_BETA_END)
            steps = config.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)
            schedule = config.get("beta_schedule", "linear")
            if schedule == "linear":
                betas = np.linspace(start, end, steps, dtype=np.float32)
            elif schedule == "scaled_linear":  # linear in sqrt(beta), then squared
                betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float32) ** 2
            else:
                raise ValueError(f"scheduler config beta_schedule={schedule!r} is not supported")
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float64).astype(np.float32)
        if zero_snr and finite_sigmas:
            self.alphas_cumprod[-1] = FINITE_TERMINAL_ALPHA_BAR
        # Karras' sigma of the same process: sqrt((1 - alpha_bar) / alpha_bar)
        with np.errstate(divide="ignore"):  # infinite at a zero alpha_bar, which only DDIM and LCM visit
            self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        """q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        alpha_bar = self.alphas_cumprod[t]
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int, offset: int = 0) -> np.ndarray:
    """The training timesteps a run visits, descending: base.py's spaced_timesteps."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, not {steps}")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (num_train_timesteps // steps))[::-1] + offset
    if spacing == "trailing":
        return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)) - 1
    raise ValueError(f"scheduler config timestep_spacing={spacing!r} is not supported")


class Sampler:
    """What the four share (base.py's Sampler): the schedule, the spacing, add_noise for img2img."""
    finite_sigmas = False  # True where steps divide by Karras' sigma

    def __init__(self, config: dict, spacing_default: str):
        self.schedule = Schedule(config, self.finite_sigmas)
        self.spacing = config.get("timestep_spacing", spacing_default)
        self.steps_offset = config.get("steps_offset", 0)
        self.timesteps = np.zeros(0, dtype=np.int64)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def spaced(self, steps: int) -> np.ndarray:
        return spaced_timesteps(self.spacing, steps, self.schedule.num_train_timesteps, self.steps_offset)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Clean latents noised to the level of timesteps[i] (img2img starts its loop there)."""
        return self.schedule.add_noise(x0, noise, self.timesteps[i])


# ---- PNDM's PLMS (pndm.py) ----------------------------------------------------------------------

class PNDM(Sampler):
    def __init__(self, config: dict):
        super().__init__(config, spacing_default="leading")
        if not config.get("skip_prk_steps", True):
            raise ValueError("scheduler config skip_prk_steps=False (PRK warm-up) is not supported")
        alphas_cumprod = self.schedule.alphas_cumprod
        self.final_alpha_cumprod = (np.float32(1.0) if config.get("set_alpha_to_one", False)
                                    else alphas_cumprod[0])
        self.stride = 0
        self.eps_history: list[np.ndarray] = []
        self.warmup_x: np.ndarray | None = None

    def set_timesteps(self, steps: int) -> None:
        t = self.spaced(steps).round().astype(np.int64)
        if self.schedule.alphas_cumprod[t[0]] == 0:  # its step divides by sqrt(alpha_bar)
            raise ValueError(f"PNDM cannot start at timestep {t[0]}, where this zero-terminal-SNR schedule "
                             "has no signal; use 'leading' timestep spacing or another sampler (ddim, dpm)")
        self.timesteps = np.concatenate([t[:2], t[1:]])  # t1 twice: call 1 redoes the first step
        self.stride = self.schedule.num_train_timesteps // steps
        self.eps_history, self.warmup_x = [], None

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, random=None) -> np.ndarray:
        t = int(self.timesteps[i])
        if not self.eps_history:  # call 0: a first-order step
            self.eps_history.append(model_output)
            self.warmup_x = x
            return self.transfer(x, model_output, t, t - self.stride)
        if self.warmup_x is not None:  # call 1: redo call 0's step from its x, with the averaged eps
            eps = (model_output + self.eps_history[-1]) / 2
            x, self.warmup_x = self.warmup_x, None
            return self.transfer(x, eps, t + self.stride, t)
        self.eps_history = self.eps_history[-3:] + [model_output]
        weights, denominator = PLMS_WEIGHTS[len(self.eps_history)]
        eps = sum(w * e for w, e in zip(weights, reversed(self.eps_history))) / denominator
        return self.transfer(x, eps, t, t - self.stride)

    def transfer(self, x: np.ndarray, model_output: np.ndarray, t: int, t_prev: int) -> np.ndarray:
        """PNDM's transfer part phi (eq. 9): x at t -> x at t_prev, given eps."""
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = self.schedule.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "v_prediction":  # eps from v
            model_output = alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * x
        x_coeff = (alpha_bar_prev / alpha_bar) ** 0.5
        eps_denominator = (alpha_bar * (1 - alpha_bar_prev) ** 0.5
                           + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5)
        return x_coeff * x - (alpha_bar_prev - alpha_bar) * model_output / eps_denominator


# ---- DDIM, eta = 0 (ddim.py) ----------------------------------------------------------------------

class DDIM(Sampler):
    def __init__(self, config: dict):
        super().__init__(config, spacing_default="leading")
        if config.get("thresholding", False):
            raise ValueError("scheduler config thresholding=True is not supported")
        self.final_alpha_cumprod = (np.float32(1.0) if config.get("set_alpha_to_one", True)
                                    else self.schedule.alphas_cumprod[0])
        self.clip_x0 = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None
        self.stride = 0

    def set_timesteps(self, steps: int) -> None:
        self.timesteps = self.spaced(steps).round().astype(np.int64)
        self.stride = self.schedule.num_train_timesteps // steps

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, random=None) -> np.ndarray:
        t = int(self.timesteps[i])
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = (self.schedule.alphas_cumprod[t - self.stride] if t - self.stride >= 0
                          else self.final_alpha_cumprod)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        else:
            x0 = alpha_bar**0.5 * x - (1 - alpha_bar) ** 0.5 * model_output
            eps = alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * x
        if self.clip_x0 is not None:
            x0 = x0.clip(-self.clip_x0, self.clip_x0)
        return alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps


# ---- DPM-Solver++(2M) (dpm.py) ------------------------------------------------------------------

def alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """Karras' sigma -> (alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def half_log_snr(alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
    """lambda = log(alpha_t / sigma_t) (+inf at sigma = 0, the last step's target)."""
    with np.errstate(divide="ignore"):
        return np.log(alpha_t) - np.log(sigma_t)


class DPMSolver(Sampler):
    finite_sigmas = True

    def __init__(self, config: dict):
        super().__init__(config, spacing_default="linspace")
        if config.get("solver_order", 2) != 2 or config.get("algorithm_type", "dpmsolver++") not in (
                "dpmsolver++", "deis"):
            raise ValueError("scheduler config: only DPM-Solver++ of order 2 is supported")
        self.sigmas = np.zeros(0, dtype=np.float32)  # sigma at each timestep, then 0
        self.prev_x0: np.ndarray | None = None

    def set_timesteps(self, steps: int) -> None:
        t = self.spaced(steps) if self.spacing == "trailing" else self.spaced(steps + 1)[:-1]
        self.timesteps = t.round().astype(np.int64)
        self.sigmas = np.append(self.schedule.sigmas[self.timesteps], np.float32(0.0))
        self.prev_x0 = None

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i])
        return alpha_t * x0 + sigma_t * noise

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, random=None) -> np.ndarray:
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            x0 = (x - sigma_t * model_output) / alpha_t
        else:  # v = alpha_t eps - sigma_t x0
            x0 = alpha_t * x - sigma_t * model_output
        alpha_next, sigma_next = alpha_sigma(self.sigmas[i + 1])
        lambda_t = half_log_snr(alpha_t, sigma_t)
        h = half_log_snr(alpha_next, sigma_next) - lambda_t
        # first order (DDIM): x0 held constant over the step
        x_coeff, x0_coeff = sigma_next / sigma_t, alpha_next * (1.0 - np.exp(-h))
        x_next = x_coeff * x + x0_coeff * x0
        if self.prev_x0 is not None and i < len(self.timesteps) - 1:
            # second order: D = x0 + (x0 - x0_prev) / 2r, as a separate term (as dpm.py)
            r = (lambda_t - half_log_snr(*alpha_sigma(self.sigmas[i - 1]))) / h
            x_next = x_next + 0.5 * x0_coeff * ((1 / r) * (x0 - self.prev_x0))
        self.prev_x0 = x0
        return x_next


# ---- multistep latent consistency sampling (lcm.py) --------------------------------------------

def lcm_timesteps(steps: int, original_steps: int, num_train_timesteps: int) -> np.ndarray:
    """`steps` timesteps, evenly by index from the distillation's skipping schedule (k - 1, ..., T - 1)."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM samples 1 to original_inference_steps = {original_steps} steps (the timesteps "
                         f"it was distilled on), not {steps}")
    k = num_train_timesteps // original_steps
    skipping = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return skipping[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]


class LCM(Sampler):
    def __init__(self, config: dict):
        config = {**LCM_DEFAULTS, **config}
        super().__init__(config, spacing_default="leading")
        self.clip_x0 = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
        self.original_steps = config.get("original_inference_steps", 50)
        self.timestep_scaling = config.get("timestep_scaling", TIMESTEP_SCALING)

    def set_timesteps(self, steps: int) -> None:
        self.timesteps = lcm_timesteps(steps, self.original_steps, self.schedule.num_train_timesteps)

    def consistency(self, model_output: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        """f(x, t) = c_skip x + c_out x0_hat at timesteps[i]."""
        t = int(self.timesteps[i])
        alpha_bar = self.schedule.alphas_cumprod[t]
        if self.prediction_type == "epsilon":
            x0 = (x - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
        else:
            x0 = alpha_bar**0.5 * x - (1 - alpha_bar) ** 0.5 * model_output
        if self.clip_x0 is not None:
            x0 = x0.clip(-self.clip_x0, self.clip_x0)
        scaled = np.float32(t * self.timestep_scaling)
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_out * x0 + c_skip * x

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray,
             random: TorchCPURandom | None = None) -> np.ndarray:
        x0 = self.consistency(model_output, i, x)
        if i == len(self.timesteps) - 1:
            return x0
        alpha_bar_next = self.schedule.alphas_cumprod[self.timesteps[i + 1]]
        return alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * random.randn(x0.shape)


SAMPLER_CLASSES = {"pndm": PNDM, "ddim": DDIM, "dpm": DPMSolver, "lcm": LCM}
SAMPLERS = tuple(SAMPLER_CLASSES)


def make_sampler(name: str, config: dict) -> Sampler:
    """A sampler by name (one of SAMPLERS) over the noise schedule that `config` describes."""
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"sampler {name!r} is not ported to numpy; choose one of {', '.join(SAMPLERS)}")
    # keys a live diffusers config marks as filled-in defaults are dropped, as schedule.explicit does
    defaults = config.get("_use_default_values", ())
    return SAMPLER_CLASSES[name]({k: v for k, v in config.items() if k not in defaults})
