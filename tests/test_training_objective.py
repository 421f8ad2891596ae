"""The training objective (forward with labels) against the official training forward (golden case 5), the label
rewrite, the data pipeline against the official `process_sample` + collator, and bad-label errors."""

import json

import pytest
import torch
from conftest import assert_close_rel_l2, tolerance_for

from transformers_cheers import CheersConfig, CheersProcessor
from transformers_cheers.data import CheersTrainingCollator, load_conversation_dataset, make_synthetic_dataset
from transformers_cheers.tiny import tiny_cheers
from transformers_cheers.training import rewrite_shifted_labels


CASE = "case5_training"
SUBRUNS = ["a_und", "b_gen", "c_text", "d_batch_und_gen"]
LOSSES = ["loss", "text_loss", "image_loss"]
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def expand_official_batch(inputs, subrun, config):
    """Official batch (one -200/-300 sentinel per image, dummy image added inside the model, right padding) -> ours:
    N placeholder tokens per image with -100 labels, the text-only dummy as a context image, right padding."""
    n = config.num_image_tokens
    ids, masks, labels = (inputs[f"{subrun}/batch/{name}"] for name in ("input_ids", "attention_mask", "labels"))
    rows = []
    for row_ids, row_mask, row_labels in zip(ids, masks, labels):
        real = row_mask.bool()
        row_ids, row_labels = row_ids[real].tolist(), row_labels[real].tolist()
        has_image = any(token in (-200, -300) for token in row_ids)
        out = {"ids": [], "labels": [], "context": []}
        if not has_image:
            out = {"ids": [config.image_token_id] * n, "labels": [-100] * n, "context": [True] * n}
        for token, label in zip(row_ids, row_labels):
            if token in (-200, -300):
                image_id = config.image_token_id if token == -200 else config.image_gen_token_id
                out["ids"] += [image_id] * n
                out["labels"] += [-100] * n
                out["context"] += [False] * n
            else:
                out["ids"].append(token)
                out["labels"].append(label)
                out["context"].append(False)
        rows.append(out)
    length = max(len(row["ids"]) for row in rows)

    def pad(key, value):
        return torch.tensor([row[key] + [value] * (length - len(row[key])) for row in rows])

    mask = torch.tensor([[1] * len(row["ids"]) + [0] * (length - len(row["ids"])) for row in rows])
    pixel_values = inputs[f"{subrun}/batch/pixel_values"]
    return {
        "input_ids": pad("ids", 0),
        "attention_mask": mask,
        "labels": pad("labels", -100),
        "context_image_mask": pad("context", False),
        "pixel_values": pixel_values,
        "image_grid_hw": inputs[f"{subrun}/batch/grid_hws"],
        # the official forward casts t to the pixel dtype (bf16 in training)
        "image_timesteps": inputs[f"{subrun}/batch/t"].reshape(-1).to(pixel_values.dtype),
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_losses_match_official_training_forward(golden, golden_models, precision):
    model = golden_models(precision)  # train() or eval() is the same here: no dropout, frozen BatchNorm statistics
    inputs, expected = golden.inputs(CASE), golden.outputs(CASE, precision)
    report = []
    for subrun in SUBRUNS:
        batch = expand_official_batch(inputs, subrun, model.config)
        noise = expected[f"{subrun}/rng/00_randn_like"]
        with torch.no_grad():
            output = model(**batch, image_noise=noise, use_cache=False)
        for name in LOSSES:
            ours, theirs = float(getattr(output, name)), float(expected[f"{subrun}/{name}"])
            relative = abs(ours - theirs) / abs(theirs)
            report.append(f"{subrun}/{name}: {ours:.6f} vs {theirs:.6f} (rel {relative:.1e})")
            assert relative <= LOSS_TOLERANCE[precision], report[-1]
        # the exact targets the cross-entropy used (after the shift and the <im_start>/<im_end> rewrite)
        used = rewrite_shifted_labels(
            batch["labels"], model.config.image_start_token_id, model.config.image_end_token_id
        )
        torch.testing.assert_close(used.flatten(), expected[f"{subrun}/text_labels_used"])
        name = f"{subrun}/image_latent_pred_bchw"
        tolerance = tolerance_for(golden, CASE, name, precision)
        assert_close_rel_l2(output.image_velocities.float(), expected[name].float(), tolerance, name)
        name = f"{subrun}/image_latent_label"
        targets = output.image_velocity_targets.flatten(2).transpose(1, 2)  # official (N, h*w, C) layout
        assert_close_rel_l2(
            targets.float(), expected[name].float(), tolerance_for(golden, CASE, name, precision), name
        )


def golden_jsonl(golden, tmp_path):
    samples = golden.case_info(CASE, "fp32")["samples"]
    path = tmp_path / "golden.jsonl"
    lines = []
    for key in ("und", "gen", "text"):
        sample = dict(samples[key])
        if "image" in sample:
            sample["image"] = str(golden.root / "inputs" / sample["image"])
        lines.append(json.dumps(sample))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_collator_reproduces_official_batches(golden, tmp_path):
    """jsonl -> dataset -> collator gives the official process_sample + collator batches (expanded)."""
    processor = CheersProcessor.from_official_checkpoint(golden.checkpoint)
    dataset = load_conversation_dataset(golden_jsonl(golden, tmp_path))
    collator = CheersTrainingCollator(
        processor, guidance_dropout=0.0, pixel_dtype=torch.bfloat16, text_only_black_context_image=True
    )
    inputs = golden.inputs(CASE)
    config = CheersConfig(vision_config={"image_size": 128})  # 16 tokens per image, the official token ids
    for subrun, rows in (("a_und", [0]), ("b_gen", [1]), ("c_text", [2]), ("d_batch_und_gen", [0, 1])):
        ours = collator([dataset[row] for row in rows])
        theirs = expand_official_batch(inputs, subrun, config)
        padding = theirs["attention_mask"] == 0  # pad ids differ (official 0, ours the tokenizer's) and are unused
        theirs["input_ids"] = torch.where(padding, ours["input_ids"], theirs["input_ids"])
        for name in ("input_ids", "attention_mask", "labels", "context_image_mask", "pixel_values", "image_grid_hw"):
            assert torch.equal(ours[name], theirs[name].to(ours[name].dtype)), f"{subrun}: {name}"
        is_generation = torch.tensor(["<image_gen>" in json.dumps(dataset[row]["conversations"]) for row in rows])
        expected_t = theirs["image_timesteps"].float()
        assert torch.equal(ours["image_timesteps"][~is_generation], expected_t[~is_generation]), subrun
        t = ours["image_timesteps"][is_generation]
        assert bool(((t > 0) & (t <= 1)).all()) and torch.equal(t, t.bfloat16().float())


# --------------------------------------------------------------------------------------------------------------------
# The label rewrite and bad labels (tiny model)
# --------------------------------------------------------------------------------------------------------------------

S, E, IGNORE = 7, 8, -100


@pytest.fixture(scope="module")
def tiny_model_and_batch(tmp_path_factory):
    """The tiny model and a batch of one understanding, one generation and one text-only synthetic sample."""
    model, processor = tiny_cheers(seed=0)
    dataset = load_conversation_dataset(make_synthetic_dataset(tmp_path_factory.mktemp("data"), 1, 1, 1))
    collator = CheersTrainingCollator(processor, config=model.config, guidance_dropout=0.0)
    return model, collator([dataset[index] for index in range(3)])


@pytest.mark.parametrize(
    "labels, expected",
    [
        # text, <im_start>, 3 image tokens, <im_end>, text: <im_start> kept + one -100 inserted, <im_end> removed
        ([1, 2, S, IGNORE, IGNORE, IGNORE, E, 3, 4], [2, S, IGNORE, IGNORE, IGNORE, IGNORE, 3, 4]),
        ([1, 2, 3, 4], [2, 3, 4]),  # no image: a plain shift
        ([0, S, IGNORE, E, 5, S, IGNORE, E, 6], [S, IGNORE, IGNORE, 5, S, IGNORE, IGNORE, 6]),
    ],
)
def test_label_rewrite(labels, expected):
    assert rewrite_shifted_labels(torch.tensor([labels]), S, E).tolist() == [expected]


def test_label_rewrite_rejects_unpaired_image_markers():
    with pytest.raises(ValueError, match=r"Sample 1 of the batch has 1 <im_start> target\(s\) but 0 <im_end>"):
        rewrite_shifted_labels(torch.tensor([[1, 2, 3], [1, S, 3]]), S, E)


def test_labels_on_image_positions_are_rejected(tiny_model_and_batch):
    model, batch = tiny_model_and_batch
    labels = batch["labels"].clone()
    image_positions = (batch["input_ids"] == model.config.image_gen_token_id).nonzero()
    row, column = image_positions[0].tolist()
    labels[row, column] = 42
    with pytest.raises(
        ValueError, match=rf"Sample {row} of the batch has 1 text target\(s\) at image-token positions"
    ):
        model(**{**batch, "labels": labels})


def test_labels_copied_from_input_ids_are_accepted(tiny_model_and_batch):
    """`labels = input_ids.clone()` leaves the placeholder id at image tokens; those are ignored, as officially."""
    model, batch = tiny_model_and_batch
    labels = torch.where(batch["labels"] == -100, batch["input_ids"], batch["labels"])
    labels[batch["attention_mask"] == 0] = -100
    with torch.no_grad():
        output = model(**{**batch, "labels": labels})
    assert torch.isfinite(output.loss)


def test_explicit_noise_makes_the_loss_reproducible(tiny_model_and_batch):
    model, batch = tiny_model_and_batch
    with torch.no_grad():
        first, second = model(**batch).loss, model(**batch).loss
        assert torch.equal(first, second)
        without_noise = {key: value for key, value in batch.items() if key != "image_noise"}
        assert not torch.equal(model(**without_noise).image_loss, model(**without_noise).image_loss)


def test_each_loss_trains_its_own_head(tiny_model_and_batch):
    model, batch = tiny_model_and_batch
    detail_head = model.model.detail_head.final_layer.proj_out.weight
    for name, reaches_flow_head in (("image_loss", True), ("text_loss", False)):
        model.zero_grad()
        getattr(model(**batch), name).backward()
        assert (detail_head.grad is not None and bool(detail_head.grad.any())) == reaches_flow_head, name
        assert bool(model.model.language_model.layers[0].mlp.up_proj.weight.grad.any()), name
    model.zero_grad()


def test_image_loss_mask_selects_images(tiny_model_and_batch):
    model, batch = tiny_model_and_batch
    num_images = batch["pixel_values"].shape[0]
    with torch.no_grad():
        full = model(**batch)
        only_first = model(**batch, image_loss_mask=torch.arange(num_images) == 0)
    expected = ((full.image_velocities[:1] - full.image_velocity_targets[:1]) ** 2).mean()
    torch.testing.assert_close(only_first.image_loss, expected)
