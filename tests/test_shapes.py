"""Cheers-Shapes: the drawing obeys the world's spec, the dataset writer is deterministic and keeps the held-out
combinations out of generation and editing, the project's loader and collator read what it writes, the rule-based
reader is exact enough to judge a model, and the evaluator refuses other models and runs end to end."""

import json
import random
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import load_script

from transformers_cheers import shapes
from transformers_cheers.data import CheersTrainingCollator
from transformers_cheers.tiny import tiny_cheers


pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_shapes.py"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes") / "set"
    return shapes.write_dataset(folder, seed=3, num_generation=120, num_understanding=40, num_editing=60)


@pytest.fixture(scope="module")
def eval_shapes():
    return load_script(EVAL_SCRIPT)


def records(folder: Path, kind: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{kind}.jsonl").read_text().splitlines()]


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def scene_of(record: dict) -> shapes.Scene:
    fields = {key: value for key, value in record["scene"].items() if key != "position"}
    return shapes.Scene(**fields)


# ---- the world ------------------------------------------------------------------------------------------------------


def test_drawing_obeys_the_spec():
    rng = random.Random(0)
    third = shapes.IMAGE_SIZE / 3
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            for position in shapes.POSITIONS:
                scene = shapes.sample_scene(rng, colour, shape, position)
                image = np.asarray(shapes.draw_scene(scene))
                assert image.shape == (64, 64, 3)
                is_shape = (image == shapes.PALETTE[colour]).all(-1)
                is_background = (image == shapes.BACKGROUND).all(-1)
                assert (is_shape | is_background).all(), "only two exact colours: no antialiasing, no outline"
                rows, cols = np.nonzero(is_shape)
                top, left = rows.min(), cols.min()
                height, width = rows.max() - top + 1, cols.max() - left + 1
                assert (left, top, width, height) == (scene.left, scene.top, scene.size, scene.size)
                assert shapes.SIZE_RANGE[0] <= scene.size <= shapes.SIZE_RANGE[1]
                center_x, center_y = scene.center
                assert shapes.CENTER_Y_RANGE[0] <= center_y <= shapes.CENTER_Y_RANGE[1]
                assert shapes.POSITIONS.index(position) == int(center_x // third) and scene.position == position
                assert min(abs(center_x - third), abs(center_x - 2 * third)) >= shapes.POSITION_MARGIN
                assert cols.mean() + 0.5 == pytest.approx(center_x), "every shape is symmetric about its centre"


@pytest.mark.parametrize("shape, fill", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_each_shape_fills_its_box_as_its_geometry_says(shape, fill):
    for size in range(shapes.SIZE_RANGE[0], shapes.SIZE_RANGE[1] + 1):
        mask = shapes.shape_mask(shapes.Scene("red", shape, 10, 10, size))
        assert mask.sum() / size**2 == pytest.approx(fill, abs=1.6 / size)


def test_triangle_points_up_with_its_base_at_the_bottom():
    for size in range(shapes.SIZE_RANGE[0], shapes.SIZE_RANGE[1] + 1):
        mask = shapes.shape_mask(shapes.Scene("red", "triangle", 5, 7, size))
        widths = mask[7 : 7 + size].sum(axis=1)
        assert widths[0] <= 2 and widths[-1] == size, "apex pixel(s) on top, full base at the bottom"
        assert (np.diff(widths) >= 0).all(), "rows widen downwards"


def test_sample_scene_refuses_unknown_words():
    with pytest.raises(ValueError, match="Unknown colour 'pink'; the world has red, green"):
        shapes.sample_scene(random.Random(0), colour="pink")
    with pytest.raises(ValueError, match="Unknown shape 'star'"):
        shapes.sample_scene(random.Random(0), shape="star")


def test_vocabulary_and_held_out_combinations():
    assert shapes.PALETTE["orange"] == (240, 140, 30) and shapes.BACKGROUND == (200, 200, 200)
    assert len(shapes.HELD_OUT) == 4 and len(set(shapes.HELD_OUT)) == 4
    assert {shape for _, shape in shapes.HELD_OUT} == set(shapes.SHAPES)
    assert shapes.caption("red", "circle", "left") == "a red circle on the left"
    assert shapes.Scene("red", "circle", 0, 20, 20).answer("describe") == "a red circle on the left"


# ---- the writer -----------------------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_writer_is_deterministic(tmp_path):
    counts = {"num_generation": 8, "num_understanding": 8, "num_editing": 4}
    first = folder_bytes(shapes.write_dataset(tmp_path / "a", seed=7, **counts))
    again = folder_bytes(shapes.write_dataset(tmp_path / "b", seed=7, **counts))
    other = folder_bytes(shapes.write_dataset(tmp_path / "c", seed=8, **counts))
    assert first == again
    assert first.keys() == other.keys() and first != other
    assert len([name for name in first if name.endswith(".png")]) == 8 + 8 + 2 * 4


def test_held_out_combinations_never_appear_in_generation_or_editing(written):
    for item in records(written, "generation"):
        scene = scene_of(item)
        assert not shapes.is_held_out(scene.colour, scene.shape)
        prompt = item["conversations"][0]["value"]
        assert prompt in (
            shapes.caption(scene.colour, scene.shape, scene.position),
            shapes.caption(scene.colour, scene.shape),
        )
        assert shapes.read_scene(PIL.Image.open(written / item["image"])) == (
            scene.colour,
            scene.shape,
            scene.position,
        )
    for item in records(written, "editing"):
        source = scene_of(item)
        target = item["conversations"][0]["value"].removeprefix(shapes.IMAGE_ITEM_TEXT)
        colours = [colour for colour in shapes.COLOURS if target == shapes.edit_instruction(colour)]
        assert len(colours) == 1 and colours[0] != source.colour
        assert not shapes.is_held_out(source.colour, source.shape) and not shapes.is_held_out(colours[0], source.shape)
        source_path, target_path = (written / name.strip() for name in item["image"].split(","))
        assert (pixels(source_path) == np.asarray(shapes.draw_scene(source))).all()
        assert (pixels(target_path) == np.asarray(shapes.draw_scene(source.recoloured(colours[0])))).all()
    prompts = {item["conversations"][0]["value"] for item in records(written, "generation")}
    assert any(" on the " in prompt for prompt in prompts) and any(" on the " not in prompt for prompt in prompts)


def test_understanding_answers_match_the_images(written):
    questions = {}
    for item in records(written, "understanding"):
        scene = scene_of(item)
        question = item["conversations"][0]["value"].removeprefix(shapes.IMAGE_ITEM_TEXT)
        kind = next(kind for kind, text in shapes.QUESTIONS.items() if text == question)
        questions[kind] = questions.get(kind, 0) + 1
        assert item["conversations"][1]["value"] == scene.answer(kind)
        assert (pixels(written / item["image"]) == np.asarray(shapes.draw_scene(scene))).all()
    assert questions == dict.fromkeys(shapes.QUESTIONS, 10)


def test_project_loader_and_collator_read_the_written_set(written):
    dataset = shapes.load_shapes_dataset(written)
    assert len(dataset) == 120 + 40 + 60
    assert [dataset[i]["id"] for i in (0, 120, 160)] == ["gen_00000", "und_00000", "edit_00000"]
    model, processor = tiny_cheers()
    batch = CheersTrainingCollator(processor, config=model.config)([dataset[0], dataset[120], dataset[160]])
    assert batch["pixel_values"].shape == (4, 3, 64, 64)  # one generated, one read, an edit's source and target
    loss = model(**batch).loss
    assert loss.isfinite()
    raw = datasets.load_dataset("json", data_files=str(written / "train.jsonl"), split="train")
    assert raw[0]["kind"] == "generation" and raw[160]["image"].count(",") == 1


def test_writer_refuses_bad_arguments_and_leaves_nothing_half_written(tmp_path):
    with pytest.raises(ValueError, match="num_editing must be an integer >= 0, got -1"):
        shapes.write_dataset(tmp_path / "x", num_editing=-1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass another folder or overwrite=True"):
        shapes.write_dataset(tmp_path / "full", num_generation=1, num_understanding=0, num_editing=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full"]


def test_cli_writes_a_set(tmp_path, capsys):
    shapes.main(
        [
            "--output",
            str(tmp_path / "cli"),
            "--seed",
            "1",
            "--num-generation",
            "2",
            "--num-understanding",
            "3",
            "--num-editing",
            "1",
        ]
    )
    info = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert info["counts"] == {"generation": 2, "understanding": 3, "editing": 1} and info["seed"] == 1
    assert "Wrote 6 samples" in capsys.readouterr().out


def test_hold_out_understanding_hides_them_from_understanding_too(tmp_path):
    folder = shapes.write_dataset(
        tmp_path / "strict", num_generation=0, num_understanding=200, num_editing=0, hold_out_understanding=True
    )
    assert not any(
        shapes.is_held_out(scene_of(item).colour, scene_of(item).shape) for item in records(folder, "understanding")
    )


# ---- the reader -----------------------------------------------------------------------------------------------------


def test_reader_is_exact_on_drawn_images():
    rng = random.Random(2024)
    scenes = [shapes.sample_scene(rng) for _ in range(300)]
    correct = sum(shapes.read_scene(shapes.draw_scene(s)) == (s.colour, s.shape, s.position) for s in scenes)
    assert correct >= 0.99 * len(scenes)


def test_reader_survives_blur_and_noise():
    rng = random.Random(99)
    scenes = [shapes.sample_scene(rng) for _ in range(100)]
    degraded = [
        shapes.degrade(shapes.draw_scene(s), blur_radius=1.5, noise_std=16, seed=i) for i, s in enumerate(scenes)
    ]
    correct = sum(shapes.read_scene(image) == (s.colour, s.shape, s.position) for s, image in zip(scenes, degraded))
    assert correct >= 0.97 * len(scenes)


def test_reader_finds_nothing_on_an_empty_or_tiny_image():
    assert shapes.read_scene(PIL.Image.new("RGB", (64, 64), shapes.BACKGROUND)) == (None, None, None)
    speck = np.full((64, 64, 3), shapes.BACKGROUND, dtype=np.uint8)
    speck[30:34, 30:34] = shapes.PALETTE["red"]
    assert shapes.read_scene(speck) == (None, None, None)


def test_reader_refuses_a_wash_of_a_non_palette_colour_and_a_non_shape():
    image = np.full((64, 64, 3), shapes.BACKGROUND, dtype=np.uint8)
    image[10:30, 10:30] = (20, 20, 20)  # black is far from every palette colour
    assert shapes.read_scene(image)[0] is None
    image = np.full((64, 64, 3), shapes.BACKGROUND, dtype=np.uint8)
    image[30:34, 2:62] = shapes.PALETTE["red"]  # a bar is none of the three shapes
    assert shapes.read_scene(image) == ("red", None, "center")


# ---- the world card and the evaluator -------------------------------------------------------------------------------


def test_world_card_round_trip_and_refusals(tmp_path):
    card = shapes.read_world_card(shapes.write_world_card(tmp_path, sampling={"num_inference_steps": 12}).parent)
    assert (
        card["held_out"] == [list(pair) for pair in shapes.HELD_OUT] and card["sampling"]["num_inference_steps"] == 12
    )
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="plain is not a Cheers-Shapes model: it has no cheers_shapes.json"):
        shapes.read_world_card(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="missing is not a folder"):
        shapes.read_world_card(tmp_path / "missing")
    card["palette"]["red"] = [255, 0, 0]
    (tmp_path / shapes.WORLD_CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="describes another world than this code .*: palette differ"):
        shapes.read_world_card(tmp_path)
    with pytest.raises(ValueError, match="Unknown sampling setting"):
        shapes.write_world_card(tmp_path, sampling={"steps": 3})


def test_evaluator_refuses_a_folder_that_is_not_a_shapes_model(tmp_path, eval_shapes, monkeypatch, capsys):
    model, processor = tiny_cheers()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setattr("sys.argv", ["eval_shapes.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        eval_shapes.main()
    assert exit_info.value.code == 2
    assert "is not a Cheers-Shapes model: it has no cheers_shapes.json" in capsys.readouterr().err


def test_evaluator_runs_end_to_end_on_a_tiny_model(tmp_path, eval_shapes, monkeypatch, capsys):
    model, processor = tiny_cheers()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    shapes.write_world_card(tmp_path, sampling={"num_inference_steps": 2, "guidance_scale": 3.0})
    arguments = ["--num-t2i", "3", "--num-understanding", "2", "--num-edit", "2", "--num-reader", "10"]
    monkeypatch.setattr(
        "sys.argv", ["eval_shapes.py", str(tmp_path), *arguments, "--save-grid", str(tmp_path / "g.png")]
    )
    eval_shapes.main()
    out = capsys.readouterr().out
    assert "CPU: " in out and "torch CPU capability" in out
    for row in (
        "| reader (fresh drawings)     | clean ",
        "| reader (fresh drawings)     | blur ",
        "| text-to-image               | seen, 2 steps, guidance 3 ",
        "| text-to-image               | held-out, 2 steps, guidance 3 ",
        "| text-to-image               | seen, 2 steps, guidance 1 ",
        "| text-to-image               | held-out, 2 steps, guidance 1 ",
        "| understanding (exact match) | seen combinations ",
        "| understanding (exact match) | held-out combinations ",
        "| editing                     | seen, 2 steps, guidance 3 ",
        "| editing                     | held-out, 2 steps, guidance 3 ",
    ):
        assert row in out, row
    assert "| 10 | 100.0    | 100.0   | 100.0      | 100.0 |" in out  # the reader is exact on clean drawings
    assert PIL.Image.open(tmp_path / "g.png").size == (9 * 64, 6 * 64)


def test_evaluator_scores_a_model_that_draws_exactly_what_it_is_asked(eval_shapes):
    """The bookkeeping, with a stand-in for the pipeline that draws the requested scene: every column is 100 %,
    and seen / held-out rows split by the prompt's combination."""
    words = {word: word for word in (*shapes.COLOURS, *shapes.SHAPES, *shapes.POSITIONS)}
    rng = random.Random(5)

    def draw_what_is_asked(prompts, image=None, **_):
        images = []
        for index, prompt in enumerate(prompts):
            if image is None:
                colour, shape, position = (words[word] for word in prompt.split() if word in words)
                images.append(shapes.draw_scene(shapes.sample_scene(rng, colour, shape, position)))
            else:
                colour = prompt.removeprefix("Make the shape ").removesuffix(".")
                source = shapes.read_scene(image[index])
                scene = shapes.sample_scene(rng, colour, source[1], source[2])
                images.append(shapes.draw_scene(scene))
        return type("Output", (), {"images": images})

    requests = eval_shapes.text_to_image_requests(0, 54)
    assert sorted(requests) == sorted(eval_shapes.ALL_SCENES)
    tallies, _ = eval_shapes.evaluate_text_to_image(draw_what_is_asked, requests, 1, 1.0, None, 0, 20)
    assert (tallies["seen"].total, tallies["held-out"].total) == (42, 12)
    assert tallies["seen"].cells() == tallies["held-out"].cells() == ["100.0"] * 4
    editing = eval_shapes.evaluate_editing(draw_what_is_asked, 30, 1, 1.0, None, 0, 8)
    assert sum(tally.total for tally in editing.values()) == 30
    assert all(tally.cells() == ["100.0"] * 4 for tally in editing.values() if tally.total)


# ---- the diagnosis (benchmarks/diagnose_shapes.py) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def diagnose_shapes():
    sys.path.insert(0, str(EVAL_SCRIPT.parent))  # it imports eval_shapes as its sibling
    try:
        return load_script(EVAL_SCRIPT.parent / "diagnose_shapes.py")
    finally:
        sys.path.remove(str(EVAL_SCRIPT.parent))


def test_held_out_r2_tells_a_visible_signal_from_an_invisible_one(diagnose_shapes):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4000, 6, generator=generator)
    visible = features @ torch.randn(6, 1, generator=generator) + 0.5  # a linear function of the features
    invisible = torch.randn(4000, 1, generator=generator)  # independent of them
    r2 = diagnose_shapes.held_out_r2(features, torch.cat([visible, invisible], dim=1))
    assert r2[0] > 0.999 and abs(r2[1]) < 0.01


def test_held_out_accuracy_tells_a_linear_label_from_a_random_one(diagnose_shapes):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(900, 8, generator=generator)
    linear = (features @ torch.randn(8, 3, generator=generator)).argmax(1)  # three classes split by hyperplanes
    unrelated = torch.randint(0, 3, (900,), generator=generator)
    assert diagnose_shapes.held_out_accuracy(features, linear, num_fit=600) > 95
    assert abs(diagnose_shapes.held_out_accuracy(features, unrelated, num_fit=600) - 100 / 3) < 8


def test_word_swaps_take_the_next_word_of_the_same_kind(diagnose_shapes):
    scene = shapes.Scene(colour="orange", shape="triangle", left=44, top=10, size=16)
    assert scene.position == "right"
    last = {"colour": shapes.COLOURS[-1], "shape": shapes.SHAPES[-1], "position": shapes.POSITIONS[-1]}
    assert last == {"colour": "orange", "shape": "triangle", "position": "right"}  # so each swap wraps around
    for field, first in (
        ("colour", shapes.COLOURS[0]),
        ("shape", shapes.SHAPES[0]),
        ("position", shapes.POSITIONS[0]),
    ):
        assert diagnose_shapes.with_next_word(scene, field) == {**last, field: first}
    assert diagnose_shapes.with_next_word(scene.recoloured("red"), "colour")["colour"] == shapes.COLOURS[1]


def test_latent_channel_variances_group_the_patchified_entries(diagnose_shapes):
    model, _ = tiny_cheers()
    channels, entries = model.config.vae_config["latent_channels"], 4  # 2x2 patchify
    model.model.vae.bn.running_var.copy_(torch.arange(channels).repeat_interleave(entries).float())
    assert diagnose_shapes.latent_channel_variances(model) == [float(c) for c in range(channels)]


def test_diagnosis_runs_end_to_end_and_refuses_other_folders(tmp_path, diagnose_shapes, monkeypatch, capsys):
    model, processor = tiny_cheers()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setattr("sys.argv", ["diagnose_shapes.py", str(tmp_path)])
    with pytest.raises(SystemExit):
        diagnose_shapes.main()
    assert "is not a Cheers-Shapes model" in capsys.readouterr().err

    shapes.write_world_card(tmp_path)
    arguments = ["--times", "0", "0.5", "--guidance", "1", "2", "--num-noise", "8", "--per-caption", "2"]
    arguments += ["--word-draws", "2", "--probe-images", "12", "--steer-times", "0.5"]
    monkeypatch.setattr("sys.argv", ["diagnose_shapes.py", str(tmp_path), *arguments])
    diagnose_shapes.main()
    channels_part, rest = capsys.readouterr().out.split("3. the denoiser along t")
    denoiser_part, rest = rest.split("4. does the prompt reach the velocity?")
    prompt_part, rest = rest.split("5. what the sampler leaves")
    sampler_part, rest = rest.split("6. what the words do")
    words_part, rest = rest.split("7. what the image tokens hold")
    probe_part, rest = rest.split("8. does a word steer the drawing?")
    steering_part, worth_part = rest.split("9. what a word is worth to the loss")
    channel_rows = [line for line in channels_part.splitlines() if line[:3] in {f"| {c}" for c in range(10)}]
    assert len(channel_rows) == model.config.vae_config["latent_channels"]
    assert "floor of the velocity MSE at t = 0: " in denoiser_part
    rows = [line.split("|")[1:3] for line in denoiser_part.splitlines() if line[:3] in ("| 1", "| 2")]
    expected = [("1", "0"), ("1", "0.5"), ("2", "0"), ("2", "0.5")]  # (guidance, t)
    assert [(guidance.strip(), t.strip()) for guidance, t in rows] == expected
    prompt_rows = [line.split("|")[1:4] for line in prompt_part.splitlines() if line[:3] == "| 0"]
    assert [t.strip() for t, _, _ in prompt_rows] == ["0", "0.5"]
    assert all(float(effect) > 0 and float(gate) > 0 for _, effect, gate in prompt_rows)  # the prompt is passed
    variances = dict(
        line.split("|")[1:3] for line in sampler_part.splitlines() if line.startswith(("| sampled", "| the"))
    )
    assert {name.strip() for name in variances} == {"sampled", "the scenes' own"}
    assert all(float(value) > 0 for value in variances.values())
    word_rows = [line.split("|")[1:5] for line in words_part.splitlines() if line[:3] in ("| 1", "| 2")]
    assert [row[0].strip() for row in word_rows] == ["1", "2"]  # one row per guidance
    assert all(0 <= float(value) <= 100 for row in word_rows for value in row[1:])
    assert "12 fresh drawings to fit, 6 to score" in probe_part
    probe_row = [line.split("|")[1:4] for line in probe_part.splitlines() if line.startswith("| ")][-1]
    assert all(0 <= float(value) <= 100 for value in probe_row)
    steering_rows = [line.split("|")[1:5] for line in steering_part.splitlines() if line.startswith("| ")][1:]
    assert [(word.strip(), t.strip()) for word, t, _, _ in steering_rows] == [
        ("colour", "0.5"),
        ("shape", "0.5"),
        ("position", "0.5"),
    ]
    # the swapped word and the drawing's word differ, so no x1_hat reads as both
    assert all(0 <= float(caption) + float(drawing) <= 100 for _, _, caption, drawing in steering_rows)
    worth_rows = [line.split("|")[1:3] for line in worth_part.splitlines() if line.startswith("| ")][1:]
    assert [word.strip() for word, _ in worth_rows] == ["colour", "shape"]
    assert all(float(value) > 0 for _, value in worth_rows)  # another word draws another picture, latent

    monkeypatch.setattr("sys.argv", ["diagnose_shapes.py", str(tmp_path), "--times", "1"])
    with pytest.raises(SystemExit):
        diagnose_shapes.main()
    assert "--times must lie in [0, 1)" in capsys.readouterr().err
