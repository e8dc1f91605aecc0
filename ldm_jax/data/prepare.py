"""Prepare a dataset offline: python -m ldm_jax.data.prepare NAME --data_dir DIR [--option key=value ...]

e.g. `python -m ldm_jax.data.prepare shapes --data_dir ~/.cache/ldm_jax/datasets --option image_size=64`.
Options are the builder's config fields (shapes: image_size, train_size, test_size, heldout_size, seed;
image_folder: folder, image_size, test_fraction, seed). Bad input (an unknown option, a value out of
range, a folder with no readable captioned image) is one `error:` line and exit status 1.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys

from ldm_jax.data import builder


def parse_options(pairs) -> dict:
    """["image_size=64", "folder=/x"] -> {"image_size": 64, "folder": "/x"} (Python literals where they parse)."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option wants key=value, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def main(argv=None):
    """Parse `argv` and prepare the dataset; raises ValueError / FileNotFoundError for bad input."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"one of {', '.join(builder.BUILDERS)}, or a TFDS dataset name")
    parser.add_argument("--data_dir", default="~/.cache/ldm_jax/datasets")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="builder option (repeatable)")
    args = parser.parse_args(argv)
    prepared = builder.prepare(args.name, os.path.expanduser(args.data_dir), **parse_options(args.option))
    splits = {name: split.num_examples for name, split in prepared.info.splits.items()}
    print(f"{args.name}: {prepared.data_dir} {splits}")


def command_line(argv=None) -> int:
    """`main` as a command: bad input is one `error:` line on stderr and exit status 1."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"ldm_jax.data.prepare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(command_line())
