"""``python -m data_prep <dataset> --src RAW --out RECORDS [--max-side N] [--workers N]``.

Only the chosen dataset's module is imported, so a missing or broken converter does not break
the others (``--help`` loads none of them).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

from data_prep import DATASETS, load


def _usage() -> str:
    width = max(len(name) for name in DATASETS)
    lines = [
        "usage: python -m data_prep DATASET --src RAW --out RECORDS [options]",
        "",
        "datasets:",
        *(f"  {name:<{width}}  {text}" for name, text in DATASETS.items()),
        "",
        "python -m data_prep DATASET --help lists the options of one dataset.",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch to ``data_prep.<dataset>.run``; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    dataset, rest = argv[0], argv[1:]
    if dataset not in DATASETS:
        print(f"error: unknown dataset {dataset!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = load(dataset)
    except ImportError as error:
        print(f"error: the {dataset} converter cannot be imported: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog=f"python -m data_prep {dataset}", description=module.__doc__.split("\n")[0]
    )
    module.add_arguments(parser)
    drkeras.startup.add_verbose_flag(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
