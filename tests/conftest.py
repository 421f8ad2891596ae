"""Shared test setup: offline hub, the golden fixture folder, tolerance helpers."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GOLDEN_DIR = Path(
    os.environ.get("CHEERS_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "golden")
)


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
    if not (GOLDEN_DIR / "manifest.json").exists():
        message = f"golden fixtures not found at {GOLDEN_DIR} (set CHEERS_GOLDEN_DIR)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return Golden(GOLDEN_DIR)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference
