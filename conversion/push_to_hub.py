"""Upload a converted Cheers folder to the Hugging Face Hub as one commit, with a generated model card.

    python conversion/push_to_hub.py --folder ./cheers-hf --repo-id you/Cheers-hf [--private] [--revision BRANCH]
        [--create-pr] [--commit-message "..."] [--base-model AI9Stars/Cheers] [--large-folder]

The repo is created if needed. All files of the folder (safetensors shards and index, configs, code files, processor
files) plus README.md (model card: what the converter checked, usage with transformers, trust_remote_code, diffusers
and LoRA; Apache-2.0; the paper's citation) go in ONE commit; huggingface_hub uploads the large files first through
Xet (or LFS), which are content-addressed, so re-running an interrupted push re-sends only what is missing.
--large-folder switches to huggingface_hub's pipelined upload (several commits for very large folders). Log in first
(`hf auth login`) or set HF_TOKEN. Exit codes: 0 done, 1 error, 2 bad arguments.

The functions (`push_to_hub`, `model_card`, `hub_operations`) live here, not in the package: only this script uses
them. Import them with importlib from this file's path.
"""

import argparse
import json
import sys
from pathlib import Path

from transformers_cheers.conversion import ConversionError


PAPER = "https://arxiv.org/abs/2603.12793"
CITATION = """@article{cheers2026,
  title   = {Cheers},
  journal = {arXiv preprint arXiv:2603.12793},
  year    = {2026},
  url     = {https://arxiv.org/abs/2603.12793}
}"""


def folder_summary(folder: Path) -> dict:
    """Facts about a converted folder for the model card (dtype, shards, size, what it contains)."""
    config = json.loads((folder / "config.json").read_text())
    shards = sorted(path.name for path in folder.glob("*.safetensors"))
    return {
        "dtype": config.get("dtype") or config.get("torch_dtype") or "unknown",
        "shards": shards,
        "size_gb": sum((folder / shard).stat().st_size for shard in shards) / 1e9,
        "resolution": config.get("vision_config", {}).get("image_size"),
        "processor": (folder / "processor_config.json").is_file(),
        "code_files": sorted(path.name for path in folder.glob("*.py")),
    }


def model_card(repo_id: str, folder, base_model: str | None = None) -> str:
    """README.md for a converted folder: metadata (Apache-2.0), the four ways to use it, the citation."""
    from huggingface_hub import ModelCardData

    facts = folder_summary(Path(folder))
    data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="any-to-any",
        base_model=base_model,
        tags=[
            "cheers",
            "multimodal",
            "image-text-to-text",
            "text-to-image",
            "image-editing",
            "custom_code",
            "diffusers",
        ],
    )
    return f"""---
{data.to_yaml()}
---

# Cheers ({facts["dtype"]}, transformers-native)

[Cheers]({PAPER}) is a unified multimodal model: one language model (Qwen2) reads images through a unified vision
tokenizer (FLUX.2 VAE + SigLIP) and generates images with a cascaded flow-matching head. This repository holds the
official weights converted with transformers-cheers' `conversion/convert_cheers_to_hf.py`
{f"from [{base_model}](https://huggingface.co/{base_model}) " if base_model else ""}to the Hugging Face-native
layout: {len(facts["shards"])} safetensors shard(s), {facts["size_gb"]:.2f} GB, {facts["dtype"]} weights with the
VAE BatchNorm statistics in float32, the language-model head tied to the token embedding, the unused SigLIP pooling
head dropped.

What the converter checked: every tensor here is bit-identical to the official file's after renaming (and the cast
to {facts["dtype"]}); and this folder, loaded with `from_pretrained`, gives the same logits and flow-head velocities,
within a stated floating-point tolerance, as the same weights loaded from the official layout by transformers-cheers.
That is a check of the conversion, not a comparison with the official code: how transformers-cheers matches the
official implementation is recorded separately, by its tests against fixtures recorded with the official code.

## With the `transformers_cheers` package

```python
import torch
from PIL import Image
from transformers_cheers import CheersForConditionalGeneration, CheersProcessor

model = CheersForConditionalGeneration.from_pretrained("{repo_id}", dtype=torch.bfloat16, device_map="auto")
processor = CheersProcessor.from_pretrained("{repo_id}")

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe this image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("photo.jpg")], text=prompt).to(model.device)
output = model.generate(**inputs, max_new_tokens=128)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Without it: `trust_remote_code`

The model, processor and image-processor code files ({", ".join(facts["code_files"])}) travel with the weights;
they import only transformers, diffusers, torch, PIL and numpy.

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
```

## Text-to-image with diffusers

This repository is also a diffusers pipeline (`model_index.json`; the components load from the root, so the
weights are stored once).

```python
import torch
from transformers_cheers import CheersPipeline

pipe = CheersPipeline.from_pretrained("{repo_id}", dtype=torch.bfloat16).to("cuda")
image = pipe("A red apple on a wooden table.", generator=torch.manual_seed(0)).images[0]
edited = pipe("Make the apple green.", image=image).images[0]

# or, without the package:
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True, dtype=torch.bfloat16)
```

## Fine-tuning with LoRA (PEFT)

```python
from peft import PeftModel
from transformers_cheers.lora import apply_lora  # presets: "llm", "llm_heads", "heads"

model = apply_lora(model, "llm_heads", r=16)   # LLM + flow heads; SigLIP and the VAE stay frozen
# ... train (see examples/train_lora.py), then model.save_pretrained("cheers-lora")
tuned = PeftModel.from_pretrained(CheersForConditionalGeneration.from_pretrained("{repo_id}"), "cheers-lora")
merged = tuned.merge_and_unload()
```

Without the package, any `peft.LoraConfig` works on the remote-code model, e.g.
`LoraConfig(r=16, target_modules=r".*language_model.*\\.(q_proj|k_proj|v_proj|o_proj)")`.

## License and citation

Apache-2.0, as the official release. If you use Cheers, please cite the paper ([arXiv 2603.12793]({PAPER})):

```bibtex
{CITATION}
```
"""


def hub_operations(folder: Path, card: str) -> list:
    """One CommitOperationAdd per file of `folder` (hidden files skipped) plus the generated README.md."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            if relative != "README.md":
                operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path)))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    return operations


def push_to_hub(
    folder,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    base_model: str | None = None,
    card: str | None = None,
    token: str | None = None,
    large_folder: bool = False,
    api=None,
):
    """Upload a converted folder (+ a generated model card) to the Hub as ONE commit; returns the CommitInfo.

    Creates the repo if needed (`private`), and the branch `revision` if it does not exist (unless `create_pr`, which
    opens a pull request against `revision` instead). huggingface_hub uploads the large files through Xet (or LFS)
    before the commit is created; they are content-addressed, so re-running after an interruption re-sends only
    what the Hub does not have yet. `large_folder=True` uses `HfApi.upload_folder`'s pipelined upload instead
    (several commits for very large folders; resumable by re-running).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ConversionError(f"{folder} is not a converted Cheers folder (no config.json / safetensors).")
    if json.loads((folder / "config.json").read_text()).get("model_type") != "cheers":
        raise ConversionError(f"{folder}/config.json is not a native Cheers config (model_type 'cheers').")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise ConversionError(f"{folder} contains pickled weights; only safetensors are uploaded.")
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
    card = card if card is not None else model_card(repo_id, folder, base_model)
    message = commit_message or "Upload Cheers (converted with transformers-cheers)"
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    if large_folder:
        if create_pr:
            raise ConversionError("--large-folder cannot open a pull request; push to a branch (--revision).")
        (folder / "README.md").write_text(card)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=[".*", "**/.*"],
        )
    return api.create_commit(
        repo_id,
        hub_operations(folder, card),
        commit_message=message,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="a folder written by convert_cheers_to_hf.py")
    parser.add_argument("--repo-id", required=True, help="namespace/name of the model repo")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--base-model", default=None, help="Hub id of the official checkpoint, for the card")
    parser.add_argument("--large-folder", action="store_true", help="pipelined multi-commit upload")
    parser.add_argument("--token", default=None, help="Hub token (default: the saved login / HF_TOKEN)")
    args = parser.parse_args(argv)
    try:
        info = push_to_hub(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            base_model=args.base_model,
            token=args.token,
            large_folder=args.large_folder,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # HTTP errors (auth, permissions, ...) from huggingface_hub
        print(f"error: push failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"pushed: {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
