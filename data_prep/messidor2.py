"""Messidor-2 converter (1,748 images; grades from Kaggle ``google-brain/messidor2-dr-grades``).

Layout (docs/datasets.md section 3b)::

    ROOT/IMAGES/20051020_43808_0100_PP.png ... IM001667.JPG
    ROOT/messidor_data.csv   image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable

(``messidor-2.csv`` of ADCIS only pairs the images of an exam and is not needed.) A renamed copy
with ``id_code,diagnosis`` columns is also accepted. The four ungradable images
(``adjudicated_gradable = 0``) are skipped with reason ``ungradable`` and counted in the manifest.
All images go to ``test`` (Messidor-2 is used as an external test set). Grades are ICDRS 0-4
(adjudicated), ``dme`` 0/1.

Example::

    python -m data_prep messidor2 --src /data/messidor2 --out records/messidor2 --max-side 1024
"""

from __future__ import annotations

import pathlib
from typing import Optional

from data_prep import common

NAME = "messidor2"
SPLIT = "test"
LABEL_FILE = "messidor_data.csv"
COLUMNS = {
    "image_id": ("id_code",),
    "adjudicated_dr_grade": ("diagnosis",),
    "adjudicated_dme": (),
    "adjudicated_gradable": (),
}


def scan(src: pathlib.Path) -> common.Scan:
    """List the gradable Messidor-2 images of ``messidor_data.csv`` found in ``IMAGES/``."""
    result = common.Scan()
    label_files = common.find_files(src, lambda n: n == LABEL_FILE, max_depth=3)
    if not label_files:
        raise common.LayoutError(
            f"no {LABEL_FILE} under {src} (looked 3 levels deep); Messidor-2 grades come from "
            "Kaggle google-brain/messidor2-dr-grades"
        )
    label_file = label_files[0]
    candidates = common.find_dirs(src, lambda n: n == "images", max_depth=3)
    candidates += [label_file.parent, src]
    image_dir = next((d for d in candidates if common.index_images(d)), None)
    if image_dir is None:
        raise common.LayoutError(
            f"no Messidor-2 images under {src}: looked for an IMAGES/ folder (3 levels deep) and "
            f"in {label_file.parent}"
        )
    try:
        table = common.read_csv_table(label_file, COLUMNS)
    except common.SkippedFile as bad:
        result.skip(bad.file, bad.reason, bad.kind, SPLIT)
        return result

    def parse_row(row_number, row):
        where = dict(file=label_file, row=row_number, name=row["image_id"])
        gradable = common.parse_label(
            row["adjudicated_gradable"], (0, 1), column="adjudicated_gradable", **where
        )
        if not gradable:
            raise common.SkippedFile(
                image_dir / row["image_id"],
                f"ungradable (adjudicated_gradable=0 in {label_file.name} row {row_number})",
                common.UNGRADABLE,
            )
        return {
            "grade": common.parse_label(
                row["adjudicated_dr_grade"], range(5), column="adjudicated_dr_grade", **where
            ),
            "dme": common.parse_label(
                row["adjudicated_dme"], range(3), column="adjudicated_dme", **where
            ),
        }

    common.add_labeled_images(
        result,
        table,
        common.index_images(image_dir),
        split=SPLIT,
        name_column="image_id",
        label_file=label_file,
        image_dir=image_dir,
        make_id=lambda path: f"{NAME}-{SPLIT}-{path.stem}",
        parse_row=parse_row,
        expected_suffix=".png",
    )
    return result


def convert(
    src, out, *, max_side: Optional[int] = None, workers: int = 1, **engine_options
) -> dict:
    """Convert Messidor-2 (``IMAGES/`` + ``messidor_data.csv``) into ``test`` records.

    Args:
        src: folder holding ``IMAGES/`` and ``messidor_data.csv``.
        out: output records folder.
        max_side: cap on the long image side.
        workers: worker processes.
        **engine_options: see :func:`data_prep.common.convert_dataset`.

    Example::

        >>> convert("/data/messidor2", "records/messidor2")["skipped_by_kind"]  # doctest: +SKIP
        {'ungradable': 4}
    """
    return common.convert_dataset(
        NAME, src, out, scan, max_side=max_side, workers=workers, **engine_options
    )


def add_arguments(parser) -> None:
    """Command-line options of ``python -m data_prep messidor2``."""
    common.add_common_arguments(parser)


def run(args) -> int:
    """Entry point of ``python -m data_prep messidor2``; returns the exit status."""
    return common.run_command(convert, args)
