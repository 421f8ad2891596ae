"""Analytic FLOP count of Cheers text-to-image and understanding prefill, per component (used by `bench_gpu.py`).

Only matrix work is counted (linear layers, convolutions, attention), as `torch.utils.flop_counter.FlopCounterMode`
does: one multiply-add is 2 FLOPs, biases, norms, activations, RoPE and resampling are left out (well under 1%).

    linear over n tokens, in -> out features        2 * n * in * out
    convolution, k x k, c_in -> c_out, H x W out     2 * H * W * c_in * c_out * k^2
    attention, q queries over s keys, width w        4 * q * s * w        (Q K^T and A V; w = heads x head_dim)

Per component, for an image of R x R pixels (SigLIP grid g = R / patch, g^2 patch tokens, g^2 / 4 LLM tokens after
the 2x2 merge; VAE latent at R / 8), B = batch rows in the LLM (2 with guidance: conditional and unconditional
prompts), L = prompt length:

* LLM (Qwen2), per layer: linear over its q, k, v, o and gated-MLP (3 matrices) weights, plus attention of each new
  token over all keys before it and itself, counted as a dense rectangle (SDPA kernels compute padded keys and, for a
  causal prompt, the masked half too; the prompt's share of the total is < 0.1%).
* SigLIP: the 16x16 patch convolution, then per layer q, k, v, o and a 2-matrix MLP, and full attention.
* VAE decoder (decoder projector, final decode) and encoder (understanding): every 3x3 convolution of the diffusers
  `Decoder` / `Encoder` at its own resolution, the 1x1 shortcut, quant and post-quant convolutions, and the mid-block
  single-head attention at R / 8.
* Flow head: time embedder (two 2-layer MLPs, one row each), semantic head (adaLN DiT blocks at the LLM width on the
  merged tokens: q, k, v, o, SwiGLU with 4x width, modulation of the conditioning row, full attention), detail gate
  (two linears), detail head (the same blocks at the SigLIP width on the g^2 patch tokens), each with its final
  modulated projection.

Text-to-image = prompt prefill (B x L tokens) + steps x one velocity evaluation (the decoder projector, SigLIP and the
token merger once per image, shared by both guidance branches; LLM and flow head on B rows of g^2 / 4 tokens after the
L cached prompt tokens) + the final VAE decode. `bench_gpu.py --verify-flops` and `tests/test_bench_gpu.py` compare
the total with what FlopCounterMode counts on a real run.
"""

from transformers_cheers import CheersConfig


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def attention_flops(queries: int, keys: int, width: int) -> int:
    return 4 * queries * keys * width


def conv_flops(height: int, width: int, in_channels: int, out_channels: int, kernel: int) -> int:
    return 2 * height * width * in_channels * out_channels * kernel**2


def qwen2_flops(text_config, rows: int, tokens: int, past: int) -> int:
    """`rows` sequences of `tokens` new tokens after `past` cached ones, through every decoder layer."""
    hidden = text_config.hidden_size
    head_dim = getattr(text_config, "head_dim", None) or hidden // text_config.num_attention_heads
    query_width = text_config.num_attention_heads * head_dim
    kv_width = text_config.num_key_value_heads * head_dim
    n = rows * tokens
    per_layer = (
        linear_flops(n, hidden, query_width)
        + 2 * linear_flops(n, hidden, kv_width)
        + linear_flops(n, query_width, hidden)
        + 3 * linear_flops(n, hidden, text_config.intermediate_size)
        + attention_flops(n, past + tokens, query_width)
    )
    return text_config.num_hidden_layers * per_layer


def siglip_flops(vision_config, images: int, height: int, width: int) -> int:
    hidden, patch = vision_config.hidden_size, vision_config.patch_size
    grid_h, grid_w = height // patch, width // patch
    tokens = grid_h * grid_w
    n = images * tokens
    embedding = images * conv_flops(grid_h, grid_w, vision_config.num_channels, hidden, patch)
    per_layer = (
        4 * linear_flops(n, hidden, hidden)
        + 2 * linear_flops(n, hidden, vision_config.intermediate_size)
        + images * attention_flops(tokens, tokens, hidden)
    )
    return embedding + vision_config.num_hidden_layers * per_layer


def resnet_flops(height: int, width: int, in_channels: int, out_channels: int) -> int:
    shortcut = conv_flops(height, width, in_channels, out_channels, 1) if in_channels != out_channels else 0
    return (
        conv_flops(height, width, in_channels, out_channels, 3)
        + conv_flops(height, width, out_channels, out_channels, 3)
        + shortcut
    )


def vae_mid_block_flops(height: int, width: int, channels: int) -> int:
    """Two resnets around one single-head self-attention over the height x width positions."""
    tokens = height * width
    attention = 4 * linear_flops(tokens, channels, channels) + attention_flops(tokens, tokens, channels)
    return 2 * resnet_flops(height, width, channels, channels) + attention


def vae_decoder_flops(decoder: dict, latent_channels: int, out_channels: int, height: int, width: int) -> int:
    """diffusers `Decoder` (plus the 1x1 post-quant convolution) from latents at (height, width) / 2^(levels-1)."""
    channels = list(reversed(decoder["block_out_channels"]))
    scale = 2 ** (len(channels) - 1)
    h, w = height // scale, width // scale
    total = conv_flops(h, w, latent_channels, latent_channels, 1)  # post_quant_conv
    total += conv_flops(h, w, latent_channels, channels[0], 3)  # conv_in
    total += vae_mid_block_flops(h, w, channels[0])
    previous = channels[0]
    for level, level_channels in enumerate(channels):
        for layer in range(decoder["layers_per_block"] + 1):
            total += resnet_flops(h, w, previous if layer == 0 else level_channels, level_channels)
        previous = level_channels
        if level < len(channels) - 1:  # nearest 2x upsampling, then a 3x3 convolution at the new size
            h, w = 2 * h, 2 * w
            total += conv_flops(h, w, level_channels, level_channels, 3)
    return total + conv_flops(h, w, previous, out_channels, 3)  # conv_out


def vae_encoder_flops(vae: dict, height: int, width: int) -> int:
    """diffusers `Encoder` (plus the 1x1 quant convolution) of an image to the 2 x latent_channels moments."""
    channels, moments = vae["block_out_channels"], 2 * vae["latent_channels"]
    h, w = height, width
    total = conv_flops(h, w, vae["in_channels"], channels[0], 3)  # conv_in
    previous = channels[0]
    for level, level_channels in enumerate(channels):
        for layer in range(vae["layers_per_block"]):
            total += resnet_flops(h, w, previous if layer == 0 else level_channels, level_channels)
        previous = level_channels
        if level < len(channels) - 1:  # 3x3 convolution with stride 2
            h, w = h // 2, w // 2
            total += conv_flops(h, w, level_channels, level_channels, 3)
    total += vae_mid_block_flops(h, w, previous)
    total += conv_flops(h, w, previous, moments, 3)  # conv_out
    return total + conv_flops(h, w, moments, moments, 1)  # quant_conv


def dit_head_flops(
    config: CheersConfig,
    rows: int,
    tokens: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    out_features: int,
) -> int:
    head_dim = hidden // heads
    n = rows * tokens
    per_block = (
        2 * linear_flops(n, hidden, hidden)  # q, o
        + 2 * linear_flops(n, hidden, kv_heads * head_dim)  # k, v
        + 3 * linear_flops(n, hidden, config.head_mlp_ratio * hidden)  # SwiGLU
        + rows * attention_flops(tokens, tokens, hidden)
        + linear_flops(rows, hidden, 6 * hidden)  # adaLN modulation of the one conditioning row
    )
    final = linear_flops(rows, hidden, 2 * hidden) + linear_flops(n, hidden, out_features)
    return layers * per_block + final


def velocity_flops(config: CheersConfig, resolution: int, images: int, branches: int, past: int) -> dict[str, int]:
    """One `compute_velocity` call: `images` latents, `branches` prompts each (2 with guidance) cached `past` long."""
    text, vision = config.text_config, config.vision_config
    grid = resolution // vision.patch_size
    patch_tokens, merged_tokens = grid * grid, grid * grid // config.token_merge_size**2
    merged_width = vision.hidden_size * config.token_merge_size**2
    rows = images * branches
    projector = config.decoder_projector_config
    return {
        "decoder projector": images
        * vae_decoder_flops(projector, projector["latent_channels"], projector["out_channels"], resolution, resolution),
        "SigLIP": siglip_flops(vision, images, resolution, resolution),
        "token merger": linear_flops(images * merged_tokens, merged_width, merged_width)
        + linear_flops(images * merged_tokens, merged_width, text.hidden_size),
        "LLM": qwen2_flops(text, rows, merged_tokens, past),
        "flow head": linear_flops(rows, config.time_embedding_dim, text.hidden_size)
        + linear_flops(rows, text.hidden_size, text.hidden_size)
        + linear_flops(rows, config.time_embedding_dim, vision.hidden_size)
        + linear_flops(rows, vision.hidden_size, vision.hidden_size)
        + dit_head_flops(
            config, rows, merged_tokens, text.hidden_size, config.semantic_head_num_layers,
            config.semantic_head_num_attention_heads, config.semantic_head_num_key_value_heads, merged_width,
        )
        + linear_flops(rows * patch_tokens, vision.hidden_size, vision.hidden_size)
        + linear_flops(rows * patch_tokens, vision.hidden_size, 1)  # detail gate
        + dit_head_flops(
            config, rows, patch_tokens, vision.hidden_size, config.detail_head_num_layers,
            config.detail_head_num_attention_heads, config.detail_head_num_key_value_heads, config.latent_channels,
        ),
    }  # fmt: skip


def text_to_image_flops(
    config: CheersConfig, resolution: int, steps: int, guided: bool, prompt_length: int, images: int = 1
) -> dict[str, int]:
    """FLOPs of one `CheersPipeline` call, by component (the keys of `velocity_flops`, times `steps`, plus
    "prompt prefill" and "final VAE decode")."""
    branches = 2 if guided else 1
    per_step = velocity_flops(config, resolution, images, branches, prompt_length)
    vae = config.vae_config
    decoder = {**vae, "block_out_channels": vae.get("decoder_block_out_channels") or vae["block_out_channels"]}
    return {
        "prompt prefill": qwen2_flops(config.text_config, images * branches, prompt_length, 0),
        **{name: steps * flops for name, flops in per_step.items()},
        "final VAE decode": images
        * vae_decoder_flops(decoder, vae["latent_channels"], vae["out_channels"], resolution, resolution),
    }


def prefill_flops(config: CheersConfig, resolution: int, sequence_length: int) -> dict[str, int]:
    """FLOPs of an understanding prefill: one clean image (VAE encoder, then the vision tokenizer) in a prompt of
    `sequence_length` tokens (image tokens included), logits for the last position only."""
    tokenizer = velocity_flops(config, resolution, images=1, branches=1, past=0)
    text = config.text_config
    return {
        "VAE encoder": vae_encoder_flops(config.vae_config, resolution, resolution),
        "decoder projector": tokenizer["decoder projector"],
        "SigLIP": tokenizer["SigLIP"],
        "token merger": tokenizer["token merger"],
        "LLM": qwen2_flops(text, 1, sequence_length, 0),
        "LM head": linear_flops(1, text.hidden_size, text.vocab_size),
    }


__all__ = ["prefill_flops", "text_to_image_flops", "velocity_flops"]
