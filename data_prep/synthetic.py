"""Write procedural fundus photographs in the real on-disk layout of a public dataset.

``python -m data_prep synthetic --layout {idrid,eyepacs,ddr,messidor} --out RAW [--size N]
[--seed N] [--count-scale F] [--label-noise P] [--records DIR]``

``RAW`` is then a dataset root exactly like a download (see ``drkeras.data.synthetic``), so
``python -m data_prep <layout> --src RAW --out RECORDS`` converts it; ``--records DIR`` runs that
conversion straight away. Runs in a few seconds with the default counts at ``--size 256``.
"""

from __future__ import annotations

import argparse
import sys

from drkeras.data import synthetic

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``python -m data_prep synthetic``."""
    parser.add_argument("--layout", required=True, choices=synthetic.LAYOUTS)
    parser.add_argument("--out", required=True, help="raw dataset root to write")
    parser.add_argument("--size", type=int, default=256, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--count-scale",
        type=float,
        default=1.0,
        help="multiplies the default number of images of every part of the layout",
    )
    parser.add_argument(
        "--label-noise", type=float, default=0.0, help="grader label-noise rate in [0, 1]"
    )
    parser.add_argument(
        "--records", default=None, help="also convert the written layout into records here"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m data_prep synthetic``; returns the exit status.

    Example::

        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> run(parser.parse_args(["--layout", "ddr", "--out", "/tmp/raw_ddr"]))  # doctest: +SKIP
        0
    """
    try:
        counts = synthetic.scaled_counts(args.layout, args.count_scale)
        root = synthetic.write_layout(
            args.out,
            args.layout,
            counts=counts,
            size=args.size,
            seed=args.seed,
            label_noise=args.label_noise,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = sum(counts.values())
    print(f"wrote a synthetic {args.layout} layout ({total} images, height {args.size}) to {root}")
    if args.records:
        import data_prep

        data_prep.convert(args.layout, root, args.records)
    return 0
