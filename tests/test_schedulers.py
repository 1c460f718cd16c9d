"""Parity of minisd's samplers with diffusers' schedulers, and of the noise schedule with DDPM's.

Each diffusers scheduler is built the way a user switching schedulers builds it,
`X.from_config(config)` with SD's shipped config, so that the defaults diffusers fills in for
absent keys are part of what is checked (SD-v1's PNDM config has no timestep_spacing: DDIM then
spaces "leading", Euler and DPM-Solver "linspace"). A fake model, a fixed function of (x, t), stands
in for the U-Net; every intermediate latent of a loop must agree.
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from diffusers.training_utils import compute_snr
from reference import rel_diff

from minisd.schedulers import SAMPLERS, NoiseSchedule, make_sampler
from minisd.schedulers.lcm import boundary_scalings

# runwayml/stable-diffusion-v1-5 and CompVis/stable-diffusion-v1-4: scheduler/scheduler_config.json
SD_V1 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
         "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
         "clip_sample": False}
# stabilityai/stable-diffusion-2-1 as re-saved by newer diffusers: another class, extra keys
SD_V21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
          "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
          "prediction_type": "v_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
          "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "thresholding": False,
          "timestep_spacing": "leading", "trained_betas": None}
REFERENCE = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
             "euler_a": EulerAncestralDiscreteScheduler, "dpm": DPMSolverMultistepScheduler,
             "lcm": LCMScheduler}
STOCHASTIC = (EulerAncestralDiscreteScheduler, LCMScheduler)  # their step draws noise from the generator
SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-5  # float32, relative to the latents' scale
FIXED = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the U-Net that depends on both x and the (int or float) timestep."""
    t, fixed = torch.as_tensor(t, dtype=torch.float32), FIXED.to(x.dtype)
    return 0.1 * x + 0.05 * torch.sin(t / 100 * 3 + fixed) + 0.2 * fixed


def initial(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def generators(seed, per_item: bool):
    if per_item:
        return [torch.Generator().manual_seed(seed + k) for k in range(SHAPE[0])]
    return torch.Generator().manual_seed(seed)


def reference_loop(ref, x, timesteps, generator=None) -> list[torch.Tensor]:
    """diffusers' denoising loop, as StableDiffusionPipeline runs it (without guidance)."""
    extra = {"generator": generator} if isinstance(ref, STOCHASTIC) else {}
    latents = []
    for t in timesteps:
        x = ref.step(fake_model(ref.scale_model_input(x, t), t), t, x, **extra).prev_sample
        latents.append(x)
    return latents


def minisd_loop(sampler, x, start: int = 0, generator=None) -> list[torch.Tensor]:
    latents = []
    for i in range(start, len(sampler.timesteps)):
        x = sampler.step(fake_model(sampler.scale_model_input(x, i), sampler.timesteps[i]), i, x, generator)
        latents.append(x)
    return latents


def assert_same_latents(ours: list[torch.Tensor], theirs: list[torch.Tensor]):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert rel_diff(b, a) < TOLERANCE, f"step {i}: {rel_diff(b, a)}"


def both(name: str, config: dict, steps: int):
    sampler, ref = make_sampler(name, config), REFERENCE[name].from_config(config)
    sampler.set_timesteps(steps)
    ref.set_timesteps(steps)
    return sampler, ref


def check_run(name: str, config: dict, steps: int, per_item: bool = False, dtype=torch.float32):
    sampler, ref = both(name, config, steps)
    assert sampler.timesteps.dtype == ref.timesteps.dtype and torch.equal(sampler.timesteps, ref.timesteps)
    assert sampler.init_noise_sigma == float(ref.init_noise_sigma)
    x = (initial() * sampler.init_noise_sigma).to(dtype)
    ours = minisd_loop(sampler, x, generator=generators(7, per_item))
    assert all(latents.dtype == dtype for latents in ours)
    assert_same_latents(ours, reference_loop(ref, x, ref.timesteps, generators(7, per_item)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("name", SAMPLERS)
def test_loop_matches_diffusers(name, steps, prediction_type):
    check_run(name, dict(SD_V1, prediction_type=prediction_type), steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_fp16_loop_matches_diffusers(name, prediction_type):
    """fp16 latents and model outputs (the BK-SDM evaluation runs fp16): Euler and DPM-Solver step
    in fp32 and cast back, as diffusers does, and round where it rounds."""
    check_run(name, dict(SD_V1, prediction_type=prediction_type), 25, dtype=torch.float16)


@pytest.mark.parametrize("steps", [25, 30])  # 30: T / steps is not a whole number
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_timestep_spacings_of_sd_v21_config(name, spacing, steps):
    check_run(name, dict(SD_V21, timestep_spacing=spacing), steps)


@pytest.mark.parametrize("name", SAMPLERS)
def test_class_defaults_where_keys_are_absent(name):
    """A bare config: linear betas, each class's own defaults (DDIM clips x0 and ends at alpha_bar 1)."""
    check_run(name, {"skip_prk_steps": True} if name == "pndm" else {}, 20)


@pytest.mark.parametrize("name", SAMPLERS)
def test_config_of_a_live_diffusers_scheduler(name):
    """`scheduler.config` marks the keys its class filled in (`_use_default_values`); from_config
    drops them, so PNDM's default "leading" spacing must not carry over to Euler or DPM-Solver."""
    live = dict(PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              skip_prk_steps=True, steps_offset=1).config)
    assert live["timestep_spacing"] == "leading" and "timestep_spacing" in live["_use_default_values"]
    check_run(name, live, 25)


@pytest.mark.parametrize("name", SAMPLERS)
def test_trained_betas(name):
    betas = torch.linspace(0.0001, 0.03, 500).tolist()
    check_run(name, {"trained_betas": betas, "num_train_timesteps": 500, "skip_prk_steps": True}, 20)


@pytest.mark.parametrize("per_item", [False, True])
def test_euler_ancestral_generators(per_item):
    check_run("euler_a", SD_V1, 25, per_item=per_item)
    sampler = make_sampler("euler_a", SD_V1)
    sampler.set_timesteps(10)
    x = initial() * sampler.init_noise_sigma
    again = minisd_loop(sampler, x, generator=generators(7, per_item))[-1]
    assert torch.equal(again, minisd_loop(sampler, x, generator=generators(7, per_item))[-1])
    assert not torch.equal(again, minisd_loop(sampler, x, generator=generators(8, per_item))[-1])


@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise(name):
    sampler, ref = both(name, SD_V1, 25)
    x0, noise = initial(1), initial(2)
    for i in (0, 1, 2, 12, len(sampler.timesteps) - 1):
        theirs = ref.add_noise(x0, noise, ref.timesteps[i:i + 1].repeat(SHAPE[0]))
        assert rel_diff(theirs, sampler.add_noise(x0, noise, i)) < TOLERANCE


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_start_midway(name, prediction_type):
    """As StableDiffusionImg2ImgPipeline: noise clean latents to timesteps[t_start], run from there."""
    steps, strength = 25, 0.6
    sampler, ref = both(name, dict(SD_V1, prediction_type=prediction_type), steps)
    t_start = steps - int(steps * strength)
    timesteps = ref.timesteps[t_start * ref.order:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    x0, noise = initial(1), initial(2)
    theirs = ref.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
    ours = sampler.add_noise(x0, noise, t_start)
    assert rel_diff(theirs, ours) < TOLERANCE
    assert_same_latents(minisd_loop(sampler, ours, t_start, generators(3, False)),
                        reference_loop(ref, theirs, timesteps, generators(3, False)))


@pytest.mark.parametrize("name", SAMPLERS)
def test_history_is_cleared_between_runs(name):
    sampler = make_sampler(name, SD_V1)
    sampler.set_timesteps(10)
    x = initial() * sampler.init_noise_sigma
    first = minisd_loop(sampler, x, generator=generators(7, False))
    sampler.reset()
    assert torch.equal(first[-1], minisd_loop(sampler, x, generator=generators(7, False))[-1])
    sampler.set_timesteps(10)
    assert torch.equal(first[-1], minisd_loop(sampler, x, generator=generators(7, False))[-1])


def test_pinned_timesteps_of_sd_v1_config():
    """25 steps from SD-v1's config: each sampler's spacing default, and PLMS's repeated t1."""
    expected = {"pndm": ([961, 921, 921, 881], [41, 1], 26), "ddim": ([961, 921, 881, 841], [41, 1], 25),
                "euler": ([999.0, 957.375, 915.75, 874.125], [41.625, 0.0], 25),
                "euler_a": ([999.0, 957.375, 915.75, 874.125], [41.625, 0.0], 25),
                "dpm": ([999, 959, 919, 879], [80, 40], 25), "lcm": ([999, 959, 919, 879], [79, 39], 25)}
    for name, (head, tail, count) in expected.items():
        sampler = make_sampler(name, SD_V1)
        sampler.set_timesteps(25)
        t = sampler.timesteps.tolist()
        assert (t[:4], t[-2:], len(t)) == (head, tail, count), name
    euler = make_sampler("euler", SD_V1)
    euler.set_timesteps(25)
    assert euler.init_noise_sigma == pytest.approx(14.614647, abs=1e-5)  # sigma_max, linspace spacing
    euler = make_sampler("euler", SD_V21)  # leading spacing: sqrt(sigma_max^2 + 1), at t = 961
    euler.set_timesteps(25)
    assert euler.init_noise_sigma == pytest.approx((float(euler.sigmas[0]) ** 2 + 1) ** 0.5)


def test_pndm_warmup_redoes_the_first_step():
    """Call 1 (the second t=921) restarts from call 0's x with the mean of both eps; its own eps is
    not kept. With a constant model output the redone step lands exactly where call 0 did."""
    sampler = make_sampler("pndm", SD_V1)
    sampler.set_timesteps(25)
    x, eps = initial(), 0.3 * initial(1)
    x1 = sampler.step(eps, 0, x)
    assert len(sampler.eps_history) == 1 and sampler.warmup_x is x
    assert torch.equal(sampler.step(eps, 1, x1), x1)
    assert len(sampler.eps_history) == 1 and sampler.warmup_x is None
    sampler.step(2 * eps, 2, x1)
    assert len(sampler.eps_history) == 2 and torch.equal(sampler.eps_history[0], eps)


def test_noise_schedule_matches_ddpm():
    for config in (SD_V1, SD_V21, {}, {"beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.01}):
        schedule, ref = NoiseSchedule.from_config(config), DDPMScheduler.from_config(config)
        assert torch.equal(schedule.betas,
                           ref.betas) and torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)
        assert schedule.prediction_type == ref.config.prediction_type
    schedule, ref = NoiseSchedule.from_config(SD_V1), DDPMScheduler.from_config(SD_V1)
    x0, noise = initial(1), initial(2)
    for t in (torch.tensor([0, 999]), torch.tensor([500, 17]), torch.tensor(250)):
        assert torch.equal(schedule.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
        assert torch.equal(schedule.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    assert schedule.add_noise(x0, noise, 250).shape == SHAPE


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    """Min-SNR-gamma's weights from diffusers' own SNR (training_utils.compute_snr), as its
    train_text_to_image.py forms them: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    config = {**SD_V1, "prediction_type": prediction_type}
    schedule, ref = NoiseSchedule.from_config(config), DDPMScheduler.from_config(config)
    t = torch.tensor([0, 10, 100, 250, 500, 999])
    snr = compute_snr(ref, t)
    expected = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    weights = schedule.min_snr_weights(t, 5.0)
    torch.testing.assert_close(weights, expected)
    if prediction_type == "epsilon":  # capped where the SNR exceeds gamma, 1 where it does not
        assert weights[0] < 0.01 and weights[-1] == 1.0


def test_pinned_loop_values():
    """x[0, 0, 0, 0] after steps 0, 1 and 24 of 25, SD-v1 config, the fake model (values from diffusers).
    PNDM's first two steps both land at t=921, and its first one is DDIM's (eq. 9 is the DDIM step)."""
    expected = {"pndm": (-1.311118, -1.308818, -6.855368), "ddim": (-1.311119, -1.522248, -6.986508),
                "euler": (-15.099933, -14.173761, -8.450392), "euler_a": (-19.880432, -15.938487, -2.827488),
                "dpm": (-1.310468, -1.540367, -8.359725), "lcm": (-1.702967, -1.207241, 5.475402)}
    for name, values in expected.items():
        sampler = make_sampler(name, SD_V1)
        sampler.set_timesteps(25)
        latents = minisd_loop(sampler, initial() * sampler.init_noise_sigma, generator=generators(7, False))
        assert [float(x[0, 0, 0, 0]) for x in (latents[0], latents[1],
                                               latents[-1])] == pytest.approx(values, abs=1e-5)


@pytest.mark.parametrize("name, key, value", [
    *[(name, key, value) for name in SAMPLERS for key, value in [
        ("rescale_betas_zero_snr", True), ("beta_schedule", "squaredcos_cap_v2"),
        ("prediction_type", "sample"), ("timestep_spacing", "uniform")]],
    ("pndm", "skip_prk_steps", False), ("ddim", "thresholding", True),
    ("euler", "use_karras_sigmas", True), ("euler", "interpolation_type", "log_linear"),
    ("dpm", "solver_order", 3), ("dpm", "algorithm_type", "sde-dpmsolver++"),
    ("dpm", "use_karras_sigmas", True), ("dpm", "thresholding", True),
    ("dpm", "final_sigmas_type", "sigma_min")])
def test_unsupported_config_values_are_refused_by_name(name, key, value):
    with pytest.raises(ValueError, match=key):
        make_sampler(name, dict(SD_V1, **{key: value}))


def test_lcm_four_steps():
    """LCM's few-step schedule: 4 of the 50 distillation timesteps (999, 979, ..., 19) evenly by index, the
    consistency function's x0 at each step equal to diffusers' `denoised`, and the last step returns it."""
    sampler, ref = both("lcm", SD_V1, 4)
    assert sampler.timesteps.tolist() == [999, 759, 499, 259]
    x = initial()
    generator, ref_generator = generators(7, False), generators(7, False)
    for i, t in enumerate(ref.timesteps):
        out = fake_model(x, t)
        theirs = ref.step(out, t, x, generator=ref_generator)
        assert rel_diff(theirs.denoised, sampler.consistency(out, i, x)) < TOLERANCE
        x_next = sampler.step(out, i, x, generator)
        assert rel_diff(theirs.prev_sample, x_next) < TOLERANCE
        x = theirs.prev_sample
    assert rel_diff(theirs.denoised, x_next) == 0  # no noise after the last step: x0 itself
    assert [float(v[0, 0, 0, 0]) for v in minisd_loop(sampler, initial(), 0, generators(7, False))] == \
        pytest.approx([-3.143767, -5.611292, -7.063525, -7.972329], abs=1e-5)  # from diffusers


def test_lcm_noise_comes_from_the_generator():
    sampler = make_sampler("lcm", SD_V1)
    sampler.set_timesteps(4)
    runs = [minisd_loop(sampler, initial(), 0, generators(seed, False))[-1] for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("steps, original", [(1, 50), (2, 50), (8, 50), (50, 50), (6, 25)])
def test_lcm_original_inference_steps(steps, original):
    check_run("lcm", dict(SD_V1, original_inference_steps=original), steps)


def test_lcm_boundary_scalings():
    """c_skip, c_out as diffusers' LCMScheduler computes them (sigma_data 0.5, timestep_scaling 10), for a
    timestep and for a training batch's [B] timesteps; at t = 0 the consistency function is the identity."""
    ref = LCMScheduler.from_config(SD_V1)
    t = torch.tensor([0, 1, 5, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t)
    for k in range(len(t)):
        theirs = ref.get_scalings_for_boundary_condition_discrete(t[k])
        assert (float(c_skip[k]), float(c_out[k])) == (float(theirs[0]), float(theirs[1]))
    assert (c_skip[0], c_out[0]) == (1.0, 0.0) and c_skip[2] <= 1e-4 and c_out[-1] > 0.99999
    assert boundary_scalings(19, timestep_scaling=1.0) == pytest.approx((0.25 / 361.25, 19 / 361.25**0.5))


def test_lcm_refuses_more_steps_than_it_was_distilled_on():
    with pytest.raises(ValueError, match="original_inference_steps = 50"):
        make_sampler("lcm", SD_V1).set_timesteps(51)


def test_bad_names_and_steps():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("lms", SD_V1)
    with pytest.raises(ValueError, match="steps"):
        make_sampler("ddim", SD_V1).set_timesteps(0)


# a zero-terminal-SNR model (Lin et al. 2023): v-prediction, rescaled betas, sampled from t = T
ZERO_SNR = dict(SD_V1, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                timestep_spacing="trailing")


def test_zero_terminal_snr_schedule_matches_diffusers():
    """The rescaled betas are DDPM's to the bit: alpha_bar_T is exactly 0 and alpha_bar_0 unchanged; the
    sigma-based samplers raise alpha_bar_T to 2^-24 where diffusers' Euler and DPM-Solver do."""
    schedule, ref = NoiseSchedule.from_config(ZERO_SNR), DDPMScheduler.from_config(ZERO_SNR)
    assert torch.equal(schedule.betas, ref.betas) and torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.zero_terminal_snr
    plain = NoiseSchedule.from_config(SD_V1)
    assert schedule.alphas_cumprod[0] == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)
    assert not plain.zero_terminal_snr
    x0, noise = initial(1), initial(2)
    assert torch.equal(schedule.add_noise(x0, noise, torch.tensor([999])), noise)  # pure noise at t = T
    assert torch.equal(schedule.velocity(x0, noise, torch.tensor([999])), -x0)
    for name in ("euler", "dpm"):
        ours, theirs = make_sampler(name, ZERO_SNR).schedule, REFERENCE[name].from_config(ZERO_SNR)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod) and ours.alphas_cumprod[-1] == 2.0**-24


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("name", [name for name in SAMPLERS if name != "pndm"])
def test_zero_terminal_snr_loop_matches_diffusers(name, spacing):
    check_run(name, dict(ZERO_SNR, timestep_spacing=spacing), 25)


def test_zero_terminal_snr_pndm():
    """diffusers' PNDM ignores rescale_betas_zero_snr; minisd's follows it, so it matches diffusers' PNDM
    given the rescaled betas. A run that would start where alpha_bar = 0 (trailing spacing) is refused."""
    config = dict(ZERO_SNR, timestep_spacing="leading")
    betas = NoiseSchedule.from_config(config).betas
    sampler = make_sampler("pndm", config)
    ref = PNDMScheduler.from_config(dict(config, trained_betas=betas.tolist()))
    sampler.set_timesteps(25)
    ref.set_timesteps(25)
    x = initial()
    assert_same_latents(minisd_loop(sampler, x), reference_loop(ref, x, ref.timesteps))
    with pytest.raises(ValueError, match="PNDM cannot start at timestep 999"):
        make_sampler("pndm", ZERO_SNR).set_timesteps(25)


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ValueError, match="needs prediction_type 'v_prediction'"):
        NoiseSchedule.from_config(dict(ZERO_SNR, prediction_type="epsilon"))
