"""Messidor (original, 1,200 images) converter.

Layout (docs/datasets.md section 3): twelve bases ``Base11 ... Base34``, each 100 TIFF images plus
``Annotation_BaseNN.xls`` (sheet ``Feuil1``; columns ``Image name | Ophthalmologic department |
Retinopathy grade | Risk of macular edema`` with a trailing blank on the last header). Some copies
keep the spreadsheet inside its base folder, others beside it: spreadsheets are found with
``**/Annotation_Base*.xls`` and each one's images in the folder holding it or in a folder named
after its base.

Messidor has no official split; every image goes to ``test`` (it is used as an external test set,
or split by base for cross-validation: the base is kept in the id, ``messidor-test-Base11-<name>``).
Grades are Messidor's own 0-3 scale, kept as they are with ``dataset="messidor"`` so the evaluation
maps them; macular-oedema risk 0-2 goes to ``dme``.

Example::

    python -m data_prep messidor --src /data/messidor --out records/messidor --max-side 1024
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional

from data_prep import common

NAME = "messidor"
SPLIT = "test"
COLUMNS = {
    "Image name": (),
    "Retinopathy grade": (),
    "Risk of macular edema": ("Risk of macular oedema",),
}
_SHEET = re.compile(r"^annotation[ _]?(base\d+)\.xlsx?$")


def _image_dir(sheet: pathlib.Path, base: str, src: pathlib.Path) -> Optional[pathlib.Path]:
    """The folder of a base's images: the spreadsheet's own folder when named after the base, a
    folder named after the base beside it or anywhere below ``src``, else the spreadsheet's
    folder if it holds images (one flat folder for all bases)."""
    here = sheet.parent
    candidates = []
    if common.norm_name(here.name) == base:
        candidates.append(here)
    candidates.append(common.find_child(here, lambda n: n == base))
    candidates += common.find_dirs(src, lambda n: n == base)
    candidates.append(here)
    for folder in candidates:
        if folder is not None and common.index_images(folder):
            return folder
    return None


def scan(src: pathlib.Path) -> common.Scan:
    """List the Messidor examples: one spreadsheet per base, its images beside or below it."""
    result = common.Scan()
    sheets = common.find_files(src, lambda n: _SHEET.match(n) is not None)
    if not sheets:
        raise common.LayoutError(
            f"no Messidor spreadsheet under {src}: looked (4 levels deep) for "
            "Annotation_Base11.xls ... Annotation_Base34.xls"
        )
    used, image_dirs = set(), set()
    for sheet in sheets:
        base = _SHEET.match(sheet.name.lower()).group(1)
        base_name = "Base" + base[4:]
        try:
            table = common.read_excel_table(sheet, COLUMNS)
        except common.SkippedFile as bad:
            result.skip(bad.file, bad.reason, bad.kind, SPLIT)
            continue
        image_dir = _image_dir(sheet, base, src)
        if image_dir is None:
            result.warn(
                f"Messidor: no images for {sheet.name} (looked in {sheet.parent} and for a "
                f"folder named {base_name}); its {len(table)} rows are skipped"
            )
            for row_number, row in table.iterrows():
                result.skip(
                    sheet.parent / row["Image name"],
                    f"listed in {sheet.name} row {row_number} but no image folder was found",
                    common.MISSING,
                    SPLIT,
                )
            continue

        def parse_row(row_number, row, sheet=sheet):
            where = dict(file=sheet, row=row_number, name=row["Image name"])
            return {
                "grade": common.parse_label(
                    row["Retinopathy grade"], range(4), column="Retinopathy grade", **where
                ),
                "dme": common.parse_label(
                    row["Risk of macular edema"], range(3), column="Risk of macular edema", **where
                ),
            }

        image_dirs.add(image_dir)
        used |= common.add_labeled_images(
            result,
            table,
            common.index_images(image_dir),
            split=SPLIT,
            name_column="Image name",
            label_file=sheet,
            image_dir=image_dir,
            make_id=lambda path, b=base_name: f"{NAME}-{SPLIT}-{b}-{path.stem}",
            parse_row=parse_row,
            expected_suffix=".tif",
            # One folder may hold several bases: unlisted images are reported once, below.
            report_unlisted=False,
        )
    for image_dir in sorted(image_dirs):
        for path in common.unique_paths(common.index_images(image_dir)):
            if path not in used:
                result.skip(path, "image not listed in any Annotation_Base*.xls", common.UNLABELED)
    return result


def convert(
    src, out, *, max_side: Optional[int] = None, workers: int = 1, **engine_options
) -> dict:
    """Convert a Messidor download (bases + ``Annotation_Base*.xls``) into ``test`` records.

    Args:
        src: folder holding the unzipped bases.
        out: output records folder.
        max_side: cap on the long image side (1440 to 2304 px wide).
        workers: worker processes.
        **engine_options: see :func:`data_prep.common.convert_dataset`.

    Example::

        >>> convert("/data/messidor", "records/messidor")["grades"]["test"]  # doctest: +SKIP
    """
    return common.convert_dataset(
        NAME, src, out, scan, max_side=max_side, workers=workers, **engine_options
    )


def add_arguments(parser) -> None:
    """Command-line options of ``python -m data_prep messidor``."""
    common.add_common_arguments(parser)


def run(args) -> int:
    """Entry point of ``python -m data_prep messidor``; returns the exit status."""
    return common.run_command(convert, args)
