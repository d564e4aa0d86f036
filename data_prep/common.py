"""The conversion engine shared by every dataset converter (docs/design.md section 3, "Converters").

A dataset module only describes its layout and labels: its ``scan(src, **options)`` walks the
raw folder and returns a :class:`Scan` (a list of :class:`Task` plus the files it had to skip and
the warnings it raised). :func:`convert_dataset` does the rest: it reads every task's image and
masks in worker processes (``multiprocessing``, a bounded window of pending tasks so memory stays
flat), caps the long side at ``max_side`` (aspect kept, masks resized NEAREST), encodes records
(:mod:`drkeras.data.records`), writes shards, and writes ``manifest.json``.

A bad image never stops a run: it is skipped and listed in the manifest (``skipped``: file,
reason, kind). A root that does not look like the dataset raises :class:`LayoutError`, which the
command line turns into a non-zero exit naming the folder it looked for.

Example::

    >>> scan = Scan()
    >>> scan.tasks.append(Task(id="x-train-a", split="train", image="raw/a.jpg", grade=2))
    >>> manifest = convert_dataset("x", "raw", "records/x", lambda src: scan)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import io
import json
import multiprocessing
import os
import pathlib
import re
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "LayoutError",
    "LayoutWarning",
    "Scan",
    "SkippedFile",
    "Task",
    "add_common_arguments",
    "add_labeled_images",
    "clean_table",
    "comma_list",
    "convert_dataset",
    "find_child",
    "find_dirs",
    "find_files",
    "index_images",
    "lookup",
    "norm_name",
    "parse_label",
    "read_csv_table",
    "read_excel_table",
    "read_image",
    "read_mask",
    "run_command",
    "split_from_name",
    "summary",
    "target_size",
    "unique_paths",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".ppm", ".bmp")
MASK_EXTENSIONS = (".tif", ".tiff", ".png", ".gif", ".bmp", ".jpg")

# Reasons a file is skipped; the manifest counts them (``skipped_by_kind``).
MISSING = "missing"  # listed in a label file, absent on disk
CORRUPT = "corrupt"  # cannot be decoded
MASK_SIZE = "mask_size"  # mask dimensions differ from the image
LABEL = "label"  # unknown grade, missing column, unreadable label file
UNLABELED = "unlabeled"  # image on disk not listed in its split's label file
UNGRADABLE = "ungradable"  # the graders marked the image ungradable
DUPLICATE = "duplicate"  # a second example with an id already written
ERROR = "error"  # anything unexpected while converting one image


class LayoutError(Exception):
    """The source folder does not have the dataset's layout (wrong ``--src``)."""


class LayoutWarning(UserWarning):
    """Part of a layout is missing (e.g. a lesion folder of an incomplete download)."""


class SkippedFile(Exception):
    """One input file that cannot be converted; carries the file and a readable reason."""

    def __init__(self, file, reason: str, kind: str = ERROR, image: Optional[str] = None):
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason
        self.kind = kind
        # The photograph not converted because of ``file`` (a mask), when that is another file.
        self.image = image

    def __reduce__(self):
        # Workers return these through a pipe; the default pickling would pass only the message.
        return (SkippedFile, (self.file, self.reason, self.kind, self.image))

    def entry(self) -> dict:
        """The manifest's ``skipped`` entry: file, reason, kind (and ``image`` for a mask)."""
        entry = {"file": self.file, "reason": self.reason, "kind": self.kind}
        if self.image is not None:
            entry["image"] = self.image
        return entry


@dataclasses.dataclass(frozen=True)
class Task:
    """One example to convert: where its files are and what its labels are.

    Attributes:
        id: unique example id, ``{dataset}[-{part}]-{split}-{name}``.
        split: one of ``drkeras.keys.SPLITS``.
        image: path of the photograph.
        masks: lesion code (``"MA"``, ...) -> mask path, for the lesion types annotated for this
            image; a ``None`` path means annotated but no file (an empty mask). Lesion types not
            in the mapping are "not annotated" (``mask_present`` False).
        grade: DR grade or -1.
        dme: macular-oedema risk or -1.
        soft_mask: ``(full_scale, confidence)`` to binarise soft ground-truth maps as
            ``value / full_scale >= confidence`` (DiaRetDB1); ``None`` binarises with ``> 0``.
        flags: notes copied into the manifest's ``flagged`` list (e.g. ``{"ungradable": True}``).
    """

    id: str
    split: str
    image: str
    masks: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)
    grade: int = -1
    dme: int = -1
    soft_mask: Optional[Tuple[float, float]] = None
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Scan:
    """What a dataset module found in the raw folder: tasks, skipped files and warnings."""

    tasks: List[Task] = dataclasses.field(default_factory=list)
    skipped: List[dict] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)

    def skip(self, file, reason: str, kind: str, split: Optional[str] = None) -> None:
        """Record a file that will not be converted, and why."""
        entry = {"file": str(file), "reason": reason, "kind": kind}
        if split is not None:
            entry["split"] = split
        self.skipped.append(entry)

    def warn(self, message: str) -> None:
        """Record a layout problem and emit it as a :class:`LayoutWarning`."""
        self.warnings.append(message)
        warnings.warn(message, LayoutWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------
# Layout search


def norm_name(name: str) -> str:
    """Lower-case with runs of whitespace collapsed.

    Example::

        >>> norm_name("A.  Segmentation ")
        'a. segmentation'
    """
    return " ".join(str(name).split()).lower()


def find_dirs(root: pathlib.Path, predicate: Callable[[str], bool], *, max_depth: int = 4) -> list:
    """Folders under ``root`` (``root`` included, up to ``max_depth`` levels down) whose
    normalised name satisfies ``predicate``; sorted, breadth-first order of discovery kept.

    Searching instead of assuming a depth handles copies with a doubled top folder
    (``A. Segmentation/A. Segmentation/...``).

    Example::

        >>> find_dirs(pathlib.Path("IDRiD"), lambda n: n == "1. original images")  # doctest: +SKIP
    """
    found = []
    level = [pathlib.Path(root)]
    for _ in range(max_depth + 1):
        next_level = []
        for folder in level:
            if predicate(norm_name(folder.name)):
                found.append(folder)
            with contextlib.suppress(OSError):
                next_level.extend(sorted(p for p in folder.iterdir() if p.is_dir()))
        level = next_level
    return found


def find_files(root: pathlib.Path, predicate: Callable[[str], bool], *, max_depth: int = 4) -> list:
    """Files under ``root`` (up to ``max_depth`` levels down) whose lower-case name satisfies
    ``predicate``, shallowest first."""
    found = []
    for folder in find_dirs(root, lambda _: True, max_depth=max_depth):
        with contextlib.suppress(OSError):
            found.extend(
                sorted(p for p in folder.iterdir() if p.is_file() and predicate(p.name.lower()))
            )
    return found


def find_child(
    folder: pathlib.Path, predicate: Callable[[str], bool], *, dirs: bool = True
) -> Optional[pathlib.Path]:
    """The first child (folder when ``dirs`` else file) of ``folder`` whose normalised name
    satisfies ``predicate``, or ``None``."""
    if not folder.is_dir():
        return None
    for child in sorted(folder.iterdir()):
        if child.is_dir() == dirs and predicate(norm_name(child.name)):
            return child
    return None


def index_images(folder: pathlib.Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> dict:
    """Map of the image files directly in ``folder``: both the file name and its stem, lower-case,
    point to the path, so label files that list names with or without extension (in any case)
    find their file. One directory listing instead of a ``stat`` per listed name."""
    index = {}
    extensions = tuple(e.lower() for e in extensions)
    if not folder.is_dir():
        return index
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            index.setdefault(path.name.lower(), path)
            index.setdefault(path.stem.lower(), path)
    return index


# --------------------------------------------------------------------------------------------
# Label files


def clean_table(frame, path) -> Any:
    """Tidy a label table read with every cell as text: strip column names and cells, drop empty
    and ``Unnamed:`` columns (trailing commas) and blank rows (trailing blank lines).

    Example::

        >>> import pandas as pd
        >>> frame = pd.DataFrame({" a ": [" 1 ", ""], "Unnamed: 1": ["", ""]})
        >>> clean_table(frame, "x").columns.tolist()
        ['a']
    """
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    keep = [c for c in frame.columns if c and not c.startswith("Unnamed:")]
    frame = frame[keep]
    frame = frame.apply(lambda col: col.map(lambda v: "" if v is None else str(v).strip()))
    frame = frame.replace({"nan": "", "NaN": "", "None": ""})
    blank = (frame == "").all(axis=1)
    frame = frame[~blank].reset_index(drop=True)
    # The row number a user sees in a spreadsheet (header = row 1); kept for error messages.
    frame.index = [int(i) + 2 for i in np.flatnonzero(~blank.to_numpy())]
    return frame


def _check_columns(frame, path, required: Mapping[str, Iterable[str]]) -> Any:
    """Rename the first present alias of each required column to its canonical name."""
    lower = {c.lower(): c for c in frame.columns}
    rename = {}
    for canonical, aliases in required.items():
        names = [canonical, *aliases]
        hit = next((lower[n.lower()] for n in names if n.lower() in lower), None)
        if hit is None:
            raise SkippedFile(
                path,
                f"missing column {canonical!r}"
                + (f" (or {', '.join(repr(a) for a in aliases)})" if list(aliases) else "")
                + f"; found columns {list(frame.columns)}",
                LABEL,
            )
        rename[hit] = canonical
    return frame.rename(columns=rename)


def read_csv_table(
    path: pathlib.Path,
    required: Mapping[str, Iterable[str]],
    *,
    sep: Optional[str] = ",",
    header: bool = True,
) -> Any:
    """Read a CSV label file with the quirks of real downloads and check its columns.

    CRLF line endings, trailing commas (empty ``Unnamed:`` columns), header names with trailing
    blanks and blank trailing rows are all tolerated; ``.csv.zip`` files are read directly.

    Args:
        path: the file.
        required: canonical column name -> accepted aliases (matched case-insensitively after
            stripping); the returned frame uses the canonical names.
        sep: field separator (``None`` = any whitespace, for headerless ``name grade`` lists).
        header: whether the first line names the columns; without it, the columns are named by
            the keys of ``required`` in order.

    Returns:
        A ``pandas.DataFrame`` of stripped strings, indexed by the row number in the file.

    Raises:
        SkippedFile: the file cannot be read or lacks a required column (kind ``"label"``).

    Example::

        >>> read_csv_table(path, {"image": (), "level": ()})  # doctest: +SKIP
    """
    import pandas as pd

    try:
        if header:
            frame = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                sep=sep,
                engine="python",
                skip_blank_lines=True,
            )
        else:
            frame = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                sep=r"\s+" if sep is None else sep,
                engine="python",
                header=None,
                skip_blank_lines=True,
            )
            names = list(required)
            frame = frame.iloc[:, : len(names)]
            frame.columns = names[: frame.shape[1]]
    except Exception as error:  # pandas raises many types for malformed files
        raise SkippedFile(path, f"cannot read label file ({error})", LABEL) from error
    frame = clean_table(frame, path)
    if not header:
        frame.index = frame.index - 1  # no header line: first data row is line 1
    return _check_columns(frame, path, required)


def read_excel_table(path: pathlib.Path, required: Mapping[str, Iterable[str]]) -> Any:
    """Read the first sheet of an ``.xls``/``.xlsx`` label file (Messidor); otherwise like
    :func:`read_csv_table`."""
    import pandas as pd

    try:
        frame = pd.read_excel(path, sheet_name=0, dtype=str, keep_default_na=False)
    except Exception as error:  # xlrd raises its own error types
        raise SkippedFile(path, f"cannot read spreadsheet ({error})", LABEL) from error
    return _check_columns(clean_table(frame, path), path, required)


def parse_label(
    value: str, allowed: Iterable[int], *, file, row, column: str, name: str = ""
) -> int:
    """Parse one label cell as an int from ``allowed``; ``'2.0'`` (spreadsheets) counts as 2.

    Raises ``SkippedFile`` (kind ``"label"``) naming the file, row, column and the allowed values.

    Example::

        >>> parse_label("3", range(5), file="labels.csv", row=2, column="level")
        3
    """
    allowed = list(allowed)
    text = str(value).strip()
    try:
        number = float(text)
        ok = number.is_integer() and int(number) in allowed
    except ValueError:
        ok = False
    if not ok:
        what = f" ({name})" if name else ""
        raise SkippedFile(
            file,
            f"row {row}{what}: unknown {column} {text!r} (expected one of {allowed})",
            LABEL,
        )
    return int(number)


# --------------------------------------------------------------------------------------------
# Reading and resizing


def target_size(height: int, width: int, max_side: Optional[int]) -> Tuple[int, int]:
    """``(height, width)`` after capping the long side at ``max_side`` (aspect kept, never
    enlarged).

    Example::

        >>> target_size(2848, 4288, 512)
        (340, 512)
    """
    long_side = max(height, width)
    if not max_side or long_side <= max_side:
        return height, width
    scale = max_side / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_image(path, max_side: Optional[int] = None) -> Tuple[np.ndarray, Optional[bytes], tuple]:
    """Decode a photograph completely (a truncated file is an error, not a grey band).

    Args:
        path: JPEG/PNG/TIFF/PPM/BMP file.
        max_side: cap on the long side of the returned array.

    Returns:
        ``(rgb, original_bytes, original_size)``: the uint8 RGB array (resized when needed with
        Lanczos interpolation); the file's bytes when they can be stored unchanged (an RGB JPEG or
        PNG that was not resized), else ``None``; the ``(height, width)`` of the file.

    Raises:
        SkippedFile: unreadable, truncated or empty image (kind ``"corrupt"``).
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            width, height = img.size
            new_h, new_w = target_size(height, width, max_side)
            if (new_h, new_w) != (height, width) and fmt == "JPEG":
                # DCT-domain downscaling: decodes a 4000 px JPEG several times faster.
                img.draft("RGB", (new_w, new_h))
            img.load()
            mode = img.mode
            rgb_image = img.convert("RGB")
            if rgb_image.size != (new_w, new_h):
                # Pillow, not OpenCV: this runs in forked workers (see records._encode_rgb).
                rgb_image = rgb_image.resize((new_w, new_h), Image.LANCZOS, reducing_gap=2.0)
            rgb = np.asarray(rgb_image)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise SkippedFile(
            path,
            f"cannot decode image ({type(error).__name__}: {error}); expected a complete "
            "JPEG/PNG/TIFF file",
            CORRUPT,
        ) from error
    if rgb.size == 0:
        raise SkippedFile(path, "image has zero size", CORRUPT)
    keep = fmt in ("JPEG", "PNG") and mode == "RGB" and (new_h, new_w) == (height, width)
    return np.ascontiguousarray(rgb), (data if keep else None), (height, width)


def read_mask(
    path,
    expected_size: Tuple[int, int],
    max_side: Optional[int] = None,
    soft: Optional[Tuple[float, float]] = None,
) -> np.ndarray:
    """Read one lesion mask as a {0, 1} uint8 array of the (resized) image size.

    Masks are read with Pillow and binarised with ``> 0``: IDRiD masks are 1-bit *palette* TIFFs
    whose indices are {0, 1}, which ``convert('L')`` or OpenCV would turn into {0, 76}
    (docs/datasets.md section 0.1). Multi-channel masks take the maximum over channels. A soft map
    (DiaRetDB1) is binarised with ``value / full_scale >= confidence`` when ``soft`` is given.
    Resizing uses NEAREST so the mask stays binary.

    Raises:
        SkippedFile: unreadable mask (``"corrupt"``) or a size that differs from the image's
            (``"mask_size"``), naming both sizes.
    """
    path = pathlib.Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            values = np.asarray(img)
    except Exception as error:
        raise SkippedFile(
            path,
            f"cannot decode mask ({type(error).__name__}: {error}); expected an image file",
            CORRUPT,
        ) from error
    if values.ndim == 3:
        values = values.max(axis=2)
    if values.shape != tuple(expected_size):
        raise SkippedFile(
            path,
            f"mask is {values.shape[1]}x{values.shape[0]} (WxH) but its image is "
            f"{expected_size[1]}x{expected_size[0]}; expected the same size",
            MASK_SIZE,
        )
    if soft is None:
        binary = values > 0
    else:
        full_scale, confidence = soft
        binary = values.astype(np.float64) / full_scale >= confidence
    mask = binary.astype(np.uint8)
    new_h, new_w = target_size(*expected_size, max_side)
    if (new_h, new_w) != tuple(expected_size):
        mask = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST))
    return mask


# --------------------------------------------------------------------------------------------
# Converting one task (runs in worker processes)


@dataclasses.dataclass
class _Result:
    task: Task
    serialized: bytes
    present: Tuple[bool, ...]
    nonempty: Tuple[bool, ...]
    size: Tuple[int, int]


def _convert_task(task: Task, dataset: str, max_side: Optional[int], lossless: bool):
    from drkeras import keys
    from drkeras.data import records

    try:
        rgb, original, size = read_image(task.image, max_side)
        height, width = rgb.shape[:2]
        masks = np.zeros((height, width, keys.NUM_LESIONS), np.uint8)
        present = []
        for i, lesion in enumerate(keys.LESIONS):
            annotated = lesion in task.masks
            present.append(annotated)
            path = task.masks.get(lesion)
            if annotated and path is not None:
                try:
                    masks[..., i] = read_mask(path, size, max_side, task.soft_mask)
                except SkippedFile as bad:
                    # The mask is what is wrong, but its photograph is what is not converted:
                    # the entry names both, so no photograph disappears without a word.
                    bad.image = str(task.image)
                    raise
        serialized = records.encode_example(
            id=task.id,
            dataset=dataset,
            split=task.split,
            image=original if original is not None else rgb,
            masks=masks,
            mask_present=present,
            grade=task.grade,
            dme=task.dme,
            lossless=lossless,
        )
    except SkippedFile as skipped:
        return skipped
    except Exception as error:  # one bad example must not stop a run of thousands
        return SkippedFile(task.image, f"{type(error).__name__}: {error}", ERROR)
    nonempty = tuple(bool(masks[..., i].any()) for i in range(keys.NUM_LESIONS))
    return _Result(task, serialized, tuple(present), nonempty, (height, width))


def _worker_init() -> None:
    import signal

    # The parent handles Ctrl-C and cleans up; workers just stop when it terminates them.
    # (No OpenCV here: touching its thread pool inherited through fork deadlocks the child.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _results(tasks, convert_one, workers: int) -> Iterator:
    """Results of ``convert_one`` over ``tasks`` in task order, with at most ``4 * workers``
    tasks in flight so converted examples never pile up in memory."""
    if workers <= 1:
        for task in tasks:
            yield convert_one(task)
        return
    methods = multiprocessing.get_all_start_methods()
    # fork shares the already-imported modules (TensorFlow takes seconds to import per process).
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = context.Pool(workers, initializer=_worker_init)
    try:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(convert_one, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------------------------
# The engine


def _histogram(values: Iterable[int]) -> dict:
    counts = collections.Counter(int(v) for v in values)
    return {str(k): counts[k] for k in sorted(counts)}


def _clear_previous(out: pathlib.Path) -> None:
    from drkeras.data import records

    for path in out.iterdir():
        if path.name == records.MANIFEST or path.name.endswith((".tfrecord", ".tfrecord.tmp")):
            path.unlink()


def _write_json(path: pathlib.Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def convert_dataset(
    dataset: str,
    src,
    out,
    scan_fn: Callable[..., Scan],
    *,
    max_side: Optional[int] = None,
    workers: int = 1,
    examples_per_shard: int = 256,
    lossless: bool = False,
    splits: Optional[Iterable[str]] = None,
    limit: int = 0,
    options: Optional[Mapping[str, Any]] = None,
    quiet: bool = False,
) -> dict:
    """Convert one raw dataset into record shards plus ``manifest.json``; return the manifest.

    Args:
        dataset: name stored in every record (``"idrid"``, ``"messidor"``, ...).
        src: the raw download's root folder.
        out: output folder; previous shards and manifest in it are replaced.
        scan_fn: ``scan_fn(src, **options) -> Scan``, the dataset module's layout reader.
        max_side: cap on the long side of stored images (aspect kept); ``None`` keeps the size
            (and the original JPEG/PNG bytes).
        workers: worker processes decoding images (1 = in this process).
        examples_per_shard: records per shard file.
        lossless: store re-encoded images as PNG instead of JPEG quality 95.
        splits: convert only these splits (default: all the layout has).
        limit: at most this many examples per split (0 = all); for quick trials.
        options: dataset-specific options passed to ``scan_fn`` and recorded in the manifest.
        quiet: do not print the summary or show a progress bar.

    Returns:
        The manifest: ``dataset``, ``source``, ``options``, ``counts`` / ``grades`` / ``dme`` /
        ``lesion_coverage`` / ``flagged_counts`` / ``shards`` per split, ``total``, ``skipped``
        (file, reason, kind; ``image``: the photograph a bad mask kept out),
        ``skipped_by_kind``, ``flagged``, ``warnings``.

    Raises:
        LayoutError: ``src`` does not have the dataset's layout, or nothing could be converted.
    """
    from tqdm import tqdm

    from drkeras import keys
    from drkeras.data import records

    src = pathlib.Path(src)
    out = pathlib.Path(out)
    options = dict(options or {})
    if not src.is_dir():
        raise LayoutError(
            f"source folder {src} does not exist (expected the raw {dataset} download)"
        )
    if max_side is not None and int(max_side) < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    scan = scan_fn(src, **options)
    wanted = tuple(splits) if splits else keys.SPLITS
    unknown = [s for s in wanted if s not in keys.SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected some of {keys.SPLITS}")
    tasks = [t for t in scan.tasks if t.split in wanted]
    if limit:
        per_split = collections.Counter()
        kept = []
        for task in tasks:
            per_split[task.split] += 1
            if per_split[task.split] <= limit:
                kept.append(task)
        tasks = kept

    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    skipped = list(scan.skipped)
    flagged = []
    stats = collections.defaultdict(
        lambda: {
            "grades": [],
            "dme": [],
            "present": np.zeros(keys.NUM_LESIONS, int),
            "nonempty": np.zeros(keys.NUM_LESIONS, int),
            "flags": collections.Counter(),
        }
    )
    seen_ids = set()
    convert_one = _ConvertOne(dataset, max_side, lossless)
    with contextlib.ExitStack() as stack:
        stack.enter_context(records.terminate_as_exception())
        writers = {}
        progress = stack.enter_context(
            tqdm(total=len(tasks), desc=dataset, unit="img", disable=True if quiet else None)
        )
        results = stack.enter_context(contextlib.closing(_results(tasks, convert_one, workers)))
        for result in results:
            progress.update(1)
            if isinstance(result, SkippedFile):
                skipped.append(result.entry())
                continue
            task = result.task
            if task.id in seen_ids:
                skipped.append(
                    {"file": task.image, "reason": f"duplicate id {task.id}", "kind": DUPLICATE}
                )
                continue
            seen_ids.add(task.id)
            if task.split not in writers:
                writers[task.split] = stack.enter_context(
                    records.ShardWriter(out, task.split, examples_per_shard=examples_per_shard)
                )
            writers[task.split].write(result.serialized)
            split_stats = stats[task.split]
            split_stats["grades"].append(task.grade)
            split_stats["dme"].append(task.dme)
            split_stats["present"] += result.present
            split_stats["nonempty"] += result.nonempty
            if task.flags:
                flagged.append({"id": task.id, "file": task.image, **dict(task.flags)})
                split_stats["flags"].update(k for k, v in task.flags.items() if v)
        # Closing renames each split's last shard; had the conversion failed before this point,
        # every writer would have deleted the shards it completed (ShardWriter).
        for writer in writers.values():
            writer.close()

    order = [s for s in keys.SPLITS if s in stats]
    manifest = {
        "dataset": dataset,
        "source": str(src.resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": {
            "max_side": max_side,
            "lossless": lossless,
            "examples_per_shard": examples_per_shard,
            "workers": workers,
            "splits": list(wanted),
            "limit": limit,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        },
        "total": sum(writers[s].count for s in order),
        "counts": {s: writers[s].count for s in order},
        "grades": {s: _histogram(stats[s]["grades"]) for s in order},
        "dme": {s: _histogram(stats[s]["dme"]) for s in order},
        "lesion_coverage": {
            s: {
                lesion: {
                    "present": int(stats[s]["present"][i]),
                    "nonempty": int(stats[s]["nonempty"][i]),
                }
                for i, lesion in enumerate(keys.LESIONS)
            }
            for s in order
        },
        "flagged_counts": {s: dict(stats[s]["flags"]) for s in order},
        "shards": {s: list(writers[s].shards) for s in order},
        "skipped_by_kind": dict(collections.Counter(e["kind"] for e in skipped)),
        "skipped": skipped,
        "flagged": flagged,
        "warnings": list(scan.warnings),
    }
    _write_json(out / records.MANIFEST, manifest)
    if not quiet:
        print(summary(manifest, out))
    if manifest["total"] == 0:
        raise LayoutError(
            f"no {dataset} example could be converted from {src} "
            f"({len(skipped)} skipped; see {out / records.MANIFEST})"
        )
    return manifest


class _ConvertOne:
    """Picklable ``task -> result`` callable for the worker pool."""

    def __init__(self, dataset: str, max_side: Optional[int], lossless: bool):
        self.dataset = dataset
        self.max_side = max_side
        self.lossless = lossless

    def __call__(self, task: Task):
        return _convert_task(task, self.dataset, self.max_side, self.lossless)


def summary(manifest: dict, out=None) -> str:
    """A few lines describing a conversion: counts, grades and lesion coverage per split,
    skipped files by kind and the warnings."""
    lines = [
        f"{manifest['dataset']}: {manifest['total']} examples written"
        + (f" to {out}" if out is not None else "")
        + f", {len(manifest['skipped'])} skipped"
    ]
    for split, count in manifest["counts"].items():
        grades = " ".join(f"{g}:{n}" for g, n in manifest["grades"][split].items())
        coverage = " ".join(
            f"{lesion} {c['present']}/{c['nonempty']}"
            for lesion, c in manifest["lesion_coverage"][split].items()
            if c["present"]
        )
        flags = " ".join(f"{k}:{n}" for k, n in manifest["flagged_counts"][split].items())
        line = f"  {split:<5} {count:>6}  grades {grades}"
        if coverage:
            line += f"  masks (annotated/non-empty) {coverage}"
        if flags:
            line += f"  flagged {flags}"
        lines.append(line)
    if manifest["skipped_by_kind"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(manifest["skipped_by_kind"].items()))
        lines.append(f"  skipped: {kinds} (reasons in manifest.json)")
        for entry in manifest["skipped"][:5]:
            lines.append(f"    {entry['file']}: {entry['reason']}")
    for message in manifest["warnings"]:
        lines.append(f"  warning: {message}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def comma_list(choices: Iterable[str]) -> Callable[[str], tuple]:
    """An argparse ``type`` parsing ``"a,b"`` into ``("a", "b")``, each item one of ``choices``."""
    choices = tuple(choices)

    def parse(text: str) -> tuple:
        items = tuple(p.strip() for p in text.split(",") if p.strip())
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return items

    return parse


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every converter takes: ``--src --out --max-side --workers ...``."""
    parser.add_argument("--src", required=True, type=pathlib.Path, help="raw dataset root folder")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output records folder")
    parser.add_argument(
        "--max-side",
        type=_positive_int,
        default=None,
        help="cap the long image side at N pixels (aspect kept; default: keep the size)",
    )
    parser.add_argument("--workers", type=_positive_int, default=1, help="worker processes")
    parser.add_argument(
        "--examples-per-shard", type=_positive_int, default=256, help="records per shard file"
    )
    parser.add_argument(
        "--lossless", action="store_true", help="store re-encoded images as PNG, not JPEG q95"
    )
    parser.add_argument(
        "--splits",
        type=comma_list(("train", "val", "test")),
        default=None,
        help="comma-separated splits to convert (default: all of train,val,test found)",
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="at most N examples per split (0 = all)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run_command(convert: Callable[..., dict], args: argparse.Namespace, **options) -> int:
    """Run a dataset module's ``convert`` from parsed arguments; return the exit status.

    A wrong layout or an empty result prints the reason to stderr and returns 2. Layout
    warnings are printed as they happen (one line each) and again in the final summary.
    """

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LayoutWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    default_show = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", LayoutWarning)
            warnings.showwarning = show
            _call_convert(convert, args, options)
    except LayoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _call_convert(convert: Callable[..., dict], args: argparse.Namespace, options: dict) -> dict:
    return convert(
        args.src,
        args.out,
        max_side=args.max_side,
        workers=args.workers,
        examples_per_shard=args.examples_per_shard,
        lossless=args.lossless,
        splits=args.splits,
        limit=args.limit,
        quiet=args.quiet,
        **options,
    )


def split_from_name(name: str) -> Optional[str]:
    """Map a folder or file name to a split: ``'a. Training Set'`` -> ``'train'``,
    ``'valid'`` -> ``'val'``, ``'IDRiD_Disease Grading_Testing Labels.csv'`` -> ``'test'``;
    ``None`` if none matches.

    Example::

        >>> split_from_name("segmentation label/valid"), split_from_name("b. Testing Set")
        ('val', 'test')
    """
    name = norm_name(name)
    # Not \b: "_" is a word character and IDRiD writes "Grading_Training".
    for split, pattern in (("train", "train"), ("val", "val"), ("test", "test")):
        if re.search(rf"(?<![a-z]){pattern}", name):
            return split
    return None


def lookup(index: Mapping[str, pathlib.Path], name: str) -> Optional[pathlib.Path]:
    """Find a listed image name in an :func:`index_images` map (exact name, then stem)."""
    key = str(name).strip().lower()
    return index.get(key) or index.get(pathlib.PurePath(key).stem)


def unique_paths(index: Mapping[str, pathlib.Path]) -> list:
    """The distinct files of an :func:`index_images` map, sorted."""
    return sorted(set(index.values()))


def add_labeled_images(
    scan: Scan,
    table,
    index: Mapping[str, pathlib.Path],
    *,
    split: str,
    name_column: str,
    label_file: pathlib.Path,
    image_dir: pathlib.Path,
    make_id: Callable[[pathlib.Path], str],
    parse_row: Callable[[int, Any], dict],
    expected_suffix: str = ".jpg",
    report_unlisted: bool = True,
) -> set:
    """Turn the rows of a label table into tasks; the shared part of every grading converter.

    Each row's image is looked up in ``index``; a listed image that is absent, a row whose labels
    do not parse (``parse_row`` raises :class:`SkippedFile`) and, when ``report_unlisted``, an
    image on disk that the table does not list are recorded as skipped with a reason naming the
    file and what was expected.

    Args:
        scan: collects tasks and skipped files.
        table: a frame from :func:`read_csv_table` / :func:`read_excel_table`.
        index: :func:`index_images` of ``image_dir``.
        split: split of the tasks.
        name_column: column holding the image name (with or without extension).
        label_file: the table's file, for messages.
        image_dir: the images folder, for messages.
        make_id: image path -> example id.
        parse_row: ``(row_number, row) -> dict`` of :class:`Task` fields (``grade``, ``dme``,
            ``flags``); raises :class:`SkippedFile` for a bad row.
        expected_suffix: the extension named in "not found" messages when the table omits it.
        report_unlisted: skip-and-count images that the table does not list.

    Returns:
        The set of image paths the table lists (converted or skipped for a bad label).
    """
    listed = set()
    for row_number, row in table.iterrows():
        name = row[name_column]
        path = lookup(index, name)
        if path is not None:
            listed.add(path)
        try:
            fields = parse_row(row_number, row)
        except SkippedFile as bad:
            scan.skip(bad.file, bad.reason, bad.kind, split)
            continue
        if path is None:
            expected = name if pathlib.PurePath(name).suffix else name + expected_suffix
            scan.skip(
                image_dir / expected,
                f"listed in {label_file.name} row {row_number} but not found in {image_dir}",
                MISSING,
                split,
            )
            continue
        scan.tasks.append(Task(id=make_id(path), split=split, image=str(path), **fields))
    if report_unlisted:
        for path in unique_paths(index):
            if path not in listed:
                scan.skip(path, f"image not listed in {label_file}", UNLABELED, split)
    return listed
