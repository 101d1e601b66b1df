"""The sampling library: schedules, guidance, samplers (one registry), noise, previews, the loop.

Everything works in the engine's flow convention: x_s = (1 - s) x0 + s noise, the model
returns v = noise - x0 (``ModelHandle.predict``), and a schedule is a decreasing tensor of
flow sigmas ending at 0. Guidance turns the conditional/unconditional velocities into a
*denoised pair* (x0, noise); a sampler steps with those. For plain CFG every sampler equals its
textbook velocity form (Euler: x += (s' - s) v).

:func:`sample` is the one loop the Sampler nodes use; the editing code (app/models/editing.py)
shares its :func:`integrate`.
"""

from app.core.vocabulary import provide_choices
from app.models.sampling.defaults import model_variant, sampling_defaults, warn_guidance
from app.models.sampling.guidance import GUIDANCE, Denoised, GuidanceState, guide, velocity_pair
from app.models.sampling.loop import check_inputs, integrate, latent_mask, sample, starting_point
from app.models.sampling.noise import NoiseStream, make_noise
from app.models.sampling.previews import PREVIEW_INTERVAL, Previewer, preview_image
from app.models.sampling.samplers import SAMPLERS, get_sampler, register
from app.models.sampling.schedules import SCHEDULERS, SCHEDULES, auto_scheduler, compute_sigmas, model_shift, schedule

provide_choices("sampler", lambda: ["auto", *SAMPLERS])
provide_choices("scheduler", lambda: ["auto", *SCHEDULES])  # a schedule registered later shows up too
provide_choices("guidance", lambda: GUIDANCE)

__all__ = [
    "GUIDANCE", "PREVIEW_INTERVAL", "SAMPLERS", "SCHEDULERS", "SCHEDULES", "Denoised", "GuidanceState", "NoiseStream",
    "Previewer", "auto_scheduler", "check_inputs", "compute_sigmas", "get_sampler", "guide", "integrate",
    "latent_mask", "make_noise", "model_shift", "model_variant", "preview_image", "register", "sample",
    "sampling_defaults", "schedule", "starting_point", "velocity_pair", "warn_guidance",
]
