"""Convert an official Cheers checkpoint (model_type "umm") into a native transformers-cheers folder.

    python conversion/convert_cheers_to_hf.py --input /path/to/official/Cheers --output ./cheers-hf --dtype bfloat16

The output loads with `CheersForConditionalGeneration.from_pretrained(OUTPUT)` (and with trust_remote_code for
people without this package). Every official tensor is mapped or deliberately dropped (the unused SigLIP pooling
head; `lm_head.weight`, which must equal the tied token embedding); anything else is an error and nothing is written.
"""

import argparse
import sys

from transformers_cheers.conversion import DTYPES, ConversionError, convert_official_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="official checkpoint folder (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=sorted(DTYPES), help="weight dtype (BN stats stay fp32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        output = convert_official_checkpoint(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
