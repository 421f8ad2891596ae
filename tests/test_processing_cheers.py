"""CheersProcessor: chat template, official parity (cases 2-5), generation and CFG prompts, bad inputs, save/load."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_python_without_the_package
from transformers import Qwen2Tokenizer

from transformers_cheers.processing_cheers import CheersProcessor, add_cheers_special_tokens, official_dummy_image
from transformers_cheers.prompting import (
    CHEERS_SPECIAL_TOKENS,
    DEFAULT_SYSTEM_PROMPT,
    render_chat,
    render_training_conversation,
    unconditional_input_ids,
)


IMAGE_TOKENS = 16  # (128 px / 16 patch / 2 merge) ** 2 in the tiny fixtures
OFFICIAL_SENTINELS = {-200: "image_token_id", -300: "image_gen_token_id"}  # what the official puts in input_ids
PICTURE = PIL.Image.new("RGB", (40, 30), "red")


@pytest.fixture(scope="module")
def processor(golden):
    return CheersProcessor.from_official_checkpoint(golden.checkpoint)


@pytest.fixture(scope="module")
def image(golden):
    return PIL.Image.open(golden.root / "inputs" / "image.png")


def chat(processor, *messages, generation=True):
    return processor.apply_chat_template(list(messages), add_generation_prompt=generation)


def user(*content):
    return {
        "role": "user",
        "content": list(content) if len(content) > 1 or not isinstance(content[0], str) else content[0],
    }


def expand_official(processor, input_ids: torch.Tensor, context_tokens: int = 0) -> list[int]:
    """Official ids with each sentinel replaced by IMAGE_TOKENS copies of our id; the official model (not its
    processor) prepends the dummy image, so `context_tokens` image ids go first."""
    expanded = [processor.image_token_id] * context_tokens
    for token in input_ids.tolist():
        sentinel = OFFICIAL_SENTINELS.get(token)
        expanded += [getattr(processor, sentinel)] * IMAGE_TOKENS if sentinel else [token]
    return expanded


def prompt_text(golden, case):
    return golden.manifest["cases"][case]["runs"]["bf16"]["info"]["prompt_text"]


# ---- chat template ----


def test_chat_template_renders_official_understanding_prompt(golden, processor):
    rendered = chat(processor, user({"type": "image"}, {"type": "text", "text": " Describe this image."}))
    assert rendered == prompt_text(golden, "case2_understanding")


def test_chat_template_string_content_system_and_turns(golden, processor):
    assert chat(processor, user("Please introduce yourself briefly.")) == prompt_text(golden, "case3_text_only")
    conversation = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
    ]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert chat(processor, *conversation, generation=False) == expected


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "<im_start><image><im_end>\nWhat is this?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And now?"},
        ],
    ],
)
@pytest.mark.parametrize("generation", [True, False])
def test_chat_template_equals_the_python_renderer(processor, messages, generation):
    """The Jinja template (inference) and `render_chat` (training) write the same text."""
    assert chat(processor, *messages, generation=generation) == render_chat(messages, generation)


def test_training_text_is_the_chat_format(processor):
    """The collator's text is the chat template's text of the stripped turns after the system prompt."""
    turns = [
        {"from": "user", "value": " <im_start><image><im_end>\nWhat is this? "},
        {"from": "assistant", "value": "Red."},
    ]
    messages = [{"role": turn["from"], "content": turn["value"].strip()} for turn in turns]
    assert render_training_conversation(turns) == chat(processor, *messages, generation=False)
    assert render_training_conversation(turns, "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert render_chat(messages).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")


def test_chat_template_rejects_unknown_items(processor):
    with pytest.raises(Exception, match="only image and text items, got video"):
        chat(processor, user({"type": "video"}))


# ---- parity with the recorded official processor outputs ----


def test_understanding_matches_official(golden, processor, image):
    recorded = golden.inputs("case2_understanding")
    out = processor(images=[image], text=prompt_text(golden, "case2_understanding"))
    assert out["input_ids"][0].tolist() == expand_official(processor, recorded["inputs/input_ids"][0])
    assert out["attention_mask"].tolist() == [[1] * out["input_ids"].shape[1]]
    torch.testing.assert_close(out["pixel_values"], recorded["inputs/pixel_values"], rtol=0, atol=0)
    assert torch.equal(out["image_grid_hw"], recorded["inputs/grid_hws"])
    assert "context_image_mask" not in out


@pytest.mark.parametrize(
    "case, mode", [("case3_text_only", "text"), ("case4a_t2i_cfg", "image"), ("case4b_t2i_nocfg", "image")]
)
def test_context_image_prompts_match_official(golden, processor, case, mode):
    recorded = golden.inputs(case)
    seed = golden.manifest["cases"][case]["runs"]["bf16"]["info"]["numpy_seed"]
    dummy = official_dummy_image(seed)
    assert torch.equal(torch.from_numpy(np.array(dummy)), recorded["inputs/dummy_image_uint8"])
    out = processor(text=prompt_text(golden, case), context_image=dummy, generation_mode=mode)
    expected = expand_official(processor, recorded["inputs/input_ids"][0], context_tokens=IMAGE_TOKENS)
    assert out["input_ids"][0].tolist() == expected
    assert out["attention_mask"][0].tolist() == [1] * IMAGE_TOKENS + recorded["inputs/attention_mask"][0].tolist()
    assert out["context_image_mask"][0].tolist() == [True] * IMAGE_TOKENS + [False] * (len(expected) - IMAGE_TOKENS)
    torch.testing.assert_close(out["pixel_values"], recorded["inputs/pixel_values"], rtol=0, atol=0)
    assert torch.equal(out["image_grid_hw"], recorded["inputs/grid_hws"])


def test_generation_prompt_ends_with_image_start(golden, processor):
    out = processor(text=prompt_text(golden, "case4a_t2i_cfg"), generation_mode="image")
    assert out["input_ids"][0, -1].item() == processor.image_start_token_id == 151667
    assert golden.inputs("case4a_t2i_cfg")["inputs/input_ids"][0, -1].item() == processor.image_start_token_id


def test_training_samples_match_official(golden, processor, image):
    """case5: the chat template renders the training conversations; <image_gen> takes the crop path."""
    recorded = golden.inputs("case5_training")
    understanding = chat(
        processor,
        user({"type": "image"}, {"type": "text", "text": "What is this?"}),
        {"role": "assistant", "content": "A small test picture."},
        generation=False,
    )
    generation = chat(
        processor,
        user("An apple.\nBased on the above description, generate an image."),
        {"role": "assistant", "content": "<im_start><image_gen><im_end>"},
        generation=False,
    )
    for name, text in [("a_und", understanding), ("b_gen", generation)]:
        out = processor(images=[image], text=text)
        assert out["input_ids"][0].tolist() == expand_official(processor, recorded[f"{name}/batch/input_ids"][0])
        assert torch.equal(out["pixel_values"].bfloat16(), recorded[f"{name}/batch/pixel_values"])
    batch = processor(images=[image, image], text=[understanding, generation], padding_side="right")
    assert torch.equal(batch["pixel_values"].bfloat16(), recorded["d_batch_und_gen/batch/pixel_values"])


# ---- batching, padding, generation mode, context images ----


def test_left_padding_by_default_and_right_on_request(processor):
    texts = [chat(processor, user("Hi")), chat(processor, user("A much longer question about many things"))]
    left = processor(text=texts, generation_mode="image")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert (left["input_ids"][:, -1] == processor.image_start_token_id).all()
    right = processor(text=texts, padding_side="right")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert right["input_ids"][0, -1] == processor.tokenizer.pad_token_id


def test_images_follow_placeholders_across_the_batch(processor, image):
    black = PIL.Image.new("RGB", (50, 50))
    texts = ["<im_start><image><im_end>", "no image", "<im_start><image><im_end> and <im_start><image_gen><im_end>"]
    flat = processor(images=[black, image, image], text=texts)
    nested = processor(images=[[black], [], [image, image]], text=texts)
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])
    assert flat["pixel_values"][0].max() == 0  # the black image is the first one
    letterbox, crop = processor.image_processor(image)["pixel_values"], flat["pixel_values"][2:]
    assert torch.equal(flat["pixel_values"][1:2], letterbox) and not torch.equal(crop, letterbox)
    counts = [(row == processor.image_token_id).sum().item() for row in flat["input_ids"]]
    assert counts == [IMAGE_TOKENS, 0, IMAGE_TOKENS]
    assert (flat["input_ids"] == processor.image_gen_token_id).sum() == IMAGE_TOKENS


def test_context_image_per_prompt_with_left_padding(processor, image):
    texts = ["short", "<im_start><image><im_end> a longer prompt with an image"]
    out = processor(images=[image], text=texts, context_image=[official_dummy_image(0), None])
    assert out["pixel_values"].shape[0] == 2  # row 0: its context image; row 1: its placeholder image
    assert out["context_image_mask"].sum(dim=1).tolist() == [IMAGE_TOKENS, 0]
    first = out["attention_mask"][0].tolist().index(1)
    assert out["context_image_mask"][0, first : first + IMAGE_TOKENS].all()
    assert (out["input_ids"][out["context_image_mask"]] == processor.image_token_id).all()


def test_resolution_override_changes_token_count(processor, image):
    out = processor(images=[image], text="<im_start><image><im_end>", resolution=64)
    assert (out["input_ids"] == processor.image_token_id).sum() == (64 // 32) ** 2
    assert out["image_grid_hw"].tolist() == [[4, 4]]


def test_apply_chat_template_tokenizes_with_images(golden, processor, image):
    messages = [user({"type": "image", "image": image}, {"type": "text", "text": " Describe this image."})]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    reference = processor(images=[image], text=prompt_text(golden, "case2_understanding"))
    assert torch.equal(out["input_ids"], reference["input_ids"])
    assert torch.equal(out["pixel_values"], reference["pixel_values"])


def test_apply_chat_template_passes_generation_options(golden, processor):
    options = {"generation_mode": "image", "context_image": official_dummy_image(17)}
    conversation = [user("A red apple on a wooden table.")]
    out = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, processor_kwargs=options
    )
    reference = processor(text=prompt_text(golden, "case4a_t2i_cfg"), **options)
    assert out.keys() == reference.keys() and all(torch.equal(out[key], reference[key]) for key in out)


def test_decode_round_trip(processor):
    out = processor(text="Hello <im_start>", padding_side="right")
    assert processor.decode(out["input_ids"][0]) == "Hello <im_start>"
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == ["Hello "]


# ---- unconditional (CFG) prompts ----


def test_unconditional_matches_official_rule(golden, processor):
    recorded = golden.inputs("case4a_t2i_cfg")
    inputs = processor(
        text=prompt_text(golden, "case4a_t2i_cfg"), context_image=official_dummy_image(17), generation_mode="image"
    )
    unconditional = processor.build_unconditional_inputs(inputs)
    # the official rule on the official ids: everything but <im_start>, <im_end> and the -200 image sentinel
    official_ids, official_mask = recorded["inputs/input_ids"][0], recorded["inputs/attention_mask"][0]
    kept = (processor.image_start_token_id, processor.image_end_token_id, -200)
    official = unconditional_input_ids(official_ids, official_mask, kept, processor.null_token_id)
    assert unconditional["input_ids"][0].tolist() == expand_official(processor, official, IMAGE_TOKENS)
    assert torch.equal(unconditional["attention_mask"], inputs["attention_mask"])
    assert torch.equal(unconditional["pixel_values"], inputs["pixel_values"])


def test_unconditional_keeps_padding_and_edit_source(processor, image):
    texts = ["<im_start><image><im_end>\nMake it blue.", "A cat"]
    inputs = processor(images=[image], text=texts, generation_mode="image")
    unconditional = processor.build_unconditional_inputs(inputs)
    pad = inputs["attention_mask"] == 0
    assert pad.any() and torch.equal(unconditional["input_ids"][pad], inputs["input_ids"][pad])
    assert (unconditional["input_ids"][0] == processor.image_token_id).sum() == IMAGE_TOKENS
    assert unconditional["input_ids"][0, 0] == processor.image_start_token_id
    assert unconditional["input_ids"][0, IMAGE_TOKENS + 1] == processor.image_end_token_id
    rest = unconditional["input_ids"][0, IMAGE_TOKENS + 2 : -1]
    assert (rest == processor.null_token_id).all() and unconditional["input_ids"][0, -1] == inputs["input_ids"][0, -1]


# ---- save / load and construction ----


def test_save_and_load_round_trip(processor, image, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = CheersProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_processor.resolution == processor.image_processor.resolution
    assert (loaded.image_token_id, loaded.null_token_id) == (processor.image_token_id, processor.null_token_id)
    texts = ["<im_start><image><im_end> hi", "hi"]
    before, after = processor(images=[image], text=texts), loaded(images=[image], text=texts)
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    assert after["attention_mask"][1, 0] == 0  # still left-padded


def test_saved_folder_loads_with_remote_code_without_the_package(processor, tmp_path):
    """save_pretrained copies the processor code and its relative imports (prompting.py included)."""
    processor.save_pretrained(tmp_path / "processor")
    assert {"processing_cheers.py", "image_processing_cheers.py", "prompting.py"} <= {
        path.name for path in (tmp_path / "processor").iterdir()
    }
    text = "<im_start><image><im_end> hi"
    expected = processor(images=[PICTURE], text=text)["input_ids"][0].tolist()
    code = (
        "import PIL.Image\n"
        "from transformers import AutoProcessor\n"
        f"processor = AutoProcessor.from_pretrained({str(tmp_path / 'processor')!r}, trust_remote_code=True)\n"
        "assert type(processor).__module__.startswith('transformers_modules.'), type(processor).__module__\n"
        "image = PIL.Image.new('RGB', (40, 30), 'red')\n"
        f"print(processor(images=[image], text={text!r})['input_ids'][0].tolist())\n"
        "try:\n"
        "    processor(images=[image, image], text='<image><image>')\n"
        "except ValueError as error:\n"
        "    print(str(error).split('.')[0])\n"
    )
    run = run_python_without_the_package(code, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    ids, refusal = run.stdout.strip().splitlines()[-2:]
    assert ids == str(expected)
    assert refusal == "Prompt 0 has two image placeholders with nothing between them ('<image><image>')"


def test_official_token_ids(processor):
    ids = [processor.image_token_id, processor.image_gen_token_id, processor.image_start_token_id]
    ids += [processor.image_end_token_id, processor.null_token_id]
    assert ids == list(range(151665, 151670))
    assert processor.tokenizer.convert_tokens_to_ids(list(CHEERS_SPECIAL_TOKENS)) == ids
    assert processor.tokenizer.pad_token_id == 151643 and processor.tokenizer.eos_token_id == 151645
    assert add_cheers_special_tokens(processor.tokenizer) == 0  # already there: nothing added twice
    assert "context_image_mask" in processor.model_input_names


def test_tokenizer_without_cheers_tokens_is_refused(golden, processor):
    bare = Qwen2Tokenizer.from_pretrained(golden.checkpoint)
    with pytest.raises(ValueError, match=r"no '<image>' token.*from_official_checkpoint.*add_cheers_special_tokens"):
        CheersProcessor(processor.image_processor, bare)


# ---- bad inputs ----


@pytest.mark.parametrize(
    "images, text, message",
    [
        ([], "<im_start><image><im_end>", r"contain 1 image placeholder\(s\).*in total, but 0 image\(s\)"),
        ([PICTURE] * 2, "<im_start><image><im_end>", r"contain 1 image placeholder\(s\).*in total, but 2 image\(s\)"),
        (
            PICTURE,
            "no placeholder here",
            r"contain 0 image placeholder\(s\).*in total, but 1 image\(s\).*context_image=",
        ),
        (
            [[PICTURE], []],
            ["x", "<im_start><image><im_end>"],
            r"Prompt 0 contains 0 image placeholder\(s\).*but 1 image",
        ),
        ([[PICTURE]], ["x", "y"], r"Got 1 entries in images but 2 prompts"),
        ([None], "hello", r"images contains None.*context_image=official_dummy_image\(seed\)"),
    ],
)
def test_image_and_placeholder_mismatch(processor, images, text, message):
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


@pytest.mark.parametrize(
    "text, found",
    [
        ("<image><image>", "<image><image>"),
        ("Compare <im_start><image_gen><image><im_end>.", "<image_gen><image>"),
        (["fine", "<im_start><image><im_end> then <image><image_gen>"], "<image><image_gen>"),
    ],
)
def test_adjacent_placeholders_are_refused(processor, text, found):
    """Expanded, two adjacent placeholders are one unbroken run of image tokens: the model would see one image."""
    index = 1 if isinstance(text, list) else 0
    count = sum(sample.count("<image") for sample in ([text] if isinstance(text, str) else text))
    message = rf"Prompt {index} has two image placeholders with nothing between them \('{found}'\).*single image.*"
    message += r"Wrap each image in <im_start>...<im_end>"
    with pytest.raises(ValueError, match=message):
        processor(images=[PICTURE] * count, text=text)


def test_separated_placeholders_are_two_images(processor):
    out = processor(images=[PICTURE] * 2, text="<im_start><image><im_end><im_start><image><im_end>")
    is_image = out["input_ids"][0] == processor.image_token_id
    starts = is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]])
    assert int(is_image.sum()) == 2 * IMAGE_TOKENS and int(starts.sum()) == 2


@pytest.mark.parametrize("text", ["", [], [""], None, ["ok", 3]])
def test_empty_or_invalid_text(processor, text):
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        processor(text=text)


def test_bad_generation_mode_and_context_count(processor):
    with pytest.raises(ValueError, match="generation_mode must be 'text' or 'image', got 'video'"):
        processor(text="hi", generation_mode="video")
    with pytest.raises(ValueError, match="context_image has 1 entries but there are 2 prompts"):
        processor(text=["a", "b"], context_image=[official_dummy_image(0)])


def test_too_long_prompts_are_refused_not_truncated(processor, image):
    text = "<im_start><image><im_end> describe"
    with pytest.raises(ValueError, match=r"Prompt 0 is 19 tokens long.*more than max_length=10.*never truncates"):
        processor(images=[image], text=text, max_length=10)
    with pytest.raises(ValueError, match="does not truncate.*split an image's tokens"):
        processor(images=[image], text=text, truncation=True, max_length=10)


def test_bad_image_inside_a_prompt_batch(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="Could not read the image file .*broken.png"):
        processor(images=[str(broken)], text="<im_start><image><im_end>")
    with pytest.raises(ValueError, match="Unsupported image array shape"):
        processor(images=[np.zeros((7, 7, 7), dtype=np.uint8)], text="<im_start><image><im_end>")
