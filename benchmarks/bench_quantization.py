"""int8 weight-only quantization (torchao, through transformers' TorchAoConfig): memory saved and drift caused.

    python benchmarks/bench_quantization.py                 # golden fixtures + bench-mid, fp32 reference, on CPU

Drift is measured on the golden fixtures (the tiny official checkpoint in tests/fixtures/golden): the relative L2
distance to the fp32 model of (a) the logits of case2 (an image and a question), (b) the final latent of case4a
(text-to-image with guidance, from the recorded initial noise). bf16 is shown beside int8 for scale. Memory is the
bytes of the weights (int8 data + scales for quantized ones): measured on the golden and bench-mid models, and
computed for the full-size model from its parameter counts. Decode speed is bench-mid greedy decoding, median of
`--repeats` runs, on this machine's CPU.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_description


ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
sys.path.insert(0, str(ROOT / "tests"))  # the fixture readers of the test suite (conftest.Golden, id expansion)


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def load_variants(folder: Path) -> dict:
    from transformers_cheers import CheersForConditionalGeneration
    from transformers_cheers.quantization import int8_weight_only_config

    return {
        "fp32": CheersForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(),
        "bf16": CheersForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval(),
        "int8 (fp32 act.)": CheersForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, quantization_config=int8_weight_only_config()
        ).eval(),
    }


@torch.no_grad()
def case2_logits(golden, model) -> torch.Tensor:
    from conftest import understanding_inputs

    inputs = understanding_inputs(golden, model.config, "case2_understanding")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return model(**inputs).logits.float()


def case4a_final_latent(golden, model) -> torch.Tensor:
    from conftest import official_t2i_final_latents

    return official_t2i_final_latents(golden, model, "case4a_t2i_cfg").float()


def golden_rows() -> list[dict]:
    from conftest import Golden

    from transformers_cheers.official_checkpoint import load_official_checkpoint

    golden = Golden(GOLDEN)
    with tempfile.TemporaryDirectory() as folder:
        load_official_checkpoint(golden.checkpoint, dtype=torch.float32).save_pretrained(folder)
        models = load_variants(Path(folder))
    logits = {name: case2_logits(golden, model) for name, model in models.items()}
    latents = {name: case4a_final_latent(golden, model) for name, model in models.items()}
    return [
        {
            "model": "golden (tiny official)",
            "variant": name,
            "weights MB": weight_megabytes(model),
            "case2 logits rel L2": relative_l2(logits[name], logits["fp32"]),
            "case4a final latent rel L2": relative_l2(latents[name], latents["fp32"]),
        }
        for name, model in models.items()
    ]


def weight_megabytes(model) -> float:
    from transformers_cheers.quantization import weight_bytes

    return weight_bytes(model) / 1e6


def bench_mid_rows(repeats: int, tokens: int) -> list[dict]:
    from transformers_cheers import CheersForConditionalGeneration
    from transformers_cheers.presets import preset_config

    config = preset_config("bench-mid")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        reference = CheersForConditionalGeneration(config).eval()
        reference.generation_config.eos_token_id = None  # random weights: always decode `tokens` tokens
        reference.save_pretrained(folder)
        models = load_variants(Path(folder))
    size = config.vision_config.image_size
    image = torch.full((config.num_image_tokens,), config.image_token_id)
    text = torch.arange(100, 132)
    ids = torch.cat(
        [torch.tensor([config.image_start_token_id]), image, torch.tensor([config.image_end_token_id]), text]
    )
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=generator)
    rows = []
    for name, model in models.items():
        model.generation_config.eos_token_id = None
        inputs = {"input_ids": ids[None], "pixel_values": pixels.to(model.dtype)}
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "model": "bench-mid (random)",
                "variant": name,
                "weights MB": weight_megabytes(model),
                f"generate {tokens} tokens s (median)": statistics.median(times),
            }
        )
    return rows


def full_size_rows() -> list[dict]:
    """Weights of the full-size model, from its parameter counts (built on the meta device: nothing allocated);
    int8 weights counted at one byte per parameter (the per-channel scales add about 0.1%)."""
    from transformers_cheers import CheersForConditionalGeneration
    from transformers_cheers.presets import PRESETS, preset_config
    from transformers_cheers.quantization import NOT_QUANTIZED

    if "full" not in PRESETS:
        return []
    with torch.device("meta"):
        model = CheersForConditionalGeneration(preset_config("full"))
    linear, other = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(
            name == prefix or name.startswith(prefix + ".") for prefix in NOT_QUANTIZED
        ):
            linear += module.weight.numel()
    total = sum(parameter.numel() for parameter in model.parameters())
    other = total - linear
    return [
        {"model": "full size (computed)", "variant": "bf16", "weights MB": 2 * total / 1e6},
        {"model": "full size (computed)", "variant": "int8 (bf16 act.)", "weights MB": (linear + 2 * other) / 1e6},
    ]


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [format_cell(row.get(column, "")) for column in columns]
        print("| " + " | ".join(cells) + " |")


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"
    return str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--skip-speed", action="store_true", help="golden drift and memory only")
    args = parser.parse_args()
    print(f"# int8 weight-only quantization; {machine_description()}")
    rows = golden_rows() + full_size_rows()
    if not args.skip_speed:
        rows += bench_mid_rows(args.repeats, args.tokens)
    print_table(rows)


if __name__ == "__main__":
    main()
