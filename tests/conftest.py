"""Shared test setup: offline hub, the golden fixture folder, tolerance helpers."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The fixtures recorded with the official implementation travel with the repository (tests/fixtures/golden, see its
# README.md); CHEERS_GOLDEN_DIR points the suite at another copy, e.g. a freshly recorded set.
GOLDEN_DIR = Path(os.environ.get("CHEERS_GOLDEN_DIR", Path(__file__).resolve().parent / "fixtures" / "golden"))


class Golden:
    """Read access to the fixtures recorded with the official implementation."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest = json.loads((root / "manifest.json").read_text())
        self.checkpoint = root / "checkpoint"

    def inputs(self, case: str) -> dict[str, torch.Tensor]:
        return load_file(self.root / "cases" / f"{case}.inputs.safetensors")

    def outputs(self, case: str, precision: str) -> dict[str, torch.Tensor]:
        return load_file(self.root / "cases" / f"{case}.{precision}.safetensors")

    def case_info(self, case: str, precision: str) -> dict:
        return self.manifest["cases"][case]["runs"][precision]["info"]

    def bf16_tolerance(self, case: str, tensor: str) -> float:
        return self.manifest["cases"][case]["bf16_recommended_rel_l2"][tensor]


@pytest.fixture(scope="session")
def golden() -> Golden:
    # A missing folder is a broken checkout or a wrong CHEERS_GOLDEN_DIR: fail, so parity never goes untested.
    if not (GOLDEN_DIR / "manifest.json").is_file():
        pytest.fail(
            f"golden fixtures not found at {GOLDEN_DIR}: they ship in tests/fixtures/golden (restore them with "
            "`git checkout -- tests/fixtures/golden`), or set CHEERS_GOLDEN_DIR to a folder holding manifest.json."
        )
    return Golden(GOLDEN_DIR)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="session")
def golden_models(golden):
    """The golden tiny checkpoint loaded natively from its official layout, per precision (loaded once)."""
    from transformers_cheers.official_checkpoint import load_official_checkpoint

    cache = {}

    def get(precision: str):
        if precision not in cache:
            cache[precision] = load_official_checkpoint(golden.checkpoint, dtype=PRECISIONS[precision])
        return cache[precision]

    return get


def assert_close_rel_l2(actual, expected, tolerance: float, name: str = "tensor"):
    error = rel_l2(actual, expected)
    assert error <= tolerance, f"{name}: relative L2 error {error:.3e} > tolerance {tolerance:.1e}"
    return error


FP32_SINGLE_PASS_TOLERANCE = 1e-4  # fixture README: fp32 single-pass tensors
FP32_CHAIN_TOLERANCE = 1e-3  # fixture README: fp32 multi-step T2I chain


def tolerance_for(golden, case: str, tensor: str, precision: str, chain: bool = False) -> float:
    if precision == "bf16":
        return golden.bf16_tolerance(case, tensor)
    return FP32_CHAIN_TOLERANCE if chain else FP32_SINGLE_PASS_TOLERANCE


def expand_official_ids(input_ids, attention_mask, tokens_per_image: int, image_token_id: int, context: bool):
    """Official ids (one -200 sentinel per image, dummy prefix added inside the model) -> our expanded form.

    Returns (input_ids, attention_mask, context_image_mask) as (1, L) tensors.
    """
    ids, mask, context_mask = [], [], []
    if context:
        ids += [image_token_id] * tokens_per_image
        mask += [1] * tokens_per_image
        context_mask += [True] * tokens_per_image
    for token, attend in zip(input_ids.tolist(), attention_mask.tolist()):
        count = tokens_per_image if token == -200 else 1
        ids += [image_token_id if token == -200 else token] * count
        mask += [attend] * count
        context_mask += [False] * count
    return torch.tensor([ids]), torch.tensor([mask]), torch.tensor([context_mask])


# understanding case -> whether the official run prefixed the dummy context image
UNDERSTANDING_CONTEXT = {"case2_understanding": False, "case3_text_only": True}


def understanding_inputs(golden, config, case: str) -> dict[str, torch.Tensor]:
    """Model inputs of a recorded understanding case, in our expanded form (image placeholders, context mask)."""
    inputs = golden.inputs(case)
    context = UNDERSTANDING_CONTEXT[case]
    ids, mask, context_mask = expand_official_ids(
        inputs["inputs/input_ids"][0],
        inputs["inputs/attention_mask"][0],
        config.num_image_tokens,
        config.image_token_id,
        context=context,
    )
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": inputs["inputs/pixel_values"],
        "context_image_mask": context_mask if context else None,
    }


@torch.no_grad()
def official_t2i_final_latents(golden, model, case: str, precision: str = "fp32") -> torch.Tensor:
    """`CheersPipeline` run as the official text-to-image `case` ran: its prompt, settings, dummy context image and
    recorded initial noise (of `precision`'s run). Returns the final latents."""
    from transformers_cheers import CheersFlowMatchScheduler, CheersPipeline, CheersProcessor
    from transformers_cheers.processing_cheers import official_dummy_image

    info = golden.case_info(case, precision)
    settings = info["generate"]["kwargs"]
    user_prompt = info["prompt_text"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    pipeline = CheersPipeline(
        model=model,
        processor=CheersProcessor.from_official_checkpoint(golden.checkpoint),
        scheduler=CheersFlowMatchScheduler(time_shift=settings["alpha"]),
    )
    pipeline.set_progress_bar_config(disable=True)
    size = golden.inputs(case)["inputs/pixel_values"].shape[-1]
    return pipeline(
        user_prompt,
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["cfg_scale"] or 1.0,
        latents=golden.outputs(case, precision)["z0"],
        context_image=official_dummy_image(info["numpy_seed"]),
        height=size,
        width=size,
        output_type="latent",
    ).images


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model runs thousands of tiny ops per step: with two intra-op threads on a busy 2-core machine every
    op waits for a descheduled thread (runs got 5-25x slower), with one it does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_python_without_the_package(code: str, cwd) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import transformers_cheers` fails (as for a remote-code user)."""
    blocked = "import sys\nsys.modules['transformers_cheers'] = None  # importing our package would fail\n"
    return subprocess.run(
        [sys.executable, "-c", blocked + code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_cpu_processes(script: Path, *args) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 SCRIPT --cpu ARGS`: two torchrun processes of one thread
    each, DDP over gloo, offline. `python -m` works in any environment, also where the `accelerate` script is not
    next to the interpreter. Fails the test with the end of stderr when the launch fails."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), "--cpu", *map(str, args),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_script(path: Path):
    """A script of the repository (examples/, benchmarks/, conversion/) imported as a module, by file path."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_hub_snapshot(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """Lay `folder` out in `cache_dir` as the Hub cache holds a download of `repo_id` (refs/main -> `commit`, whose
    snapshot links to the files), so that the Hub id resolves offline through huggingface_hub itself, exactly as
    after a real download. Returns the commit."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in Path(folder).iterdir():
        (snapshot / path.name).symlink_to(path.resolve())
    return commit
