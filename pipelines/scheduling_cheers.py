"""The Cheers sampler (arXiv 2603.12793) as a diffusers scheduler: shifted flow-matching Euler with a tail step.

Time runs forward: t = 0 is noise, t = 1 is data, x_t = t * x1 + (1 - t) * x0, and the model predicts the velocity
v = dx/dt (about x1 - x0). For N steps the grid is shift(linspace(t_start, 1, N)); the first N - 1 steps move x from
t_k to t_{k+1}, and the last one, taken at t = 1, adds v / N once more (the official extra tail step).
See docs/scheduler.md for how the pipeline drives it and how it maps to `FlowMatchEulerDiscreteScheduler`.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin


def shift_time(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Warp t in [0, 1]; alpha < 1 packs the steps near t = 0 (noise), alpha = 1 is the identity.

    The operation order is the official one, which keeps the fp32 grid bit-identical to it.
    """
    return (alpha * t) / (1.0 + (alpha - 1.0) * t)


class CheersFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler of the official Cheers `generate`, for t2i and editing.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Kept for diffusers compatibility (`len(scheduler)`); the timesteps are t in [0, 1], not scaled by it.
        time_shift (`float`, defaults to 0.5):
            The official `alpha` of `shift(t) = alpha * t / (1 + (alpha - 1) * t)`. The README uses 0.5, the
            GenEval scripts 1.0 (no shift). Equals `1 / shift` of `FlowMatchEulerDiscreteScheduler`.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, time_shift: float = 0.5):
        if not time_shift > 0:  # also rejects NaN
            raise ValueError(
                f"`time_shift` must be > 0, got {time_shift}. Use 0.5 (official README) or 1.0 (no shift)."
            )
        self.timesteps = None  # (N,) float32 t values, set by `set_timesteps`
        self.step_sizes = None  # (N,) float32 on CPU: t_{k+1} - t_k, then the tail step 1 / N
        self.num_inference_steps = None
        self.start_time = 0.0  # t0 of the path; the editing init level (see `scale_noise`)
        self._step_index = None
        self._begin_index = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int | None:
        """Index of the next step; it grows by one after each `step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first step, if the pipeline set one with `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma = 1 - t, the noise level in diffusers' flow-matching convention (N values, no terminal 0)."""
        return 1.0 - self.timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, strength: float = 1.0):
        """Build the time grid.

        Args:
            num_inference_steps (`int`):
                Model evaluations for text-to-image (the official scripts use 80).
            device (`str` or `torch.device`, *optional*):
                Where `timesteps` go. The grid itself is always computed on CPU in float32, as the official code does.
            strength (`float`, defaults to 1.0):
                Editing: start at t0 = 1 - strength and run int(num_inference_steps * (1 - t0)) steps over
                shift(linspace(t0, 1, .)), with a tail step of 1 / (that count). The official editing uses
                strength 0.9 (t0 = 0.1, 80 steps become 72). 1.0 is text-to-image.
        """
        if num_inference_steps < 1:
            raise ValueError(
                f"`num_inference_steps` must be at least 1, got {num_inference_steps}; "
                "pass a positive step count (the official scripts use 80)."
            )
        if not 0.0 <= strength <= 1.0:
            raise ValueError(
                f"`strength` must be in [0, 1], got {strength}; "
                "use 1.0 for text-to-image and 0.9 for the official editing start (t0 = 0.1)."
            )
        start_time = 1.0 - strength
        # The official editing recomputes the step count from t0 with this exact float expression (int of a product).
        num_steps = int(num_inference_steps * (1.0 - start_time))
        if num_steps < 1:
            raise ValueError(
                f"`strength`={strength} leaves int({num_inference_steps} * {strength}) = 0 steps; "
                "raise `strength` or `num_inference_steps`."
            )
        grid = torch.linspace(start_time, 1.0, num_steps, dtype=torch.float32, device="cpu")  # as the official
        t = shift_time(grid, self.config.time_shift)
        # N - 1 intervals reach t = 1; the official sampler then steps once more from t = 1 by 1 / N.
        tail = torch.tensor([1.0 / num_steps], dtype=torch.float32)
        self.step_sizes = torch.cat([t[1:] - t[:-1], tail])
        self.timesteps = t.to(device)
        self.num_inference_steps = num_steps
        self.start_time = start_time
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        timestep = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device)
        matches = (self.timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {timestep.item()} is not one of `scheduler.timesteps`; pass those values unchanged "
                "(not rounded to the model dtype), or call `set_begin_index` first."
            )
        return matches[0].item()

    def _init_step_index(self, timestep: float | torch.Tensor):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Point on the path: x_t = t * sample + (1 - t) * noise, in `sample`'s dtype (the editing init).

        The official editing starts from t = `scheduler.start_time` (0.1) while its first timestep is
        `scheduler.timesteps[0]` = shift(0.1), a small offset of the official code; pass `start_time` to reproduce it.
        A Python float (or one-element tensor) t rounds exactly like the official `t0 * z + (1 - t0) * noise`;
        a per-sample tensor of shape (batch,) is applied in float32, then cast.
        """
        noise = noise.to(sample.dtype)
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1:
            timestep = timestep.item()
        if not isinstance(timestep, torch.Tensor):
            return timestep * sample + (1.0 - timestep) * noise
        t = timestep.to(sample.device, torch.float32).view(-1, *[1] * (sample.ndim - 1))  # (B, 1, ..., 1)
        return (t * sample + (1.0 - t) * noise).to(sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One Euler step: prev_sample = sample + model_output * dt, with model_output the velocity v = dx/dt.

        dt is t_{k+1} - t_k, and 1 / N for the last step (taken at t = 1). Call it exactly once per timestep.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as `timestep` to "
                "`CheersFlowMatchScheduler.step()` is not supported; pass one of `scheduler.timesteps`."
            )
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before `step()`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.step_sizes):
            raise ValueError(
                f"`step()` was called more than the {len(self.step_sizes)} times `set_timesteps` prepared "
                "(the last call is already the tail step at t = 1); call `set_timesteps` to start a new loop."
            )
        dt = self.step_sizes[self._step_index].item()  # float32 value as a Python scalar
        # Official numerics: stay in the latent dtype (bf16) and round the product, then the sum.
        # No float32 upcast as in FlowMatchEulerDiscreteScheduler: that changes up to 22% of the bf16 values of the
        # golden T2I steps (one rounding instead of two).
        prev_sample = sample + model_output.to(sample.dtype) * dt
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


__all__ = ["CheersFlowMatchScheduler", "shift_time"]
