"""Samplers for SD's noise schedule, each equal step for step to the diffusers scheduler it names.

    pndm     PNDMScheduler, skip_prk_steps=True (PLMS)     pndm.py
    ddim     DDIMScheduler, eta = 0                        ddim.py
    euler    EulerDiscreteScheduler                        euler.py
    euler_a  EulerAncestralDiscreteScheduler               euler.py
    dpm      DPMSolverMultistepScheduler (DPM-Solver++2M)  dpm.py
    lcm      LCMScheduler (multistep consistency sampling) lcm.py

Each is built from a diffusers scheduler_config.json dict, whatever class wrote it, the way
`X.from_config(config)` builds one in diffusers: keys the sampler's class reads are used (with
that class's defaults where absent), others are ignored, and values minisd does not implement
raise a ValueError naming the key. The training-side noise schedule is schedule.NoiseSchedule;
the interface is in base.py.
"""

from minisd.schedulers.base import Sampler
from minisd.schedulers.ddim import DDIM
from minisd.schedulers.dpm import DPMSolver
from minisd.schedulers.euler import Euler, EulerAncestral
from minisd.schedulers.lcm import LCM
from minisd.schedulers.pndm import PNDM
from minisd.schedulers.schedule import NoiseSchedule, explicit

SAMPLER_CLASSES = {"pndm": PNDM, "ddim": DDIM, "euler": Euler, "euler_a": EulerAncestral, "dpm": DPMSolver,
                   "lcm": LCM}
SAMPLERS = tuple(SAMPLER_CLASSES)

__all__ = ["SAMPLERS", "NoiseSchedule", "Sampler", "make_sampler"]


def make_sampler(name: str, config: dict) -> Sampler:
    """A sampler by name (one of SAMPLERS) over the noise schedule that `config` describes."""
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLER_CLASSES[name](explicit(config))
