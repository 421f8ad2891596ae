"""Convert an official Cheers checkpoint (model_type "umm") into a native transformers-cheers folder.

    python conversion/convert_cheers_to_hf.py --input /path/to/official/Cheers --output ./cheers-hf
    python conversion/convert_cheers_to_hf.py --input AI9Stars/Cheers --output ./cheers-hf   # Hub id, when online

The output loads with `CheersForConditionalGeneration.from_pretrained(OUTPUT)` and `CheersPipeline.from_pretrained(
OUTPUT)`; without this package, with `AutoModel`/`AutoProcessor.from_pretrained(OUTPUT, trust_remote_code=True)` and
`DiffusionPipeline.from_pretrained(OUTPUT, trust_remote_code=True)`. Weights are written as safetensors shards
(bfloat16 by default, BatchNorm statistics in float32). Every official tensor is mapped or deliberately dropped
(the unused SigLIP pooling head; `lm_head.weight`, which must equal the tied token embedding); anything else is an
error. The converted folder
is then loaded and its logits and one velocity step compared with the unconverted weights (skip with --no-verify).
Nothing is written unless everything succeeds.

The way back, for a native folder (e.g. fine-tuned, LoRA merged with merge_and_unload, saved with save_pretrained):

    python conversion/convert_cheers_to_hf.py --to-official --input ./cheers-finetuned --output ./cheers-official

writes it in the official layout (model_type "umm", official tensor names, VAE included, official tokenizer and
processor files), which vLLM's Cheers loader and the official code read; the weights keep their dtype.

Exit codes: 0 done, 1 bad input or failed write, 2 bad arguments, 3 verification mismatch, 130 interrupted.
"""

import argparse
import sys

from transformers_cheers.conversion import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPES,
    ConversionError,
    VerificationError,
    convert_official_checkpoint,
)
from transformers_cheers.export_official import export_official_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        required=True,
        help="official checkpoint folder, or a Hub repo id (downloads *.safetensors/json/txt); with --to-official, "
        "a native folder",
    )
    parser.add_argument(
        "--to-official",
        action="store_true",
        help="the way back: write the native folder --input in the official layout (model_type 'umm'), e.g. for vLLM",
    )
    parser.add_argument("--revision", default=None, help="revision of a Hub --input (branch, tag or commit)")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="weight dtype (default bfloat16; BatchNorm statistics stay float32); not with --to-official",
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest safetensors shard, e.g. 2GB or 500MB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the numerical verification")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.to_official:
        # The export keeps the native dtype, always reads its output back, and reads local folders only.
        given = {"--dtype": args.dtype, "--revision": args.revision}
        given["--no-verify"] = None if args.verify else True
        refused = [name for name, value in given.items() if value is not None]
        if refused:
            parser.error(
                f"--to-official does not take {', '.join(refused)}: the export keeps the native dtype, always reads "
                "its output back and takes a local native folder."
            )
    args.dtype = args.dtype or "bfloat16"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.to_official:
            report = export_official_checkpoint(
                args.input, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size
            )
            print(report.format())
            return 0
        report = convert_official_checkpoint(
            args.input,
            args.output,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            verify=args.verify,
            progress=not args.quiet,
            revision=args.revision,
        )
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written (the partial folder was removed).", file=sys.stderr)
        return 130
    except Exception as error:  # e.g. disk full while writing: still nothing left behind
        print(
            f"error: conversion failed: {type(error).__name__}: {error}; nothing was written "
            "(the partial folder was removed).",
            file=sys.stderr,
        )
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
