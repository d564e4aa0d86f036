"""DDR converter: DR grading (13,673 images) and lesion segmentation (757 images).

Layout (docs/datasets.md section 4)::

    DDR-dataset/DR_grading/{train,valid,test}/*.jpg   + {train,valid,test}.txt ("name grade" lines;
                                                          beside the folder or inside it)
    DDR-dataset/lesion_segmentation/{train,test}/image/*.jpg   label/{EX,HE,MA,SE}/*.tif
    DDR-dataset/lesion_segmentation/valid/image/*.jpg   segmentation label/{EX,HE,MA,SE}/*.tif

``valid`` becomes the ``val`` split. Grade 5 means ungradable: those images are kept with grade -1,
listed in the manifest's ``flagged`` list with ``"ungradable": true`` and counted per split in
``flagged_counts``. Masks share the image stem and mark lesions with 255; DDR has no optic-disc
masks (OD not annotated). Ids: ``ddr-grading-{split}-<stem>``, ``ddr-segmentation-{split}-<stem>``.

Example::

    python -m data_prep ddr --src /data/DDR-dataset --out records/ddr --max-side 1024 --workers 2
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

from data_prep import common

NAME = "ddr"
PARTS = ("grading", "segmentation")
UNGRADABLE_GRADE = 5
SEG_LESIONS = ("MA", "HE", "EX", "SE")


def _find(src: pathlib.Path) -> dict:
    found = {}
    for part, folder_name in (("grading", "dr_grading"), ("segmentation", "lesion_segmentation")):
        hits = common.find_dirs(src, lambda n, f=folder_name: n == f, max_depth=3)
        if hits:
            found[part] = hits[0]
    if not found:
        raise common.LayoutError(
            f"no DDR layout under {src}: looked (3 levels deep) for the folders DR_grading/ and "
            "lesion_segmentation/ of DDR-dataset"
        )
    return found


def _split_dirs(scan: common.Scan, folder: pathlib.Path, part: str) -> list:
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        split = common.split_from_name(child.name)
        if split is None:
            scan.warn(f"DDR {part}: ignored folder {child} (not train, valid or test)")
        else:
            found.append((split, child))
    return found


def _grade_row(label_file: pathlib.Path):
    def parse(row_number, row):
        grade = common.parse_label(
            row["grade"],
            range(6),
            file=label_file,
            row=row_number,
            column="grade",
            name=row["image"],
        )
        if grade == UNGRADABLE_GRADE:
            return {"grade": -1, "flags": {"ungradable": True}}
        return {"grade": grade}

    return parse


def _scan_grading(scan: common.Scan, folder: pathlib.Path) -> None:
    for split, split_dir in _split_dirs(scan, folder, "grading"):
        image_dir = split_dir
        if not common.index_images(image_dir):
            image_dir = (
                common.find_child(split_dir, lambda n: n in ("image", "images")) or split_dir
            )
        label_name = f"{split_dir.name}.txt".lower()
        label_file = common.find_child(folder, lambda n, x=label_name: n == x, dirs=False)
        label_file = label_file or common.find_child(
            split_dir, lambda n, x=label_name: n == x, dirs=False
        )
        if label_file is None:
            scan.warn(
                f"DDR grading {split}: no {split_dir.name}.txt in {folder} or {split_dir}; "
                "the split is not converted"
            )
            continue
        try:
            table = common.read_csv_table(
                label_file, {"image": (), "grade": ()}, sep=None, header=False
            )
        except common.SkippedFile as bad:
            scan.skip(bad.file, bad.reason, bad.kind, split)
            continue
        common.add_labeled_images(
            scan,
            table,
            common.index_images(image_dir),
            split=split,
            name_column="image",
            label_file=label_file,
            image_dir=image_dir,
            make_id=lambda path, s=split: f"{NAME}-grading-{s}-{path.stem}",
            parse_row=_grade_row(label_file),
        )


def _scan_segmentation(scan: common.Scan, folder: pathlib.Path) -> None:
    for split, split_dir in _split_dirs(scan, folder, "segmentation"):
        image_dir = common.find_child(split_dir, lambda n: n in ("image", "images"))
        # valid/ names its mask folder "segmentation label" (with a space), the others "label".
        label_dir = common.find_child(split_dir, lambda n: n.endswith("label"))
        if image_dir is None:
            scan.warn(f"DDR segmentation {split}: no image/ folder in {split_dir}; not converted")
            continue
        lesion_index = {}
        for lesion in SEG_LESIONS:
            lesion_dir = None
            if label_dir is not None:
                name = lesion.lower()
                lesion_dir = common.find_child(label_dir, lambda n, x=name: n == x)
            if lesion_dir is None:
                scan.warn(
                    f"DDR segmentation {split}: no {lesion}/ folder in "
                    f"{label_dir or split_dir / 'label'}; {lesion} marked not annotated"
                )
            else:
                lesion_index[lesion] = common.index_images(lesion_dir, common.MASK_EXTENSIONS)
        for image in common.unique_paths(common.index_images(image_dir)):
            masks = {}
            for lesion, index in lesion_index.items():
                hit = common.lookup(index, image.stem)
                masks[lesion] = str(hit) if hit is not None else None
            scan.tasks.append(
                common.Task(
                    id=f"{NAME}-segmentation-{split}-{image.stem}",
                    split=split,
                    image=str(image),
                    masks=masks,
                )
            )


def scan(src: pathlib.Path, *, parts: Sequence[str] = PARTS) -> common.Scan:
    """List the DDR examples of the chosen parts (``"grading"``, ``"segmentation"``)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown DDR part(s) {unknown}; expected some of {PARTS}")
    result = common.Scan()
    found = _find(src)
    scanners = {"grading": _scan_grading, "segmentation": _scan_segmentation}
    for part in parts:
        if part in found:
            scanners[part](result, found[part])
        else:
            result.warn(f"DDR {part}: folder not found under {src}; part not converted")
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
    """Convert a DDR download (grading and/or lesion segmentation) into records.

    Args:
        src: the ``DDR-dataset`` folder (or a folder above it).
        out: output records folder.
        max_side: cap on the long image side.
        workers: worker processes.
        parts: ``"grading"`` and/or ``"segmentation"``.
        **engine_options: see :func:`data_prep.common.convert_dataset`.

    Example::

        >>> convert("/data/DDR-dataset", "records/ddr")["flagged_counts"]  # doctest: +SKIP
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
    """Command-line options of ``python -m data_prep ddr``."""
    common.add_common_arguments(parser)
    parser.add_argument(
        "--parts",
        type=common.comma_list(PARTS),
        default=PARTS,
        help="comma-separated parts: grading,segmentation (default: both)",
    )


def run(args) -> int:
    """Entry point of ``python -m data_prep ddr``; returns the exit status."""
    return common.run_command(convert, args, parts=args.parts)
