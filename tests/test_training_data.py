"""Training data: jsonl loading policy, bad inputs (each with a clear message naming the sample), the collator's
labels, timesteps, guidance dropout, padding and per-sample randomness."""

import json
import logging

import PIL.Image
import pytest
import torch

from transformers_cheers.data import (
    CheersTrainingCollator,
    load_conversation_dataset,
    make_synthetic_dataset,
    read_conversation_jsonl,
)
from transformers_cheers.tiny import tiny_cheers


UND = {"from": "human", "value": "<im_start><image><im_end>\nWhat colour is this?"}
GEN = {"from": "gpt", "value": "<im_start><image_gen><im_end>"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_cheers()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = make_synthetic_dataset(tmp_path_factory.mktemp("data"), 2, 2, 2)
    return path, load_conversation_dataset(path)


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def image_file(folder, name="a.png"):
    PIL.Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / name)
    return name


def test_synthetic_dataset_has_the_three_kinds(synthetic):
    _, dataset = synthetic
    assert len(dataset) == 6
    kinds = [sample["id"].split("_")[0] for sample in dataset]
    assert kinds == ["und", "und", "gen", "gen", "text", "text"]
    assert dataset[0]["conversations"][0]["from"] == "user" and dataset[0]["images"][0].endswith(".png")
    assert dataset[4]["images"] == []


def test_malformed_line_fails_with_its_line_number(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"id": "ok", "conversations": [{"from": "human", "value": "Hi"}]}, '{"id": "broken", '],
    )
    with pytest.raises(ValueError, match=r"data\.jsonl:2: malformed JSON"):
        read_conversation_jsonl(path, check_images=False)


def test_skip_policy_skips_and_counts_bad_lines(tmp_path, caplog):
    name = image_file(tmp_path)
    good = {"id": "good", "image": name, "conversations": [UND, {"from": "gpt", "value": "red"}]}
    lines = [good, "not json", {"id": "no_image", "conversations": [UND]}, {"id": "x", "conversations": []}, good]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        dataset = load_conversation_dataset(path, errors="skip")
    assert len(dataset) == 2
    assert json.loads(dataset.info.description)["skipped_lines"] == {"malformed": 2, "image_mismatch": 1}
    assert "skipped 3 bad line(s)" in caplog.text


def test_placeholders_and_images_must_agree(tmp_path):
    name = image_file(tmp_path)
    lines = [{"id": "two_images", "image": f"{name}, {name}", "conversations": [UND, {"from": "gpt", "value": "x"}]}]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(
        ValueError, match=r"data\.jsonl:1 \(sample 'two_images'\): 1 image placeholder\(s\) \(<image>\) but 2"
    ):
        read_conversation_jsonl(path)


def test_adjacent_placeholders_are_refused_at_load_time(tmp_path):
    name = image_file(tmp_path)
    turn = {"from": "human", "value": "<image><image>\nWhich is redder?"}
    lines = [{"id": "glued", "image": f"{name}, {name}", "conversations": [turn, {"from": "gpt", "value": "x"}]}]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(
        ValueError,
        match=r"\(sample 'glued'\): The sample has two image placeholders with nothing between them "
        r"\('<image><image>'\).*Wrap each image in <im_start>...<im_end>",
    ):
        read_conversation_jsonl(path)
    samples, skipped = read_conversation_jsonl(path, errors="skip")
    assert samples == [] and skipped == {"adjacent_placeholders": 1}


def test_missing_image_file_is_named(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": "lost", "image": "nope.png", "conversations": [UND]}])
    with pytest.raises(ValueError, match=r"\(sample 'lost'\): image file '.*nope\.png' does not exist"):
        read_conversation_jsonl(path)


def test_unreadable_image_is_named_when_collated(tmp_path, tiny):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": "corrupt", "image": "bad.png", "conversations": [UND]}])
    dataset = load_conversation_dataset(path)
    with pytest.raises(ValueError, match=r"\(sample 'corrupt'\): Could not read the image file"):
        CheersTrainingCollator(tiny[1])([dataset[0]])


def test_resolution_must_be_a_multiple_of_32(tmp_path, tiny):
    name = image_file(tmp_path)
    lines = [{"id": "odd", "image": name, "resolution": 100, "conversations": [UND]}]
    with pytest.raises(ValueError, match=r"\(sample 'odd'\): resolution must be a positive multiple of 32 .*got 100"):
        read_conversation_jsonl(write_jsonl(tmp_path / "data.jsonl", lines))
    with pytest.raises(ValueError, match="the collator: resolution must be a positive multiple of 32 .*got 48"):
        CheersTrainingCollator(tiny[1], resolution=48)


def test_a_batch_shares_one_resolution(tmp_path, tiny):
    name = image_file(tmp_path)
    lines = [
        {"id": "small", "image": name, "resolution": 64, "conversations": [UND]},
        {"id": "large", "image": name, "resolution": 128, "conversations": [UND]},
    ]
    dataset = load_conversation_dataset(write_jsonl(tmp_path / "data.jsonl", lines))
    collator = CheersTrainingCollator(tiny[1])
    assert collator([dataset[1]])["pixel_values"].shape[-1] == 128
    with pytest.raises(ValueError, match=r"A batch must share one image resolution.*'small'.*'large'"):
        collator([dataset[0], dataset[1]])


def test_labels_and_timesteps(synthetic, tiny):
    model, processor = tiny
    _, dataset = synthetic
    collator = CheersTrainingCollator(processor, config=model.config, guidance_dropout=0.0)
    batch = collator([dataset[0], dataset[2], dataset[4]])  # understanding, generation, text-only
    ids, labels = batch["input_ids"], batch["labels"]
    image = torch.isin(ids, torch.tensor([processor.image_token_id, processor.image_gen_token_id]))
    assert bool((labels[image] == -100).all())
    tokens = model.config.num_image_tokens
    assert image.sum(-1).tolist() == [tokens, tokens, 0]  # no context image by default
    assert not batch["context_image_mask"].any()
    assert batch["pixel_values"].shape[0] == 2
    assert batch["image_noise"].shape == (2, model.config.latent_channels, 4, 4)
    t = batch["image_timesteps"]
    assert t[0] == 1.0 and 0 < t[1] < 1 and t[1] == t[1].bfloat16().float()
    # assistant answer labelled, user question not (except structural tokens), in the understanding row
    text = processor.tokenizer.decode(labels[0][labels[0] != -100])
    assert "assistant\n" + dataset[0]["conversations"][1]["value"] in text and "What colour" not in text


def test_text_only_samples_match_inference_by_default(synthetic, tiny):
    """Default: a text-only sample is tokenised exactly as the processor tokenises its prompt for inference."""
    _, processor = tiny
    _, dataset = synthetic
    batch = CheersTrainingCollator(processor, guidance_dropout=0.0)([dataset[4]])
    messages = [{"role": turn["from"], "content": turn["value"]} for turn in dataset[4]["conversations"]]
    prompt = processor(text=processor.apply_chat_template(messages))
    assert torch.equal(batch["input_ids"], prompt["input_ids"]) and "pixel_values" not in batch
    assert not batch["context_image_mask"].any()


def test_official_black_context_image_on_request(synthetic, tiny):
    """text_only_black_context_image=True reproduces the official batches: a black image at t = 0 before the text."""
    model, processor = tiny
    _, dataset = synthetic
    collator = CheersTrainingCollator(
        processor, config=model.config, guidance_dropout=0.0, text_only_black_context_image=True
    )
    batch = collator([dataset[0], dataset[2], dataset[4]])
    tokens = model.config.num_image_tokens
    assert batch["context_image_mask"].sum(-1).tolist() == [0, 0, tokens]
    assert batch["context_image_mask"][2, :tokens].all()  # right padding: the context image opens the row
    assert batch["pixel_values"].shape[0] == 3 and batch["image_noise"].shape[0] == 3
    assert (batch["pixel_values"][2] == 0).all() and batch["image_timesteps"][2] == 0.0
    assert (batch["labels"][2, :tokens] == -100).all()


def test_guidance_dropout_replaces_the_prompt_of_generation_samples(synthetic, tiny):
    model, processor = tiny
    _, dataset = synthetic
    kept = [processor.image_gen_token_id, processor.image_start_token_id, processor.image_end_token_id]
    plain = CheersTrainingCollator(processor, guidance_dropout=0.0)([dataset[0], dataset[2]])
    dropped = CheersTrainingCollator(processor, guidance_dropout=1.0)([dataset[0], dataset[2]])
    assert torch.equal(dropped["input_ids"][0], plain["input_ids"][0])  # understanding samples never dropped
    row = dropped["input_ids"][1][dropped["attention_mask"][1].bool()]
    assert set(row.unique().tolist()) <= set(kept + [processor.null_token_id])
    assert torch.equal(dropped["labels"], plain["labels"])  # labels unchanged, as officially


def test_timestep_shift_warps_the_same_draws_as_the_sampler_grid(synthetic, tiny):
    """With `timestep_shift`, each generation target's t is the sampler's warp of the uniform draw it had before;
    over many draws a third fall below t = 0.2 at shift 0.5 (a fifth uniformly)."""
    from transformers_cheers.pipelines.scheduling_cheers import shift_time

    _, processor = tiny
    _, dataset = synthetic
    uniform = CheersTrainingCollator(processor, timestep_dtype=None)
    shifted = CheersTrainingCollator(processor, timestep_dtype=None, timestep_shift=0.5)
    t_uniform = uniform([dataset[2], dataset[3]])["image_timesteps"]
    t_shifted = shifted([dataset[2], dataset[3]])["image_timesteps"]
    torch.testing.assert_close(t_shifted, shift_time(t_uniform, 0.5))
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([shifted.draw_timestep(generator) for _ in range(3000)])
    assert abs(float((draws < 0.2).float().mean()) - 1 / 3) < 0.03
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="timestep_shift must be > 0"):
            CheersTrainingCollator(processor, timestep_shift=bad)


def test_per_sample_randomness_ignores_batch_composition(synthetic, tiny):
    model, processor = tiny
    _, dataset = synthetic
    collator = CheersTrainingCollator(processor, config=model.config, guidance_dropout=0.5)
    alone = collator([dataset[3]])
    together = collator([dataset[2], dataset[3]])
    assert together["image_timesteps"][1] == alone["image_timesteps"][0]
    assert torch.equal(together["image_noise"][1], alone["image_noise"][0])
    collator.set_epoch(1)
    assert not torch.equal(collator([dataset[3]])["image_noise"], alone["image_noise"])


def test_left_and_right_padding_give_the_same_losses(synthetic, tiny):
    model, processor = tiny
    _, dataset = synthetic
    samples = [dataset[0], dataset[2], dataset[4]]
    losses = []
    for side in ("right", "left"):
        batch = CheersTrainingCollator(processor, config=model.config, guidance_dropout=0.0, padding_side=side)(
            samples
        )
        with torch.no_grad():
            output = model(**batch)
        losses.append(torch.stack([output.text_loss, output.image_loss]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
