"""`CheersPipeline`: text-to-image and image editing with Cheers, as a diffusers pipeline.

The pipeline prepares prompts, latents and outputs; the sampling loop and guidance are `sampling.denoise` (shared
with interleaved generation), the network evaluation `CheersModel.compute_velocity`, the Euler step the scheduler's.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .folders import load_root_components, locate_pipeline
from .sampling import denoise
from .scheduling_cheers import CheersFlowMatchScheduler


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from transformers_cheers import CheersPipeline

        >>> pipe = CheersPipeline.from_pretrained("path/to/cheers-pipeline", torch_dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("A red apple on a wooden table.", generator=torch.manual_seed(0)).images[0]
        >>> image.save("apple.png")
        ```
"""

# The official README's settings.
DEFAULT_STEPS = 80
DEFAULT_GUIDANCE = 9.5
DEFAULT_EDIT_STRENGTH = 0.9  # the official edit starts at t0 = 0.1
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class CheersPipelineOutput(BaseOutput):
    """
    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images (or latents with `output_type="latent"`).
        detail_gate_maps (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`, *optional*):
            With `return_detail_gate=True`: per image, how much SigLIP patch detail the detail gate injected at each
            patch in the last network evaluation (conditional branch), as a heat map at the image's size (PIL) or
            the raw (B, grid_h, grid_w) values ("np" / "pt" / "latent").
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    detail_gate_maps: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


class CheersPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation and image editing with Cheers.

    Args:
        model ([`CheersForConditionalGeneration`]): the Cheers model (its VAE decodes the images; no copy is kept).
        processor ([`CheersProcessor`]): chat template, tokenizer and image processor.
        scheduler ([`CheersFlowMatchScheduler`]): the shifted flow-matching Euler sampler.
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, model, processor, scheduler: CheersFlowMatchScheduler):
        super().__init__()
        self.register_modules(model=unwrap_peft_model(model), processor=processor, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Build the pipeline from a converted Cheers model repo or from a pipeline folder, with this package's code.

        A converted model repo (the converter's output: `config.json` with `model_type` "cheers", the processor files
        and, optionally, `scheduler_config.json`) gives all three components from its root; a pipeline folder
        (`model/`, `processor/`, `scheduler/` subfolders, as `save_pretrained` writes it) is read by diffusers' own
        loader; an official checkpoint (model_type "umm") is converted in memory (nothing written). None of them
        needs `trust_remote_code`: the installed classes are used, never code files in the folder.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local folder or a Hub repo id.
            model, processor, scheduler (*optional*): components to use instead of loading them.
            cache_dir, revision, token, local_files_only, force_download, proxies (*optional*): Hub download options.
            kwargs: passed on to `CheersForConditionalGeneration.from_pretrained` (`dtype`, also a dict by component
                name with a "default" as in diffusers, `device_map`, `attn_implementation`, `quantization_config`...).
        """
        folder, layout = locate_pipeline(pretrained_model_name_or_path, kwargs)
        if layout == "pipeline_folder":
            return super().from_pretrained(folder, **kwargs)
        return cls(**load_root_components(folder, official=layout == "official", **kwargs))

    # ---- properties ------------------------------------------------------------------------------------------------

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def default_size(self) -> int:
        return self.model.config.vision_config.image_size

    # ---- steps of __call__ -----------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        strength,
        image,
        callback_on_step_end_tensor_inputs,
        num_images_per_prompt=1,
        output_type="pil",
    ):
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        if negative_prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"`negative_prompt` has {len(negatives)} entries but `prompt` has {len(prompts)}; pass one "
                    "negative prompt per prompt (or a single string for all)."
                )
        multiple = self.model.config.image_size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"`height` and `width` must be positive multiples of {multiple}, got {height}x{width}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0 (1 disables guidance), got {guidance_scale}.")
        if strength is not None and image is None:
            raise ValueError(
                "`strength` sets how much of an edited image is re-generated, but no `image` was passed: pass the "
                "source as `image=` to edit it, or leave `strength` unset for text-to-image."
            )
        if strength is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"`strength` must be in [0, 1], got {strength}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}.")
        if output_type not in OUTPUT_TYPES:
            accepted = ", ".join(repr(name) for name in OUTPUT_TYPES)
            raise ValueError(f"`output_type` must be one of {accepted}; got {output_type!r}.")
        if image is not None and not isinstance(image, PIL.Image.Image | np.ndarray | torch.Tensor | list):
            raise ValueError(
                f"`image` must be a PIL image, a numpy array, a torch tensor or a list of them, got "
                f"{type(image).__name__}."
            )
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` can only contain {self._callback_tensor_inputs}.")

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image=None,
        context_image=None,
        resolution: int | None = None,
        do_classifier_free_guidance: bool | None = None,
        device: torch.device | None = None,
    ):
        """Tokenise the conditional (and unconditional) prompts and prefill them into one KV cache.

        Args:
            prompt, negative_prompt, image, context_image: as in `__call__` (`image`: one per prompt).
            resolution (`int`, *optional*): image side for `image` / `context_image`; default the native one.
            do_classifier_free_guidance (`bool`, *optional*): add the unconditional branch; default
                `guidance_scale != 1` of the current call (True outside a call).
            device (`torch.device`, *optional*): default the pipeline's execution device.
        Returns:
            `(cache, attention_mask, num_branches)`: the cache rows are [conditional; unconditional] when guided.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        images = None if image is None else ([image] * len(prompts) if not isinstance(image, list) else list(image))
        if do_classifier_free_guidance is None:
            do_classifier_free_guidance = getattr(self, "_guidance_scale", None) != 1.0
        device = device or self._execution_device
        texts = [self._chat(text, has_image=images is not None) for text in prompts]
        kwargs = {"generation_mode": "image", "context_image": context_image}
        kwargs["resolution"] = resolution or self.default_size
        inputs = self.processor(text=texts, images=images, **kwargs)
        batch = [inputs]
        if do_classifier_free_guidance:
            if negatives is None:
                batch.append(self.processor.build_unconditional_inputs(inputs))
            else:
                negative_texts = [self._chat(text, has_image=images is not None) for text in negatives]
                batch.append(self.processor(text=negative_texts, images=images, **kwargs))
        model_inputs = stack_prompt_inputs(batch, self.processor.tokenizer.pad_token_id)
        model_inputs = {key: value.to(device) for key, value in model_inputs.items()}
        if inputs.get("pixel_values") is not None:
            # Every branch shows the same images (context / edit source): tokenize them once, share the features.
            image_outputs = self.model.model.get_image_features(inputs["pixel_values"].to(device))
            image_outputs.pooler_output = torch.cat([image_outputs.pooler_output] * len(batch))
            model_inputs["mm_encoder_outputs"] = {"image": image_outputs}
        output = self.model.model(**model_inputs, use_cache=True)
        return output.cache, model_inputs["attention_mask"], len(batch)

    def _chat(self, prompt: str, has_image: bool) -> str:
        content = [{"type": "image"}, {"type": "text", "text": prompt}] if has_image else prompt
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents, image_latents, start_time):
        config = self.model.config
        patch = config.vision_config.patch_size
        shape = (batch_size, config.latent_channels, height // patch, width // patch)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You passed {len(generator)} generators for {batch_size} images (prompts x num_images_per_prompt); "
                "pass one generator per image or a single generator."
            )
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` must have shape {shape} (batch, channels, h, w), got {tuple(latents.shape)}."
                )
            if not latents.is_floating_point():
                raise ValueError(f"`latents` must be a floating-point tensor, got {latents.dtype}.")
            return latents.to(device=device, dtype=dtype)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if image_latents is None:
            return noise
        return self.scheduler.scale_noise(image_latents.to(dtype), start_time, noise)

    def edit_canvas_side(self, height: int | None, width: int | None) -> int:
        """The model edits on a square: the source letterboxed to the larger requested side (default: native)."""
        return max(side for side in (height, width, 0) if side is not None) or self.default_size

    def edit_frames(self, images, height, width, output_type) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per edit, `(source size, output size)`: the output is `height` x `width` where given, else the source's
        size (diffusers' image-to-image rule)."""
        frames = [((h, w), (height or h, width or w)) for h, w in self.processor.image_processor.image_sizes(images)]
        sizes = {output for _, output in frames}
        if output_type in ("np", "pt") and len(sizes) > 1:
            raise ValueError(
                f"The edits have different output sizes ({sorted(sizes)}), which cannot be stacked into one "
                f"{output_type!r} array: pass `height` and `width`, or output_type='pil'."
            )
        return frames

    def edits_in_source_frames(self, pixels: torch.Tensor, frames: list[tuple[tuple[int, int], tuple[int, int]]]):
        """Cut each edited canvas back to the region holding its source, resized to the output size.

        A square source fills the canvas, so an edit at the canvas size is returned unchanged (the official path).
        Returns a (B, 3, H, W) tensor when all sizes agree, else a list of (3, H, W) tensors.
        """
        side = pixels.shape[-1]
        outputs = []
        for canvas, (source_size, (height, width)) in zip(pixels, frames):
            region = self.processor.image_processor.letterbox_region(*source_size, side)
            top, left, region_height, region_width = region
            frame = canvas[None, :, top : top + region_height, left : left + region_width].float()
            if (region_height, region_width) != (height, width):
                frame = torch.nn.functional.interpolate(
                    frame, size=(height, width), mode="bicubic", antialias=True, align_corners=False
                )
            outputs.append(frame[0].clamp(0, 1))
        same_size = len({output for _, output in frames}) == 1
        return torch.stack(outputs) if same_size else outputs

    def detail_gate_images(self, gate: torch.Tensor, height: int, width: int, output_type: str):
        if output_type != "pil":
            gate = gate.float().cpu()
            return gate.numpy() if output_type == "np" else gate
        maps = []
        for values in gate.float().cpu():
            span = (values.max() - values.min()).clamp(min=1e-12)
            scaled = ((values - values.min()) / span * 255).round().to(torch.uint8).numpy()
            maps.append(PIL.Image.fromarray(scaled, mode="L").resize((width, height), PIL.Image.NEAREST))
        return maps

    # ---- __call__ --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        time_shift: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image=None,
        strength: float | None = None,
        context_image=None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_detail_gate: bool = False,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""
        Generate images from text, or edit `image` following the text.

        Args:
            prompt (`str` or `list[str]`): what to draw (or, with `image`, the edit instruction).
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional prompt for guidance. By default the
                official one: the prompt with every text token replaced by `<no_mean>`.
            height, width (`int`, *optional*): output size, multiples of 32. Text-to-image: default the model's
                native resolution. Editing: default the source's own size; the model edits on a square canvas (the
                source letterboxed, as official) of side max(height, width), default the native resolution, and the
                region holding the source is resized to the output size.
            num_inference_steps (`int`, defaults to 80): network evaluations (the official grid has one more
                Euler step, of size 1/N, at t = 1).
            guidance_scale (`float`, defaults to 9.5): classifier-free guidance weight; 1 disables guidance.
            time_shift (`float`, *optional*): the official `alpha` of the time grid (0.5 in the official README);
                defaults to the scheduler's.
            num_images_per_prompt (`int`, defaults to 1).
            generator (`torch.Generator` or list, *optional*): for reproducible noise.
            latents (`torch.Tensor`, *optional*): initial noise of shape (batch, latent_channels, h/16, w/16).
            image (*optional*): source image(s) to edit, one per prompt. The image is also shown to the model.
            strength (`float`, *optional*): editing only: how much of the path to re-generate; default 0.9 (the
                official edit start time t0 = 0.1).
            context_image (*optional*): an image whose tokens are prepended to every prompt, as the official code does
                with a random dummy image (`transformers_cheers.processing_cheers.official_dummy_image(seed)`);
                off by default, needed only to reproduce official outputs exactly.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent".
            return_dict (`bool`, defaults to True).
            return_detail_gate (`bool`, defaults to False): also return the detail-gate heat maps.
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, step, t, callback_kwargs)` after
                each step; may return a dict with replacement `latents`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed in `callback_kwargs`.

        Examples:
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        editing = image is not None
        self.check_inputs(
            prompt, negative_prompt, height or self.default_size, width or self.default_size, num_inference_steps,
            guidance_scale, strength, image, callback_on_step_end_tensor_inputs, num_images_per_prompt, output_type,
        )  # fmt: skip
        self._guidance_scale, self._interrupt = guidance_scale, False

        # 1. Prompts (and edit sources), repeated for num_images_per_prompt
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        images, frames = None, None
        if editing:
            images = [image] * len(prompts) if not isinstance(image, list) else list(image)
            if len(images) != len(prompts):
                raise ValueError(f"Pass one `image` per prompt: got {len(images)} images for {len(prompts)} prompts.")
            images = [img for img in images for _ in range(num_images_per_prompt)]
            frames = self.edit_frames(images, height, width, output_type)
            height = width = self.edit_canvas_side(height, width)
        height, width = height or self.default_size, width or self.default_size
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        strength = (DEFAULT_EDIT_STRENGTH if strength is None else strength) if editing else 1.0
        device, dtype = self._execution_device, self.model.dtype

        # 2. Prompt caches (conditional and unconditional in one batch)
        cache, attention_mask, num_branches = self.encode_prompt(
            prompts, negatives, images, context_image, height, self.do_classifier_free_guidance, device
        )

        # 3. Timesteps (a per-call time shift leaves the pipeline's scheduler as it was)
        scheduler = self.scheduler
        if time_shift is not None and time_shift != scheduler.config.time_shift:
            scheduler = CheersFlowMatchScheduler.from_config(scheduler.config, time_shift=time_shift)
        scheduler.set_timesteps(num_inference_steps, device=device, strength=strength)
        self._num_timesteps = len(scheduler.timesteps)

        # 4. Initial latents (editing: the letterboxed source's latent, noised to the start time, as official)
        image_latents = None
        if editing:
            source = self.processor.image_processor(images, resolution=height)["pixel_values"]
            image_latents = self.model.model.encode_latents(source.to(device))
        latents = self.prepare_latents(
            len(prompts), height, width, dtype, device, generator, latents, image_latents, scheduler.start_time
        )

        # 5. Denoising loop
        with self.progress_bar(total=self._num_timesteps) as progress_bar:

            def on_step_end(index, t, current):
                replaced = None
                if callback_on_step_end is not None:
                    callback_kwargs = dict.fromkeys(callback_on_step_end_tensor_inputs, current)
                    outputs = callback_on_step_end(self, index, t, callback_kwargs)
                    replaced = outputs.get("latents") if outputs else None
                progress_bar.update()
                return replaced

            latents, gate = denoise(
                self.model, scheduler, latents, cache, attention_mask, num_branches, guidance_scale,
                on_step_end=on_step_end, interrupted=lambda: self.interrupt,
            )  # fmt: skip

        # 6. Decode
        if output_type == "latent":
            images_out = latents
        else:
            pixels = self.model.model.decode_latents(latents)
            if editing:
                pixels = self.edits_in_source_frames(pixels, frames)
            if isinstance(pixels, list):  # edits of different sizes: PIL only (checked up front)
                images_out = [self.processor.postprocess(frame, output_type="pil")[0] for frame in pixels]
            else:
                images_out = self.processor.postprocess(pixels, output_type=output_type)
        gate_maps = None
        if return_detail_gate and gate is not None:
            gate_maps = self.detail_gate_images(gate, height, width, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images_out, gate_maps) if return_detail_gate else (images_out,)
        return CheersPipelineOutput(images=images_out, detail_gate_maps=gate_maps)


def unwrap_peft_model(model):
    """The Cheers model inside a `peft.PeftModel` (its LoRA layers stay in place and active); checks the type."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if model is not None and not hasattr(getattr(model, "model", None), "compute_velocity"):
        raise TypeError(
            f"`model` must be a CheersForConditionalGeneration (or a peft.PeftModel wrapping one), got "
            f"{type(model).__name__}: load it with CheersForConditionalGeneration.from_pretrained(...)."
        )
    return model


def stack_prompt_inputs(batches: list, pad_token_id: int) -> dict:
    """Concatenate the token rows of processor outputs, left-padding to a common length (prompts may differ)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    merged = {}
    for key in ("input_ids", "attention_mask", "context_image_mask"):
        if key not in batches[0]:
            continue
        fill = {"input_ids": pad_token_id, "attention_mask": 0, "context_image_mask": False}[key]
        padded = [torch.nn.functional.pad(b[key], (length - b[key].shape[1], 0), value=fill) for b in batches]
        merged[key] = torch.cat(padded)
    return merged


__all__ = ["CheersPipeline", "CheersPipelineOutput"]
