"""Import the official modeling code (transformers 4.51.3) for the side-by-side benchmarks.

Kept free of transformers_cheers imports, like `transformers_cheers_bench_presets`: it runs in the official-side
process.

Measurement only: the official file casts two activations to bfloat16 whatever the model's dtype (the understanding
projector's input and the noisy latent before the decoder projector). A float32 official model therefore fails with a
dtype mismatch on its first forward. To time the official code in float32, the benchmark's private copy of the file
has exactly those casts follow the requested dtype; nothing else in the official computation changes, and in bfloat16
the copy is left as it is.
"""

import importlib
import shutil
import sys
import tempfile
import types
from pathlib import Path


HARD_CODED_CAST = ".to(torch.bfloat16)"
HARD_CODED_CASTS = 2  # modeling_umm.py: UMMProjector.forward and Cheers.get_image_features


def stub_unused_imports() -> None:
    """Packages the official modeling file imports at the top but never uses on the paths we time."""
    for unused in ("black", "matplotlib", "matplotlib.pyplot", "torchvision", "torchvision.utils"):
        module = types.ModuleType(unused)
        module.Mode = module.grid = module.save_image = None
        sys.modules.setdefault(unused, module)


def cast_to(source: str, dtype_name: str) -> str:
    """The official source with its hard-coded bfloat16 activation casts made to cast to `dtype_name` instead."""
    found = source.count(HARD_CODED_CAST)
    if found != HARD_CODED_CASTS:
        raise RuntimeError(
            f"Expected {HARD_CODED_CASTS} hard-coded `{HARD_CODED_CAST}` casts in the official modeling_umm.py, "
            f"found {found}: this is a different version of the official code. Check its casts and update "
            "HARD_CODED_CASTS in benchmarks/official_code.py, or run the official side in bfloat16."
        )
    return source.replace(HARD_CODED_CAST, f".to(torch.{dtype_name})")


def import_official(code_dir: str, dtype_name: str = "bfloat16", work: str | Path | None = None):
    """(configuration_umm, modeling_umm) imported from a private copy of `code_dir` (weights and configs left out)."""
    import transformers.modeling_utils  # noqa: F401  (before the stubs: it probes which packages exist)

    stub_unused_imports()
    package = Path(work or tempfile.mkdtemp()) / "official_cheers"
    shutil.copytree(code_dir, package, ignore=shutil.ignore_patterns("*.safetensors", "*.json", "*.txt"))
    (package / "__init__.py").write_text("")
    if dtype_name != "bfloat16":
        modeling_file = package / "modeling_umm.py"
        modeling_file.write_text(cast_to(modeling_file.read_text(), dtype_name))
    sys.path.insert(0, str(package.parent))
    configuration = importlib.import_module("official_cheers.configuration_umm")
    modeling = importlib.import_module("official_cheers.modeling_umm")
    return configuration, modeling
