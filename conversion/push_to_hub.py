"""Upload a converted Cheers folder to the Hugging Face Hub as one commit, with a generated model card.

    python conversion/push_to_hub.py --folder ./cheers-hf --repo-id you/Cheers-hf [--private] [--revision BRANCH]
        [--create-pr] [--commit-message "..."] [--base-model AI9Stars/Cheers] [--large-folder]

The repo is created if needed. All files of the folder (safetensors shards and index, configs, code files, processor
files) plus README.md (model card: usage with transformers, trust_remote_code, diffusers and LoRA; Apache-2.0; the
paper's citation) go in ONE commit; huggingface_hub uploads the large files first through Xet (or LFS), which are
content-addressed, so re-running an interrupted push re-sends only what is missing. --large-folder switches to
huggingface_hub's pipelined upload (several commits for very large folders). Log in first (`hf auth login`) or set
HF_TOKEN. Exit codes: 0 done, 1 error, 2 bad arguments.
"""

import argparse
import sys

from transformers_cheers.conversion import ConversionError, push_to_hub


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="a folder written by convert_cheers_to_hf.py")
    parser.add_argument("--repo-id", required=True, help="namespace/name of the model repo")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--base-model", default=None, help="Hub id of the official checkpoint, for the card")
    parser.add_argument("--pipeline-repo-id", default=None, help="Hub id of the diffusers pipeline repo, for the card")
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
            pipeline_repo_id=args.pipeline_repo_id,
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
