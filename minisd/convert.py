"""Convert a checkpoint between layouts: a diffusers folder <-> one original-layout (LDM) file.

    python -m minisd.convert sd-v1-4.ckpt weights/sd-v1-4                # single file -> diffusers folder
    python -m minisd.convert nota-ai/bk-sdm-small bk-sdm-small.safetensors  # hub id or folder -> single file
    python -m minisd.convert v2-1_512-ema-pruned.safetensors out --prediction-type epsilon
    python -m minisd.convert weights/my-run/checkpoint-0050000 weights/my-student  # standalone copy

A train.py checkpoint links vae/, text_encoder/, tokenizer/ and scheduler/ to its run folder; the
converted folder holds real copies of them, so it can be moved anywhere.

The destination's suffix picks the layout: .safetensors or .ckpt writes a single file, anything
else a diffusers folder. Both load in minisd and in diffusers.
"""

import argparse
import sys
from pathlib import Path

from minisd.cli import BAD_INPUT, check_writable_folder
from minisd.clip import TEXT_ENCODERS
from minisd.pipeline import DTYPES, load_pipeline
from minisd.table import VARIANTS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minisd.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="hub id, diffusers folder, or .safetensors/.ckpt single file")
    parser.add_argument("dest", help="a .safetensors/.ckpt path (single file) or a folder (diffusers layout)")
    parser.add_argument("--family", choices=sorted(TEXT_ENCODERS),
                        help="single-file source: SD family (default: detected)")
    parser.add_argument("--variant", choices=sorted(VARIANTS),
                        help="single-file source: U-Net variant (default: detected)")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                        help="single-file source: what the U-Net predicts (default: detected as diffusers "
                             "does)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the written weights")
    args = parser.parse_args(argv)
    try:
        dest = Path(args.dest)
        source = Path(args.source).expanduser()
        if source.exists() and (dest.resolve() == source.resolve()
                                or source.resolve() in dest.resolve().parents):
            raise ValueError(f"dest {dest} is the source or inside it: write the converted model somewhere "
                             "else")
        check_writable_folder(dest.resolve().parent, "dest")
        pipe = load_pipeline(args.source, dtype=DTYPES[args.dtype], family=args.family, variant=args.variant,
                             prediction_type=args.prediction_type)
        if dest.suffix in (".safetensors", ".ckpt"):
            pipe.save_single_file(dest)
        else:
            pipe.save(dest)
    except BAD_INPUT as e:
        print(f"minisd.convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dest} ({pipe.unet.config.name}, "
          f"{pipe.scheduler_config.get('prediction_type', 'epsilon')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
