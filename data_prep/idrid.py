"""IDRiD converter: part A (lesion segmentation) and part B (disease grading).

Layout (docs/datasets.md section 1), found by searching for the ``1. Original Images`` and
``...Groundtruths`` folders so copies with a doubled top folder work::

    A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_01.jpg
    A. Segmentation/2. All Segmentation Groundtruths/{a. Training Set,b. Testing Set}/
        {1. Microaneurysms,2. Haemorrhages,3. Hard Exudates,4. Soft Exudates,5. Optic Disc}/
        IDRiD_01_MA.tif
    B. Disease Grading/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_001.jpg
    B. Disease Grading/2. Groundtruths/{a. ..._Training Labels.csv,b. ..._Testing Labels.csv}

Records: ``idrid-segmentation-{split}-IDRiD_01`` (grade -1, masks) and
``idrid-grading-{split}-IDRiD_001`` (grade 0-4, dme 0-2, no masks). Grading test names restart at
IDRiD_001, so ids are keyed by part and split. A missing mask file in a present lesion folder is an
empty annotated mask (only 26/54 training images have soft exudates); a lesion folder missing from
the copy marks the type not annotated, with a warning. Part C (localisation) is not converted:
the record schema has no coordinate fields, and its images are part B's.

Example::

    python -m data_prep idrid --src /data/IDRiD --out records/idrid --max-side 1024 --workers 2
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

from data_prep import common

NAME = "idrid"
PARTS = ("segmentation", "grading")
# Lesion code -> words that identify its ground-truth folder ("2. Haemorrhages", ...).
LESION_FOLDERS = {
    "MA": ("microaneurysm",),
    "HE": ("haemorrhage", "hemorrhage"),
    "EX": ("hard exudate",),
    "SE": ("soft exudate",),
    "OD": ("optic disc",),
}
GRADE_COLUMNS = {
    "Image name": (),
    "Retinopathy grade": (),
    "Risk of macular edema": ("Risk of macular oedema",),
}


def _part_of(folder: pathlib.Path, src: pathlib.Path) -> Optional[str]:
    """The IDRiD part a folder belongs to, from its nearest ancestor naming one."""
    names = [src.name, *folder.relative_to(src).parts]
    for name in reversed(names):
        name = common.norm_name(name)
        if "segmentation" in name and "groundtruth" not in name:
            return "segmentation"
        if "grading" in name:
            return "grading"
        if "locali" in name:
            return "localization"
    return None


def _find_parts(src: pathlib.Path) -> dict:
    parts = {}
    image_dirs = common.find_dirs(src, lambda n: n.endswith("original images"))
    truth_dirs = common.find_dirs(src, lambda n: "groundtruth" in n)
    for kind, folders in (("images", image_dirs), ("truth", truth_dirs)):
        for folder in folders:
            part = _part_of(folder, src)
            if part is not None:
                parts.setdefault(part, {}).setdefault(kind, folder)
    if not parts:
        raise common.LayoutError(
            f"no IDRiD part found under {src}: looked (4 levels deep) for a '1. Original Images' "
            "or '2. ... Groundtruths' folder inside 'A. Segmentation' or 'B. Disease Grading'"
        )
    return parts


def _split_dirs(scan: common.Scan, images: pathlib.Path, part: str) -> list:
    found = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        split = common.split_from_name(folder.name)
        if split is None:
            scan.warn(f"IDRiD {part}: ignored folder {folder} (not a training or testing set)")
        else:
            found.append((split, folder))
    if not found:
        scan.warn(f"IDRiD {part}: no 'a. Training Set' / 'b. Testing Set' folder in {images}")
    return found


def _scan_segmentation(scan: common.Scan, images: pathlib.Path, truth: Optional[pathlib.Path]):
    for split, image_dir in _split_dirs(scan, images, "segmentation"):
        truth_split = None
        if truth is not None:
            truth_split = common.find_child(
                truth, lambda n, s=split: common.split_from_name(n) == s
            )
        if truth_split is None:
            scan.warn(
                f"IDRiD segmentation {split}: no ground-truth folder for {image_dir.name} "
                f"(looked in {truth}); every lesion type marked not annotated"
            )
        lesion_index = {}
        for lesion, words in LESION_FOLDERS.items():
            folder = None
            if truth_split is not None:
                folder = common.find_child(truth_split, lambda n, w=words: any(x in n for x in w))
                if folder is None:
                    scan.warn(
                        f"IDRiD segmentation {split}: no '{words[0]}' folder in {truth_split}; "
                        f"{lesion} marked not annotated for these images"
                    )
            if folder is not None:
                lesion_index[lesion] = common.index_images(folder, common.MASK_EXTENSIONS)
        for image in common.unique_paths(common.index_images(image_dir)):
            masks = {
                lesion: common.lookup(index, f"{image.stem}_{lesion}")
                for lesion, index in lesion_index.items()
            }
            scan.tasks.append(
                common.Task(
                    id=f"{NAME}-segmentation-{split}-{image.stem}",
                    split=split,
                    image=str(image),
                    masks={k: (str(v) if v is not None else None) for k, v in masks.items()},
                )
            )


def _grade_row(label_file: pathlib.Path):
    def parse(row_number, row):
        where = dict(file=label_file, row=row_number, name=row["Image name"])
        return {
            "grade": common.parse_label(
                row["Retinopathy grade"], range(5), column="Retinopathy grade", **where
            ),
            "dme": common.parse_label(
                row["Risk of macular edema"], range(3), column="Risk of macular edema", **where
            ),
        }

    return parse


def _scan_grading(scan: common.Scan, images: pathlib.Path, truth: Optional[pathlib.Path]):
    label_files = []
    if truth is not None:
        label_files = [p for p in sorted(truth.iterdir()) if p.suffix.lower() == ".csv"]
    for split, image_dir in _split_dirs(scan, images, "grading"):
        index = common.index_images(image_dir)

        def make_id(path, split=split):
            return f"{NAME}-grading-{split}-{path.stem}"

        label_file = next((p for p in label_files if common.split_from_name(p.name) == split), None)
        if label_file is None:
            scan.warn(
                f"IDRiD grading {split}: no label CSV for {image_dir.name} in {truth}; its images "
                "are converted with unknown grade"
            )
            for path in common.unique_paths(index):
                scan.tasks.append(common.Task(id=make_id(path), split=split, image=str(path)))
            continue
        try:
            table = common.read_csv_table(label_file, GRADE_COLUMNS)
        except common.SkippedFile as bad:
            scan.skip(bad.file, bad.reason, bad.kind, split)
            for path in common.unique_paths(index):
                scan.skip(path, f"its label file {label_file} is unusable", common.LABEL, split)
            continue
        common.add_labeled_images(
            scan,
            table,
            index,
            split=split,
            name_column="Image name",
            label_file=label_file,
            image_dir=image_dir,
            make_id=make_id,
            parse_row=_grade_row(label_file),
        )


def scan(src: pathlib.Path, *, parts: Sequence[str] = PARTS) -> common.Scan:
    """Find the IDRiD parts under ``src`` and list the examples to convert.

    Args:
        src: the folder holding ``A. Segmentation`` and/or ``B. Disease Grading`` (any depth).
        parts: which of ``"segmentation"`` and ``"grading"`` to convert.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown IDRiD part(s) {unknown}; expected some of {PARTS}")
    result = common.Scan()
    found = _find_parts(src)
    if "localization" in found:
        result.warn(
            "IDRiD part C (localisation) found but not converted: the record schema has no "
            "coordinate fields, and its images are part B's"
        )
    scanners = {"segmentation": _scan_segmentation, "grading": _scan_grading}
    for part in parts:
        if part not in found:
            continue
        images, truth = found[part].get("images"), found[part].get("truth")
        if images is None:
            result.warn(
                f"IDRiD {part}: ground truth found in {truth} but no '1. Original Images' folder "
                f"beside it; the {part} part is not converted"
            )
            continue
        if truth is None:
            result.warn(f"IDRiD {part}: no ground-truth folder next to {images}")
        scanners[part](result, images, truth)
    if not any(p in found for p in parts):
        raise common.LayoutError(
            f"none of the IDRiD parts {list(parts)} found under {src} (found: {sorted(found)})"
        )
    return result


def convert(
    src,
    out,
    *,
    max_side: Optional[int] = None,
    workers: int = 1,
    parts: Sequence[str] = PARTS,
    **engine_options,
) -> dict:
    """Convert an IDRiD download (parts A and B) into records; return the manifest.

    Args:
        src: folder holding the unzipped IDRiD parts.
        out: output records folder.
        max_side: cap on the long image side (IDRiD images are 4288x2848).
        workers: worker processes.
        parts: ``"segmentation"`` (part A) and/or ``"grading"`` (part B).
        **engine_options: ``examples_per_shard``, ``lossless``, ``splits``, ``limit``, ``quiet``
            of :func:`data_prep.common.convert_dataset`.

    Example::

        >>> manifest = convert("/data/IDRiD", "records/idrid", max_side=1024)  # doctest: +SKIP
        >>> manifest["counts"]  # doctest: +SKIP
        {'train': 467, 'test': 130}
    """
    return common.convert_dataset(
        NAME,
        src,
        out,
        scan,
        max_side=max_side,
        workers=workers,
        options={"parts": tuple(parts)},
        **engine_options,
    )


def add_arguments(parser) -> None:
    """Command-line options of ``python -m data_prep idrid``."""
    common.add_common_arguments(parser)
    parser.add_argument(
        "--parts",
        type=common.comma_list(PARTS),
        default=PARTS,
        help="comma-separated parts to convert: segmentation,grading (default: both)",
    )


def run(args) -> int:
    """Entry point of ``python -m data_prep idrid``; returns the exit status."""
    return common.run_command(convert, args, parts=args.parts)
