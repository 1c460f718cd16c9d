"""The numpy samplers of the torch-free runner (minisd/numpy_samplers.py) against minisd's torch samplers, and
its noise against torch.randn: the same timesteps exactly, the same latents at every step (float32 rounding
apart), the same Gaussian noise for a seed."""

import numpy as np
import pytest
import torch

from minisd import numpy_samplers
from minisd.checkpoints.ldm import SD_SCHEDULER
from minisd.schedulers import NoiseSchedule, make_sampler

CONFIGS = {
    "sd": SD_SCHEDULER,
    "sd-v": dict(SD_SCHEDULER, prediction_type="v_prediction"),
    "linear": dict(SD_SCHEDULER, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "trailing": dict(SD_SCHEDULER, timestep_spacing="trailing"),
    "linspace": dict(SD_SCHEDULER, timestep_spacing="linspace", steps_offset=0),
    "lcm": dict(SD_SCHEDULER, _class_name="LCMScheduler", original_inference_steps=50, clip_sample=True,
                clip_sample_range=1.5),
    # the toy teacher's: v-prediction on a zero terminal SNR schedule, sampled from t = 999
    "zero-snr": dict(SD_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction",
                     rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0),
    "ddim-defaults": dict(SD_SCHEDULER, _class_name="DDIMScheduler", set_alpha_to_one=True, clip_sample=True),
}


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 5, 7), (3, 4, 16, 16), (1, 16)])
@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**40 + 3])
def test_noise_is_torch_randn(seed, shape):
    """Two draws in a row from one seed, as the LCM sampler takes them (latents, then its re-noising)."""
    generator, random = torch.Generator().manual_seed(seed), numpy_samplers.TorchCPURandom(seed)
    for _ in range(2):
        expected = torch.randn(shape, generator=generator).numpy()
        got = random.randn(shape)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_too_little_noise_is_refused():
    with pytest.raises(ValueError, match="fewer than 16"):
        numpy_samplers.TorchCPURandom(0).randn((1, 4, 1, 3))


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("finite_sigmas", [False, True])
def test_schedule(config, finite_sigmas):
    ours = numpy_samplers.Schedule(CONFIGS[config], finite_sigmas)
    theirs = NoiseSchedule.from_config(CONFIGS[config], finite_sigmas)
    # the zero-SNR rescale subtracts sqrt(alpha_bar_T) from every sqrt(alpha_bar), which near T cancels most
    # digits: torch's float32 linspace and vectorised sqrt differ from numpy's in the last bit, and there that
    # bit is a few 1e-5 of what is left (measured: 3.6e-5 at t = 998)
    rtol = 5e-5 if CONFIGS[config].get("rescale_betas_zero_snr") else 1e-6
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=rtol, atol=0)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=2 * rtol, atol=0)


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("name", numpy_samplers.SAMPLERS)
def test_whole_run_equals_minisd(name, config, steps):
    """A whole run on made-up model outputs: the same timesteps, and x within float32 rounding at the end."""
    cfg = CONFIGS[config]
    theirs, ours = make_sampler(name, cfg), numpy_samplers.make_sampler(name, cfg)
    if name == "pndm" and cfg.get("rescale_betas_zero_snr"):  # both refuse to start where alpha_bar = 0
        for sampler in (theirs, ours):
            with pytest.raises(ValueError, match="PNDM cannot start at timestep 999"):
                sampler.set_timesteps(steps)
        return
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    generator, random = torch.Generator().manual_seed(3), numpy_samplers.TorchCPURandom(3)
    x, y = torch.randn(2, 4, 8, 8, generator=generator), random.randn((2, 4, 8, 8))
    outputs = np.random.default_rng(0).standard_normal((len(ours.timesteps), 2, 4, 8, 8)).astype(np.float32)
    for i, out in enumerate(outputs):
        x = theirs.step(torch.from_numpy(out), i, x, generator=generator)
        y = ours.step(out, i, y, random)
        assert y.dtype == np.float32
    assert np.abs(y - x.numpy()).max() <= 1e-5 * np.abs(x.numpy()).max()


@pytest.mark.parametrize("name", numpy_samplers.SAMPLERS)
def test_img2img_starts_midway_as_minisd(name):
    """add_noise at the first step that runs, then the rest of the run (PNDM warms up at its first call)."""
    theirs, ours = make_sampler(name, SD_SCHEDULER), numpy_samplers.make_sampler(name, SD_SCHEDULER)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    rng = np.random.default_rng(1)
    clean, noise = rng.standard_normal((2, 1, 4, 8, 8)).astype(np.float32)
    start = 4
    x = theirs.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), start)
    y = ours.add_noise(clean, noise, start)
    np.testing.assert_allclose(y, x.numpy(), rtol=0, atol=1e-6)
    generator, random = torch.Generator().manual_seed(5), numpy_samplers.TorchCPURandom(5)
    for i in range(start, len(ours.timesteps)):
        out = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        x = theirs.step(torch.from_numpy(out), i, x, generator=generator)
        y = ours.step(out, i, y, random)
    assert np.abs(y - x.numpy()).max() <= 1e-5 * np.abs(x.numpy()).max()


def test_unknown_sampler_and_settings_are_refused():
    with pytest.raises(ValueError, match="not ported to numpy; choose one of pndm, ddim, dpm, lcm"):
        numpy_samplers.make_sampler("euler", SD_SCHEDULER)
    with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2'"):
        numpy_samplers.make_sampler("pndm", dict(SD_SCHEDULER, beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="original_inference_steps = 50"):
        numpy_samplers.make_sampler("lcm", SD_SCHEDULER).set_timesteps(60)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True needs prediction_type 'v_prediction'"):
        numpy_samplers.make_sampler("ddim", dict(SD_SCHEDULER, rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="thresholding=True"):
        numpy_samplers.make_sampler("ddim", dict(SD_SCHEDULER, thresholding=True))
