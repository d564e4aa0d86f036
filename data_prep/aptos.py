"""APTOS 2019 Blindness Detection converter.

Layout (docs/datasets.md section 6)::

    ROOT/train.csv  id_code,diagnosis   ROOT/train_images/<id_code>.png   (3,662, graded 0-4)
    ROOT/test.csv   id_code             ROOT/test_images/<id_code>.png    (1,928, unlabeled)

``train`` keeps its grades; the competition's test images have no public labels and become the
``test`` split with grade -1 (useful as unlabeled data). No DME, no masks.

Example::

    python -m data_prep aptos --src /data/aptos2019 --out records/aptos --max-side 512
"""

from __future__ import annotations

import pathlib
from typing import Optional

from data_prep import common

NAME = "aptos"


def _find_root(src: pathlib.Path) -> pathlib.Path:
    for folder in common.find_dirs(src, lambda n: True, max_depth=2):
        if common.find_child(folder, lambda n: n in ("train.csv", "test.csv"), dirs=False):
            return folder
    raise common.LayoutError(
        f"no APTOS layout under {src}: looked (2 levels deep) for train.csv / test.csv beside "
        "train_images/ and test_images/"
    )


def scan(src: pathlib.Path) -> common.Scan:
    """List the APTOS examples of ``train.csv`` (graded) and ``test.csv`` (unlabeled)."""
    result = common.Scan()
    root = _find_root(src)
    for split, graded in (("train", True), ("test", False)):
        label_file = common.find_child(root, lambda n, s=split: n == f"{s}.csv", dirs=False)
        image_dir = common.find_child(root, lambda n, s=split: n == f"{s}_images")
        if label_file is None or image_dir is None:
            result.warn(
                f"APTOS: {split}.csv or {split}_images/ missing in {root}; {split} not converted"
            )
            continue
        columns = {"id_code": (), "diagnosis": ()} if graded else {"id_code": ()}
        try:
            table = common.read_csv_table(label_file, columns)
        except common.SkippedFile as bad:
            result.skip(bad.file, bad.reason, bad.kind, split)
            continue

        def parse_row(row_number, row, label_file=label_file, graded=graded):
            if not graded:
                return {}
            grade = common.parse_label(
                row["diagnosis"],
                range(5),
                file=label_file,
                row=row_number,
                column="diagnosis",
                name=row["id_code"],
            )
            return {"grade": grade}

        common.add_labeled_images(
            result,
            table,
            common.index_images(image_dir),
            split=split,
            name_column="id_code",
            label_file=label_file,
            image_dir=image_dir,
            make_id=lambda path, s=split: f"{NAME}-{s}-{path.stem}",
            parse_row=parse_row,
            expected_suffix=".png",
        )
    if not result.tasks and not result.skipped:
        raise common.LayoutError(
            f"APTOS: nothing to convert in {root} ({'; '.join(result.warnings)})"
        )
    return result


def convert(
    src, out, *, max_side: Optional[int] = None, workers: int = 1, **engine_options
) -> dict:
    """Convert APTOS 2019 into records (train graded, test unlabeled).

    Args:
        src: folder holding ``train.csv``, ``test.csv``, ``train_images/``, ``test_images/``.
        out: output records folder.
        max_side: cap on the long image side.
        workers: worker processes.
        **engine_options: see :func:`data_prep.common.convert_dataset`.

    Example::

        >>> convert("/data/aptos2019", "records/aptos", max_side=512)["counts"]  # doctest: +SKIP
        {'train': 3662, 'test': 1928}
    """
    return common.convert_dataset(
        NAME, src, out, scan, max_side=max_side, workers=workers, **engine_options
    )


def add_arguments(parser) -> None:
    """Command-line options of ``python -m data_prep aptos``."""
    common.add_common_arguments(parser)


def run(args) -> int:
    """Entry point of ``python -m data_prep aptos``; returns the exit status."""
    return common.run_command(convert, args)
