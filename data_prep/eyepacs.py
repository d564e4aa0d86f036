"""EyePACS (Kaggle Diabetic Retinopathy Detection 2015) converter.

Layout (docs/datasets.md section 2)::

    ROOT/train/<patient>_<left|right>.jpeg     ROOT/trainLabels.csv          image,level
    ROOT/test/<patient>_<left|right>.jpeg      ROOT/retinopathy_solution.csv image,level,Usage

``trainLabels.csv`` gives the ``train`` split (35,126). The test images are split by the
``Usage`` column of ``retinopathy_solution.csv`` (published after the competition): ``Public`` ->
``val`` (10,906), ``Private`` -> ``test`` (42,670), the splits TFDS uses. Without the solution file
the test images are converted as ``test`` with unknown grade (-1), with a warning. Label files may
also be the zipped downloads (``trainLabels.csv.zip``). Grades are ICDRS 0-4; no DME, no masks.

Example::

    python -m data_prep eyepacs --src /data/eyepacs --out records/eyepacs --max-side 512 --workers 2
"""

from __future__ import annotations

import pathlib
from typing import Optional

from data_prep import common

NAME = "eyepacs"
USAGE_SPLITS = {"public": "val", "private": "test"}


def _label_file(root: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
    for suffix in (".csv", ".csv.zip"):
        hit = common.find_child(root, lambda n, s=stem + suffix: n == s.lower(), dirs=False)
        if hit is not None:
            return hit
    return None


def _find_root(src: pathlib.Path) -> pathlib.Path:
    for folder in common.find_dirs(src, lambda n: True, max_depth=2):
        if _label_file(folder, "trainLabels") or common.find_child(folder, lambda n: n == "train"):
            return folder
    raise common.LayoutError(
        f"no EyePACS layout under {src}: looked (2 levels deep) for a folder holding "
        "trainLabels.csv or a train/ folder of <patient>_<left|right>.jpeg images"
    )


def _level(label_file: pathlib.Path):
    def parse(row_number, row):
        grade = common.parse_label(
            row["level"],
            range(5),
            file=label_file,
            row=row_number,
            column="level",
            name=row["image"],
        )
        return {"grade": grade}

    return parse


def _read(scan: common.Scan, label_file: pathlib.Path, columns: dict):
    try:
        return common.read_csv_table(label_file, columns)
    except common.SkippedFile as bad:
        scan.skip(bad.file, bad.reason, bad.kind)
        return None


def scan(src: pathlib.Path) -> common.Scan:
    """List the EyePACS examples under ``src`` (the folder holding ``train/`` and ``test/``)."""
    result = common.Scan()
    root = _find_root(src)

    def make_id(split):
        return lambda path: f"{NAME}-{split}-{path.stem}"

    train_dir = common.find_child(root, lambda n: n == "train")
    train_labels = _label_file(root, "trainLabels")
    if train_dir is None:
        result.warn(f"EyePACS: no train/ folder in {root}; the train split is not converted")
    elif train_labels is None:
        result.warn(f"EyePACS: no trainLabels.csv in {root}; the train split is not converted")
    else:
        table = _read(result, train_labels, {"image": (), "level": ()})
        if table is not None:
            common.add_labeled_images(
                result,
                table,
                common.index_images(train_dir),
                split="train",
                name_column="image",
                label_file=train_labels,
                image_dir=train_dir,
                make_id=make_id("train"),
                parse_row=_level(train_labels),
                expected_suffix=".jpeg",
            )

    test_dir = common.find_child(root, lambda n: n == "test")
    solution = _label_file(root, "retinopathy_solution")
    if test_dir is None:
        return result
    test_index = common.index_images(test_dir)
    if solution is None:
        result.warn(
            f"EyePACS: no retinopathy_solution.csv in {root}; test images converted as split "
            "'test' with unknown grade"
        )
        for path in common.unique_paths(test_index):
            result.tasks.append(
                common.Task(id=make_id("test")(path), split="test", image=str(path))
            )
        return result
    table = _read(result, solution, {"image": (), "level": (), "Usage": ()})
    if table is None:
        return result
    usage = table["Usage"].str.lower()
    for bad_row in table.index[~usage.isin(list(USAGE_SPLITS))]:
        result.skip(
            solution,
            f"row {bad_row} ({table.at[bad_row, 'image']}): unknown Usage "
            f"{table.at[bad_row, 'Usage']!r} (expected Public or Private)",
            common.LABEL,
        )
    for key, split in USAGE_SPLITS.items():
        common.add_labeled_images(
            result,
            table[usage == key],
            test_index,
            split=split,
            name_column="image",
            label_file=solution,
            image_dir=test_dir,
            make_id=make_id(split),
            parse_row=_level(solution),
            expected_suffix=".jpeg",
            report_unlisted=False,
        )
    listed = {common.lookup(test_index, name) for name in table["image"]}
    for path in common.unique_paths(test_index):
        if path not in listed:
            result.skip(path, f"image not listed in {solution}", common.UNLABELED, "test")
    return result


def convert(
    src, out, *, max_side: Optional[int] = None, workers: int = 1, **engine_options
) -> dict:
    """Convert an EyePACS download into records (train / val = Public / test = Private).

    Args:
        src: folder holding ``train/``, ``test/``, ``trainLabels.csv`` and optionally
            ``retinopathy_solution.csv``.
        out: output records folder.
        max_side: cap on the long image side (sizes vary from ~400 to ~5000 px).
        workers: worker processes.
        **engine_options: see :func:`data_prep.common.convert_dataset`.

    Example::

        >>> convert("/data/eyepacs", "records/eyepacs", max_side=512)["counts"]  # doctest: +SKIP
        {'train': 35126, 'val': 10906, 'test': 42670}
    """
    return common.convert_dataset(
        NAME, src, out, scan, max_side=max_side, workers=workers, **engine_options
    )


def add_arguments(parser) -> None:
    """Command-line options of ``python -m data_prep eyepacs``."""
    common.add_common_arguments(parser)


def run(args) -> int:
    """Entry point of ``python -m data_prep eyepacs``; returns the exit status."""
    return common.run_command(convert, args)
