"""DiaRetDB1 v1.1 converter (89 images, soft lesion maps).

Layout (docs/datasets.md section 5)::

    diaretdb1_v_1_1/resources/images/ddb1_fundusimages/image001.png ...
    diaretdb1_v_1_1/resources/images/ddb1_groundtruth/{redsmalldots,hemorrhages,hardexudates,
                                                        softexudates}/image001.png ...
    diaretdb1_v_1_1/resources/traindatasets/trainset.txt   (28 images)
    diaretdb1_v_1_1/resources/testdatasets/testset.txt     (61 images)

The ground truth maps are *soft* (the experts' agreement); like the official evaluation they are
binarised with ``value / 252 >= confidence`` (``--confidence``, default 0.75). Classes map to
lesions: redsmalldots -> MA, hemorrhages -> HE, hardexudates -> EX, softexudates -> SE; OD is not
annotated and the dataset has no grades. The v2.1 distribution (raw XML markups) is not supported.

Example::

    python -m data_prep diaretdb1 --src /data/diaretdb1_v_1_1 --out records/diaretdb1
"""

from __future__ import annotations

import pathlib
from typing import Optional

from data_prep import common

NAME = "diaretdb1"
FULL_SCALE = 252.0
DEFAULT_CONFIDENCE = 0.75
CLASS_FOLDERS = {
    "MA": "redsmalldots",
    "HE": "hemorrhages",
    "EX": "hardexudates",
    "SE": "softexudates",
}
SPLIT_FILES = {"train": "trainset.txt", "test": "testset.txt"}


def _read_list(path: pathlib.Path) -> list:
    """Image file names of a v1.1 split list (one entry per line; any leading folder dropped)."""
    names = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tokens = line.split()
        if tokens:
            names.append(pathlib.PurePosixPath(tokens[0].replace("\\", "/")).name)
    return names


def scan(src: pathlib.Path, *, confidence: float = DEFAULT_CONFIDENCE) -> common.Scan:
    """List the DiaRetDB1 v1.1 examples of ``trainset.txt`` and ``testset.txt``.

    Args:
        src: the ``diaretdb1_v_1_1`` folder (or one above or below it, down to ``resources``).
        confidence: binarisation level of the soft maps, in (0, 1].
    """
    if not 0.0 < float(confidence) <= 1.0:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")
    image_dirs = common.find_dirs(src, lambda n: n == "ddb1_fundusimages")
    if not image_dirs:
        if common.find_dirs(src, lambda n: n.startswith("ddb1_v02")) or common.find_files(
            src, lambda n: n.startswith("diaretdb1_image") and n.endswith(".xml")
        ):
            raise common.LayoutError(
                f"{src} looks like DiaRetDB1 v2.1 (XML markups), which is not supported; use "
                "the v1.1 distribution (diaretdb1_v_1_1 with ddb1_groundtruth/ soft maps)"
            )
        raise common.LayoutError(
            f"no DiaRetDB1 v1.1 layout under {src}: looked (4 levels deep) for "
            "resources/images/ddb1_fundusimages/"
        )
    image_dir = image_dirs[0]
    resources = image_dir.parent.parent
    result = common.Scan()
    truth = common.find_child(image_dir.parent, lambda n: n == "ddb1_groundtruth")
    lesion_index = {}
    for lesion, folder_name in CLASS_FOLDERS.items():
        folder = truth and common.find_child(truth, lambda n, f=folder_name: n == f)
        if folder is None:
            result.warn(
                f"DiaRetDB1: no {folder_name}/ folder in {truth or image_dir.parent}; "
                f"{lesion} marked not annotated"
            )
        else:
            lesion_index[lesion] = common.index_images(folder, common.MASK_EXTENSIONS)
    index = common.index_images(image_dir)
    listed = set()
    for split, file_name in SPLIT_FILES.items():
        lists = common.find_files(resources, lambda n, f=file_name: n == f, max_depth=2)
        if not lists:
            result.warn(f"DiaRetDB1: no {file_name} under {resources}; {split} split not converted")
            continue
        for name in _read_list(lists[0]):
            path = common.lookup(index, name)
            if path is None:
                result.skip(
                    image_dir / name,
                    f"listed in {lists[0].name} but not found in {image_dir}",
                    common.MISSING,
                    split,
                )
                continue
            listed.add(path)
            masks = {}
            for lesion, masks_index in lesion_index.items():
                hit = common.lookup(masks_index, path.name)
                masks[lesion] = str(hit) if hit is not None else None
            result.tasks.append(
                common.Task(
                    id=f"{NAME}-{split}-{path.stem}",
                    split=split,
                    image=str(path),
                    masks=masks,
                    soft_mask=(FULL_SCALE, float(confidence)),
                )
            )
    for path in common.unique_paths(index):
        if path not in listed:
            result.skip(path, "image in neither trainset.txt nor testset.txt", common.UNLABELED)
    return result


def convert(
    src,
    out,
    *,
    max_side: Optional[int] = None,
    workers: int = 1,
    confidence: float = DEFAULT_CONFIDENCE,
    **engine_options,
) -> dict:
    """Convert DiaRetDB1 v1.1 into records with binarised lesion masks (train 28 / test 61).

    Args:
        src: the ``diaretdb1_v_1_1`` folder.
        out: output records folder.
        max_side: cap on the long image side (images are 1500x1152).
        workers: worker processes.
        confidence: soft maps are binarised as ``value / 252 >= confidence``.
        **engine_options: see :func:`data_prep.common.convert_dataset`.

    Example::

        >>> convert("/data/diaretdb1_v_1_1", "records/diaretdb1")["counts"]  # doctest: +SKIP
        {'train': 28, 'test': 61}
    """
    return common.convert_dataset(
        NAME,
        src,
        out,
        scan,
        max_side=max_side,
        workers=workers,
        options={"confidence": float(confidence)},
        **engine_options,
    )


def _confidence(text: str) -> float:
    import argparse

    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--confidence must be in (0, 1], got {text}")
    return value


def add_arguments(parser) -> None:
    """Command-line options of ``python -m data_prep diaretdb1``."""
    common.add_common_arguments(parser)
    parser.add_argument(
        "--confidence",
        type=_confidence,
        default=DEFAULT_CONFIDENCE,
        help="binarise the soft ground truth as value/252 >= CONFIDENCE (default 0.75)",
    )


def run(args) -> int:
    """Entry point of ``python -m data_prep diaretdb1``; returns the exit status."""
    return common.run_command(convert, args, confidence=args.confidence)
