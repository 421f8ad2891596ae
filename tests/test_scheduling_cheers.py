"""CheersFlowMatchScheduler: the official time grid and Euler updates, bit for bit, plus its diffusers contract."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from transformers_cheers.pipelines import CheersFlowMatchScheduler


T2I_CASES = ["case4a_t2i_cfg", "case4b_t2i_nocfg"]
PRECISIONS = ["bf16", "fp32"]


def official_grid(num_steps: int, alpha: float, start: float = 0.0) -> torch.Tensor:
    """The official recipe, written out: `time_shift(torch.linspace(start, 1, N), alpha)` on CPU in fp32."""
    t = torch.linspace(start, 1, num_steps)
    return (alpha * t) / (1.0 + (alpha - 1.0) * t)


def recorded_run(golden, case: str, precision: str):
    kwargs = golden.case_info(case, precision)["generate"]["kwargs"]
    return golden.outputs(case, precision), kwargs


def combined_drift(outputs, kwargs, k: int) -> torch.Tensor:
    """The velocity the official sampler used at step k (classifier-free guidance in the latent dtype)."""
    cond = outputs["steps/drift_cond"][k]
    if "steps/drift_uncond" not in outputs:
        return cond
    uncond = outputs["steps/drift_uncond"][k]
    return uncond + kwargs["cfg_scale"] * (cond - uncond)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", T2I_CASES)
def test_grid_matches_official(golden, case, precision):
    outputs, kwargs = recorded_run(golden, case, precision)
    info = golden.case_info(case, precision)
    scheduler = CheersFlowMatchScheduler(time_shift=kwargs["alpha"])
    scheduler.set_timesteps(kwargs["num_inference_steps"])

    assert scheduler.timesteps.dtype == torch.float32
    assert torch.equal(scheduler.timesteps, outputs["t_list_shifted"])
    assert torch.equal(scheduler.timesteps, outputs["steps/t"])
    assert torch.equal(scheduler.step_sizes[:-1], outputs["steps/dt"])
    assert len(outputs["steps/dt"]) == info["num_euler_steps"]
    assert scheduler.step_sizes[-1].item() == info["final_step_size"]

    unshifted = CheersFlowMatchScheduler(time_shift=1.0)
    unshifted.set_timesteps(kwargs["num_inference_steps"])
    assert torch.equal(unshifted.timesteps, outputs["t_list_linspace"])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", T2I_CASES)
def test_sampling_loop_matches_official(golden, case, precision):
    """Drive the scheduler like the pipeline will, fed the recorded velocities: every latent matches the recording."""
    outputs, kwargs = recorded_run(golden, case, precision)
    scheduler = CheersFlowMatchScheduler(time_shift=kwargs["alpha"])
    scheduler.set_timesteps(kwargs["num_inference_steps"])
    latents = outputs["z0"]
    assert torch.equal(latents, outputs["steps/x_t"][0])

    for k, t in enumerate(scheduler.timesteps):
        assert torch.equal(latents, outputs["steps/x_t"][k]), f"x_t mismatch at step {k}"
        velocity = combined_drift(outputs, kwargs, k)
        if k < len(outputs["steps/drift_combined"]):
            assert torch.equal(velocity, outputs["steps/drift_combined"][k])
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        expected = outputs["steps/x_next"][k] if k < len(outputs["steps/x_next"]) else outputs["final_latent"]
        assert latents.dtype == expected.dtype
        if precision == "bf16":
            assert torch.equal(latents, expected), f"step {k} is not bit-exact"
        else:
            error = ((latents - expected).norm() / expected.norm()).item()
            assert error <= 1e-6, f"step {k}: relative error {error:.2e}"


def test_bf16_update_must_not_upcast(golden):
    """Why `step` does not upcast like diffusers: one fp32 rounding does not reproduce the official bf16 chain."""
    outputs, _ = recorded_run(golden, "case4a_t2i_cfg", "bf16")
    x, v, dt = outputs["steps/x_t"][0], outputs["steps/drift_combined"][0], outputs["steps/dt"][0].item()
    upcast = (x.float() + v.float() * dt).to(x.dtype)
    assert not torch.equal(upcast, outputs["steps/x_next"][0])
    assert torch.equal(x + v * dt, outputs["steps/x_next"][0])


def test_checklist_80_steps_alpha_half():
    scheduler = CheersFlowMatchScheduler(time_shift=0.5)
    scheduler.set_timesteps(80)
    t, dt = scheduler.timesteps, scheduler.step_sizes
    assert len(t) == len(dt) == scheduler.num_inference_steps == 80
    assert torch.equal(t, official_grid(80, 0.5))
    assert t[0].item() == 0.0 and t[-1].item() == 1.0
    assert t[1].item() == pytest.approx(1 / 157, rel=1e-6)  # shift(1/79) = 0.5 / 78.5
    assert torch.equal(dt[:-1], t[1:] - t[:-1])
    assert dt[-1].item() == torch.tensor(1 / 80, dtype=torch.float32).item()
    assert bool((dt[:-1] > 0).all()) and dt[0] < dt[-2]  # alpha < 1: small steps near the noise end
    assert torch.allclose(scheduler.sigmas, 1 - t)


def test_checklist_80_steps_no_shift():
    scheduler = CheersFlowMatchScheduler(time_shift=1.0)
    scheduler.set_timesteps(80)
    assert torch.equal(scheduler.timesteps, torch.linspace(0, 1, 80))
    assert torch.allclose(scheduler.step_sizes[:-1], torch.full((79,), 1 / 79))
    assert scheduler.step_sizes[-1].item() == pytest.approx(1 / 80)


def test_checklist_edit_80_becomes_72():
    scheduler = CheersFlowMatchScheduler(time_shift=0.5)
    scheduler.set_timesteps(80, strength=0.9)
    assert scheduler.num_inference_steps == len(scheduler.timesteps) == 72
    assert torch.equal(scheduler.timesteps, official_grid(72, 0.5, start=0.1))
    assert scheduler.timesteps[0].item() == pytest.approx(1 / 19, rel=1e-6)  # shift(0.1) = 0.05 / 0.95
    assert scheduler.start_time == pytest.approx(0.1)
    assert scheduler.step_sizes[-1].item() == torch.tensor(1 / 72, dtype=torch.float32).item()


def test_edit_init_reproduces_official_level():
    """The official init level is t0 = 0.1 although the first timestep fed is shift(0.1)."""
    scheduler = CheersFlowMatchScheduler(time_shift=0.5)
    scheduler.set_timesteps(80, strength=0.9)
    generator = torch.Generator().manual_seed(0)
    image_latents = torch.randn(2, 4, 3, 5, generator=generator).to(torch.bfloat16)
    noise = torch.randn(2, 4, 3, 5, generator=generator).to(torch.bfloat16)

    latents = scheduler.scale_noise(image_latents, scheduler.start_time, noise)
    start_t = 0.1
    assert latents.dtype == torch.bfloat16
    assert torch.equal(latents, start_t * image_latents + (1 - start_t) * noise)
    assert not torch.equal(latents, scheduler.scale_noise(image_latents, scheduler.timesteps[0], noise))

    per_sample = scheduler.scale_noise(image_latents, torch.tensor([0.0, 1.0]), noise)
    assert torch.equal(per_sample[0], noise[0]) and torch.equal(per_sample[1], image_latents[1])


def test_save_load_round_trip(tmp_path):
    scheduler = CheersFlowMatchScheduler(time_shift=0.25)
    scheduler.save_pretrained(tmp_path)
    reloaded = CheersFlowMatchScheduler.from_pretrained(tmp_path)
    assert reloaded.config.time_shift == 0.25
    assert reloaded.config.num_train_timesteps == 1000
    settings = {"num_train_timesteps": 1000, "time_shift": 0.25}  # the saved file also has `_class_name` etc.
    assert (
        {key: reloaded.config[key] for key in settings} == {key: scheduler.config[key] for key in settings} == settings
    )
    scheduler.set_timesteps(12)
    reloaded.set_timesteps(12)
    assert torch.equal(reloaded.timesteps, scheduler.timesteps)


def test_set_timesteps_resets_the_loop():
    scheduler = CheersFlowMatchScheduler()
    scheduler.set_timesteps(3)
    sample = torch.zeros(1, 2, 2, 2)
    for t in scheduler.timesteps:
        sample = scheduler.step(torch.ones_like(sample), t, sample).prev_sample
    # 1 from the intervals (t goes 0 -> 1) plus the 1/3 tail step
    assert torch.allclose(sample, torch.full_like(sample, 1 + 1 / 3))
    scheduler.set_timesteps(3)
    assert scheduler.step_index is None
    scheduler.step(torch.ones_like(sample), scheduler.timesteps[0], sample)
    assert scheduler.step_index == 1


@pytest.mark.parametrize("steps", [0, -3])
def test_rejects_too_few_steps(steps):
    with pytest.raises(
        ValueError, match=r"`num_inference_steps` must be at least 1, got .*pass a positive step count"
    ):
        CheersFlowMatchScheduler().set_timesteps(steps)


@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan")])
def test_rejects_non_positive_time_shift(alpha):
    with pytest.raises(ValueError, match=r"`time_shift` must be > 0, got .*Use 0.5 \(official README\)"):
        CheersFlowMatchScheduler(time_shift=alpha)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_rejects_strength_outside_unit_interval(strength):
    with pytest.raises(ValueError, match=r"`strength` must be in \[0, 1\], got .*0.9 for the official editing"):
        CheersFlowMatchScheduler().set_timesteps(80, strength=strength)


def test_rejects_strength_leaving_no_steps():
    with pytest.raises(ValueError, match=r"leaves int\(10 \* 0.05\) = 0 steps; raise `strength`"):
        CheersFlowMatchScheduler().set_timesteps(10, strength=0.05)


def test_rejects_more_steps_than_prepared():
    scheduler = CheersFlowMatchScheduler()
    scheduler.set_timesteps(2)
    sample = torch.zeros(1, 1, 2, 2)
    for t in scheduler.timesteps:
        sample = scheduler.step(sample, t, sample).prev_sample
    with pytest.raises(ValueError, match=r"called more than the 2 times .*call `set_timesteps` to start a new loop"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)


def test_rejects_integer_index_unknown_timestep_and_missing_grid():
    scheduler = CheersFlowMatchScheduler()
    sample = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"Call `set_timesteps\(num_inference_steps\)` before `step\(\)`"):
        scheduler.step(sample, 0.0, sample)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match=r"integer indices .*pass one of `scheduler.timesteps`"):
        scheduler.step(sample, 1, sample)
    with pytest.raises(ValueError, match=r"integer indices"):
        scheduler.step(sample, torch.tensor(1), sample)
    rounded = scheduler.timesteps[1].to(torch.bfloat16)  # 0.2000000179 -> 0.2001953125
    with pytest.raises(ValueError, match=r"is not one of `scheduler.timesteps`; pass those values unchanged"):
        scheduler.step(sample, rounded, sample)


def test_maps_to_diffusers_flow_match_euler():
    """sigma = 1 - t, shift = 1 / alpha, model_output = -v: same regular steps; only the tail step differs."""
    alpha, num_steps = 0.5, 6
    ours = CheersFlowMatchScheduler(time_shift=alpha)
    ours.set_timesteps(num_steps)
    theirs = FlowMatchEulerDiscreteScheduler(shift=1 / alpha)
    theirs.set_timesteps(sigmas=(1 - torch.linspace(0, 1, num_steps)).tolist())  # they apply the shift
    assert len(theirs.sigmas) == num_steps + 1 and theirs.sigmas[-1].item() == 0.0  # terminal sigma appended
    assert torch.allclose(theirs.sigmas[:-1], ours.sigmas, atol=1e-6)
    assert torch.allclose(theirs.timesteps, ours.sigmas * 1000, atol=1e-3)  # their timesteps are sigma * 1000

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 3, 4, 4, generator=generator)
    ours_sample, theirs_sample = sample, sample
    for k, (t, sigma_t) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        velocity = torch.randn(sample.shape, generator=generator)
        ours_next = ours.step(velocity, t, ours_sample).prev_sample
        theirs_next = theirs.step(-velocity, sigma_t, theirs_sample).prev_sample
        if k < num_steps - 1:
            torch.testing.assert_close(theirs_next, ours_next, rtol=1e-5, atol=1e-6)
        else:  # at t = 1 (sigma = 0) diffusers stops; the official takes its tail step v / N
            assert torch.equal(theirs_next, theirs_sample)
            torch.testing.assert_close(ours_next, ours_sample + velocity / num_steps)
        ours_sample, theirs_sample = ours_next, theirs_next
