"""Training runs on the tiny model: the losses go down (understanding, generation), a resumed run continues the same
loss curve, and examples/train_lora.py under a real 2-process DDP run (gloo) ends with identical weights on both
ranks."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import load_script, run_two_cpu_processes
from safetensors.torch import load_file

from transformers_cheers.data import CheersTrainingCollator, load_conversation_dataset, make_synthetic_dataset
from transformers_cheers.lora import set_trainable_stage
from transformers_cheers.tiny import tiny_cheers


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_lora.py"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_script():
    return load_script(SCRIPT)


def train(train_script, output_dir, *args) -> list[dict]:
    try:
        return train_script.main(["--output-dir", str(output_dir), "--quiet", *map(str, args)])
    finally:
        AcceleratorState._reset_state(True)  # one Accelerator per run in this process


def test_understanding_loss_decreases(train_script, tmp_path):
    history = train(
        train_script, tmp_path, "--full", "--synthetic-size", 4, 0, 0, "--batch-size", 2, "--max-steps", 16,
        "--learning-rate", 3e-3, "--no-gradient-checkpointing",
    )  # fmt: skip
    text = [step["text_loss"] for step in history]
    assert len(text) == 16 and text[-1] < text[0] - 1.0, text
    # the metrics went through Accelerate's tracker integration
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 17))
    assert {"loss", "text_loss", "image_loss", "lr"} <= set(logged[0])
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "final" / "processor_config.json").exists()


def test_generation_loss_decreases(tmp_path):
    """Fine-tuning on generation samples (fixed t and noise, so the curve is not dominated by their draws)."""
    model, processor = tiny_cheers()
    dataset = load_conversation_dataset(make_synthetic_dataset(tmp_path, 0, 2, 0))
    batch = CheersTrainingCollator(processor, config=model.config, guidance_dropout=0.0)([dataset[0], dataset[1]])
    set_trainable_stage(model, "align")  # projectors, flow head, gate, time embedder, embeddings
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        output = model(**batch, use_cache=False)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.image_loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_resume_continues_the_same_loss_curve(train_script, tmp_path):
    """LoRA (default preset, gradient checkpointing), accumulation, guidance dropout: stop at a checkpoint mid-epoch,
    resume in a fresh run, and get the same losses and the same final adapter."""
    common = [
        "--synthetic-size", 4, 4, 4, "--batch-size", 2, "--gradient-accumulation-steps", 2, "--max-steps", 4,
        "--learning-rate", 1e-3, "--checkpoint-every", 2,
    ]  # fmt: skip
    straight = train(train_script, tmp_path / "straight", *common)
    resumed = train(
        train_script, tmp_path / "resumed", *common, "--data", tmp_path / "straight" / "synthetic" / "data.jsonl",
        "--resume", tmp_path / "straight" / "checkpoint-2",
    )  # fmt: skip
    assert [step["step"] for step in resumed] == [3, 4]
    for expected, actual in zip(straight[2:], resumed):
        for name in ("loss", "text_loss", "image_loss"):
            assert actual[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-7), (expected, actual)
    adapters = [load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("straight", "resumed")]
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], rtol=1e-6, atol=1e-7)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert not list(checkpoint.glob("model*.safetensors"))  # a LoRA checkpoint holds no copy of the base model


def test_mixed_precision_bf16_runs(train_script, tmp_path):
    history = train(train_script, tmp_path, "--synthetic-size", 2, 2, 2, "--max-steps", 2, "--mixed-precision", "bf16")
    assert all(torch.isfinite(torch.tensor(step["loss"])) for step in history)


def test_two_process_ddp_run_ends_with_identical_weights(tmp_path):
    run_two_cpu_processes(
        SCRIPT, "--output-dir", tmp_path, "--max-steps", 2, "--synthetic-size", 4, 4, 4, "--learning-rate", 1e-3,
        "--save-rank-state", "--quiet",
    )  # fmt: skip
    ranks = [load_file(tmp_path / f"rank{rank}_trainable.safetensors") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # training happened: LoRA B matrices start at zero
    assert any(bool(tensor.any()) for name, tensor in ranks[0].items() if "lora_B" in name)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # logged once, by the main process


def test_single_process_cpu_launch_is_flagged(train_script, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    class SingleProcess:
        num_processes = 1

    with pytest.warns(UserWarning, match="This run is NOT distributed"):
        train_script.warn_if_multi_cpu_launch_fell_back(SingleProcess())
