"""How `CheersPipeline` is loaded: converted model repos, pipeline folders, Hub ids, AutoPipeline, PEFT models."""

import json
import logging

import pytest
import torch
from conftest import fake_hub_snapshot
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
from peft import LoraConfig, get_peft_model

from transformers_cheers import CheersFlowMatchScheduler, CheersForConditionalGeneration, CheersPipeline
from transformers_cheers.conversion import write_diffusers_files
from transformers_cheers.tiny import tiny_cheers


PROMPT = "A red apple on a wooden table."
RUN = {"num_inference_steps": 2, "output_type": "latent"}


def run(pipeline, seed: int = 0) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPT, generator=torch.manual_seed(seed), **RUN).images


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_cheers()
    return model.float(), processor


@pytest.fixture(scope="module")
def model_repo(tiny, tmp_path_factory):
    """A converted-layout model repo: the model and processor in the root plus the converter's diffusers files."""
    model, processor = tiny
    folder = tmp_path_factory.mktemp("repo") / "cheers-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_diffusers_files(folder)
    return folder


@pytest.fixture(scope="module")
def expected(tiny):
    model, processor = tiny
    return run(CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler()))


def assert_installed_code(pipeline):
    for component in (pipeline, pipeline.model, pipeline.processor, pipeline.scheduler):
        assert type(component).__module__.startswith("transformers_cheers."), type(component)


def test_from_pretrained_on_a_converted_model_repo_uses_the_installed_code(model_repo, expected):
    index = json.loads((model_repo / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_pipeline", "CheersPipeline"]
    assert not (model_repo / "model").exists()  # components load from the root: the weights are stored once
    pipeline = CheersPipeline.from_pretrained(model_repo)
    assert_installed_code(pipeline)
    assert torch.equal(run(pipeline), expected)


def test_from_pretrained_passes_dtype_and_keeps_passed_components(model_repo, tiny):
    scheduler = CheersFlowMatchScheduler(time_shift=0.7)
    pipeline = CheersPipeline.from_pretrained(model_repo, torch_dtype=torch.bfloat16, scheduler=scheduler)
    assert pipeline.model.dtype == torch.bfloat16 and pipeline.scheduler is scheduler
    by_component = CheersPipeline.from_pretrained(
        model_repo, dtype={"model": torch.bfloat16, "default": torch.float16}
    )
    assert by_component.model.dtype == torch.bfloat16  # diffusers' dtype dict: per component, then "default"


def test_from_pretrained_on_a_hub_id_through_the_cache(model_repo, expected, tmp_path):
    fake_hub_snapshot(tmp_path, "someone/cheers-tiny", model_repo)
    pipeline = CheersPipeline.from_pretrained("someone/cheers-tiny", cache_dir=tmp_path)
    assert_installed_code(pipeline)
    assert torch.equal(run(pipeline), expected)


def test_pipeline_folder_and_auto_pipelines(tiny, expected, tmp_path):
    """A folder written by save_pretrained loads with CheersPipeline and with diffusers' AutoPipeline classes."""
    model, processor = tiny
    CheersPipeline(model=model, processor=processor, scheduler=CheersFlowMatchScheduler()).save_pretrained(tmp_path)
    assert (tmp_path / "model" / "config.json").is_file()
    for loader in (CheersPipeline, AutoPipelineForText2Image, AutoPipelineForImage2Image):
        pipeline = loader.from_pretrained(tmp_path)
        assert type(pipeline) is CheersPipeline
        assert torch.equal(run(pipeline), expected)
    assert type(AutoPipelineForImage2Image.from_pipe(pipeline)) is CheersPipeline


def test_an_official_checkpoint_is_converted_in_memory(golden, golden_models):
    pipeline = CheersPipeline.from_pretrained(golden.checkpoint, dtype=torch.float32)
    assert_installed_code(pipeline)
    reference = golden_models("fp32").state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in pipeline.model.state_dict().items())
    assert pipeline.processor.image_token_id == pipeline.model.config.image_token_id


def test_foreign_folders_are_refused_with_the_fix(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="holds a model of type 'llama', not a Cheers model"):
        CheersPipeline.from_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="has no config.json .* and no model_index.json"):
        CheersPipeline.from_pretrained(tmp_path)


def test_a_peft_model_runs_with_its_adapters_active(tiny, expected, caplog):
    model, processor = tiny_cheers()
    config = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    peft_model = get_peft_model(model.float(), config)
    with caplog.at_level(logging.WARNING):
        pipeline = CheersPipeline(model=peft_model, processor=processor, scheduler=CheersFlowMatchScheduler())
    assert type(pipeline.model) is CheersForConditionalGeneration
    with_adapters = run(pipeline)
    assert not torch.equal(with_adapters, expected)  # the random LoRA weights change the image
    merged = peft_model.merge_and_unload()
    merged_pipeline = CheersPipeline(model=merged, processor=processor, scheduler=CheersFlowMatchScheduler())
    torch.testing.assert_close(run(merged_pipeline), with_adapters, rtol=1e-4, atol=1e-4)


def test_a_model_of_another_kind_is_refused(tiny):
    _, processor = tiny
    with pytest.raises(TypeError, match="must be a CheersForConditionalGeneration .*from_pretrained"):
        CheersPipeline(model=torch.nn.Linear(2, 2), processor=processor, scheduler=CheersFlowMatchScheduler())
