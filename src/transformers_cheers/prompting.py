"""Cheers prompt conventions in one place: token strings, the chat format, image placeholders and the
unconditional (classifier-free guidance) prompt.

`CheersProcessor` (inference), `CheersTrainingCollator` (training) and the tests all use these, so the text the model
is fine-tuned on and the text it is prompted with at inference are built by the same code.
"""

import re

import torch


# The official code adds these in this order; on the official Qwen2 vocabulary they get ids 151665..151669.
IMAGE_TOKEN = "<image>"  # an image the model reads (letterboxed)
IMAGE_GEN_TOKEN = "<image_gen>"  # an image the model is trained to generate (centre-cropped)
IMAGE_START_TOKEN = "<im_start>"  # opens every image; the model emits it to start generating one
IMAGE_END_TOKEN = "<im_end>"  # closes every image
NULL_TOKEN = "<no_mean>"  # replaces the text of the unconditional CFG prompt
CHEERS_SPECIAL_TOKENS = (IMAGE_TOKEN, IMAGE_GEN_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, NULL_TOKEN)
IMAGE_PLACEHOLDERS = (IMAGE_TOKEN, IMAGE_GEN_TOKEN)

# Qwen2 ChatML turn markers (already in the Qwen2 vocabulary).
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# How an image item of a chat message is written: the official understanding layout.
IMAGE_ITEM_TEXT = f"{IMAGE_START_TOKEN}{IMAGE_TOKEN}{IMAGE_END_TOKEN}\n"


def render_turn(role: str, content: str) -> str:
    """One ChatML turn: `<|im_start|>{role}\\n{content}<|im_end|>\\n`."""
    return f"{TURN_START}{role}\n{content}{TURN_END}\n"


def generation_prompt() -> str:
    """What `add_generation_prompt=True` appends: the header of the assistant's turn."""
    return f"{TURN_START}assistant\n"


# Qwen2 ChatML as in the official tokenizer_config, plus list content: an image item renders as IMAGE_ITEM_TEXT.
# Literal text sits in {{ }} so Jinja's trim_blocks cannot eat newlines. `render_chat` is its Python twin.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '" + render_turn("system", DEFAULT_SYSTEM_PROMPT) + "' }}"
    "{% endif %}"
    "{{ '" + TURN_START + "' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '" + IMAGE_ITEM_TEXT + "' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% else %}{{ raise_exception('Cheers messages hold only image and text items, got ' + item['type']) }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '" + TURN_END + "\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + generation_prompt() + "' }}{% endif %}"
)


def render_chat(
    messages: list[dict], add_generation_prompt: bool = False, system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> str:
    """
    `CHAT_TEMPLATE` in Python for messages whose content is a string (`[{"role": ..., "content": str}]`): the
    system prompt first unless the first message is a system message, then one ChatML turn per message.
    """
    text = "" if messages and messages[0]["role"] == "system" else render_turn("system", system_prompt)
    text += "".join(render_turn(message["role"], message["content"]) for message in messages)
    return text + (generation_prompt() if add_generation_prompt else "")


def render_training_conversation(conversations: list[dict], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """
    The official training text of a conversation (`[{"from": "user" | "assistant", "value": str}]`): the chat format
    above with the system prompt always first and every turn's text stripped, as the official `RAEQwenTemplate`.
    """
    messages = [{"role": "system", "content": system_prompt}]
    messages += [{"role": turn["from"], "content": turn["value"].strip()} for turn in conversations]
    return render_chat(messages)


def placeholder_pattern(image_token: str = IMAGE_TOKEN, image_gen_token: str = IMAGE_GEN_TOKEN) -> re.Pattern:
    """Matches either image placeholder."""
    return re.compile(f"{re.escape(image_gen_token)}|{re.escape(image_token)}")


def adjacent_placeholder_pattern(image_token: str = IMAGE_TOKEN, image_gen_token: str = IMAGE_GEN_TOKEN) -> re.Pattern:
    """Matches two placeholders with nothing between them (the first one, followed by the second)."""
    either = f"(?:{re.escape(image_gen_token)}|{re.escape(image_token)})"
    return re.compile(f"{either}{either}")


def find_placeholders(text: str, pattern: re.Pattern | None = None) -> list[str]:
    """The image placeholders of `text`, in order."""
    return (pattern or placeholder_pattern()).findall(text)


def adjacent_placeholders_message(where: str, found: str) -> str:
    """The error for two placeholders with nothing between them; `where` names the prompt or sample."""
    return (
        f"{where} has two image placeholders with nothing between them ({found!r}). Expanded, their tokens form one "
        "unbroken run that the model reads as a single image (bidirectional attention across both), so the images "
        f"could not be told apart. Wrap each image in {IMAGE_START_TOKEN}...{IMAGE_END_TOKEN}, e.g. "
        f"'{IMAGE_START_TOKEN}{IMAGE_TOKEN}{IMAGE_END_TOKEN}{IMAGE_START_TOKEN}{IMAGE_TOKEN}{IMAGE_END_TOKEN}' "
        "(apply_chat_template does this for every {'type': 'image'} item)."
    )


def unconditional_input_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, kept_token_ids, null_token_id: int
) -> torch.Tensor:
    """
    The official unconditional prompt: every attended token becomes `null_token_id` (`<no_mean>`) except
    `kept_token_ids` (the image tokens and `<im_start>` / `<im_end>`, so images stay in place); padding stays padding.
    Used for the CFG branch at inference and for guidance dropout in training.
    """
    input_ids = torch.as_tensor(input_ids)
    kept = torch.as_tensor(list(kept_token_ids), device=input_ids.device)
    keep = torch.isin(input_ids, kept) | (torch.as_tensor(attention_mask, device=input_ids.device) == 0)
    return torch.where(keep, input_ids, torch.full_like(input_ids, null_token_id))


__all__ = [
    "CHAT_TEMPLATE",
    "CHEERS_SPECIAL_TOKENS",
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_END_TOKEN",
    "IMAGE_GEN_TOKEN",
    "IMAGE_ITEM_TEXT",
    "IMAGE_PLACEHOLDERS",
    "IMAGE_START_TOKEN",
    "IMAGE_TOKEN",
    "NULL_TOKEN",
    "TURN_END",
    "TURN_START",
    "adjacent_placeholder_pattern",
    "find_placeholders",
    "render_chat",
    "render_training_conversation",
    "render_turn",
    "unconditional_input_ids",
]
