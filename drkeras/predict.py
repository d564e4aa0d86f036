"""Grade photographs and map their lesions with an exported model: ``python -m drkeras.predict``.

Usage::

    python -m drkeras.predict --model runs/pldmlt_smoke/export/pldmlt \\
        --images photos/ extra/IDRiD_55.jpg --out predictions/

``--images`` takes files and folders (searched recursively for ``.jpg .jpeg .png .tif .tiff
.bmp``); the model is a SavedModel written by :func:`drkeras.export.export_model`, whose serving
signature applies the training preprocessing (FOV crop, resize, normalisation) itself. Writes to
``--out``:

- ``predictions.csv``: one row per image: ``image``, ``width``, ``height``, ``quality``
  (``ok`` or the input-quality flags of :mod:`drkeras.data.quality` joined by ``;``:
  ``truncated``, ``bit_depth_converted``, ``too_small``, ``no_fov``, ``uniform``, ``no_colour``),
  ``fov_fraction`` (the share of the photograph in the detected field of view); with a
  ``grade_probs`` output the predicted ``grade``, its ``grade_name`` (ICDRS names for 5 grades)
  and the probabilities ``p_grade_0 ... p_grade_{G-1}``; with ``patch_logits`` the image score
  ``sum_j sigmoid(l_j)`` of Lecouat et al. 2018; every other vector output as ``<name>_<i>``
  columns (``<name>`` alone for a single value);
- ``maps/<image>/<output>_<channel>.png``: each dense probability output (``lesion_probs``,
  ``seg_probs``, ``attention``, ...; background channels skipped) as an 8-bit grey image
  (255 = probability 1) in the photograph's own pixel grid: the model's map covers the
  field-of-view crop, so it is mapped back onto that box (zero outside);
  ``patch_logits`` gives ``patch_scores.png`` (``sigmoid`` of each patch, nearest-neighbour);
- ``overlays/<image>.png``: the photograph with every lesion channel at or above
  ``--threshold`` painted in its colour (:data:`LESION_COLORS`), under a caption with the grade
  and the colour legend; a flagged photograph gets a third caption line in
  :data:`WARNING_COLOR` naming its flags;
- ``skipped.csv`` (``image``, ``reason``, ``flags``): files that could not be read as images
  (flag ``unreadable``) or on which the model failed (``model_error``), and with ``--strict``
  the photographs with any quality flag, which are then not graded at all (skipped, never
  fatal).

Everything is written to a temporary folder inside ``--out`` and moved into place at the end,
so an interrupted or failed run leaves no partial output. A progress bar counts the images.
Exit code 0 when at least one image was predicted, 2 on bad arguments (no such model or path,
no image found, nothing readable or, with ``--strict``, nothing that passed the checks).

Example (Python)::

    result = predict("runs/x/export/mtunet", ["photos/"], "predictions/")
    result["table"][["image", "grade", "p_grade_2"]]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import cv2
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from drkeras import keys, metrics
from drkeras.data import quality
from drkeras.export import load_exported, uncrop_dense

__all__ = [
    "IMAGE_SUFFIXES",
    "LESION_COLORS",
    "StagedOutput",
    "find_images",
    "main",
    "map_to_photo",
    "overlay",
    "predict",
    "read_image",
    "read_photo",
]

log = logging.getLogger("drkeras")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# RGB colours of lesion channels in overlays; channels with other names cycle through PALETTE.
LESION_COLORS = {
    "MA": (230, 25, 75),
    "HE": (245, 130, 48),
    "EX": (255, 225, 25),
    "SE": (70, 240, 240),
    "OD": (60, 180, 75),
    "red": (230, 25, 75),
    "yellow": (255, 225, 25),
    "optic_disc": (60, 180, 75),
}
PALETTE = ((240, 50, 230), (0, 130, 200), (210, 245, 60), (170, 110, 40), (128, 0, 0))
OVERLAY_ALPHA = 0.6
# RGB colour of the quality warning line of an overlay's caption (no lesion colour uses it).
WARNING_COLOR = (200, 0, 0)
UNREADABLE = "unreadable"
MODEL_ERROR = "model_error"
SKIPPED_COLUMNS = ["image", "reason", "flags"]


def find_images(paths: Sequence) -> List[pathlib.Path]:
    """The image files named by ``paths``: files as given, folders searched recursively.

    Raises:
        FileNotFoundError: a path does not exist.

    Example::

        find_images(["photos/", "extra/a.jpg"])   # sorted files of photos/, then extra/a.jpg
    """
    found: List[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"--images {raw}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def read_photo(path) -> Tuple[bytes, np.ndarray]:
    """An image file's bytes and its pixels as uint8 RGB ``[H, W, 3]`` (16-bit and grey images
    converted: :func:`drkeras.data.quality.assess` flags that).

    Raises:
        ValueError: naming the file, when it cannot be read or is not a readable image.
    """
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the file ({err.strerror or err})") from err
    expected = "expected a JPEG, PNG, TIFF or BMP photograph"
    if not data:
        raise ValueError(f"{path}: not a readable image (empty file; {expected})")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:  # e.g. a header announcing an absurd size
        raise ValueError(f"{path}: not a readable image ({expected}; {err.err})") from err
    if image is None or image.size == 0:
        raise ValueError(f"{path}: not a readable image ({expected})")
    return data, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]`` (16-bit and grey images converted).

    Raises:
        ValueError: naming the file, when it is not a readable image.
    """
    return read_photo(path)[1]


def _fov_box(image: np.ndarray, fov_crop: bool) -> Tuple[int, int, int, int]:
    from drkeras.data import preprocess

    if not fov_crop:
        return 0, 0, image.shape[0], image.shape[1]
    return tuple(int(v) for v in preprocess.fov_box(image).numpy())


def map_to_photo(
    prob_map: np.ndarray,
    box: Sequence[int],
    photo_hw: Tuple[int, int],
    *,
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Undo the crop-and-resize of ``drkeras.data.preprocess.crop_and_resize`` on a map.

    The model saw the box ``(y0, x0, y1, x1)`` of the photograph with its long side scaled to
    the input size ``S`` and the short side zero-padded, centred, to ``S x S``. This takes the
    padded square map ``[S', S', C]`` (any ``S'``: dense outputs may be smaller than the input),
    cuts the part that shows the box, resizes it to the box and places it on a zero photograph.

    Args:
        prob_map: ``[S', S']`` or ``[S', S', C]`` float map.
        box: the box used by the preprocessing (``fov_box`` of the photograph, or the whole
            frame without FOV cropping).
        photo_hw: the photograph's ``(height, width)``.
        interpolation: an OpenCV interpolation flag.

    Returns:
        float32 ``[H, W]`` or ``[H, W, C]``.

    Example::

        >>> m = np.zeros((4, 4), np.float32); m[1:3, :] = 1.0  # a 2 x 4 box padded to 4 x 4
        >>> map_to_photo(m, (0, 0, 2, 4), (3, 4), interpolation=cv2.INTER_NEAREST).tolist()
        [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    prob_map = np.asarray(prob_map, np.float32)
    y0, x0, y1, x1 = (int(v) for v in box)
    ch, cw = y1 - y0, x1 - x0
    size = prob_map.shape[0]
    scale = size / max(ch, cw, 1)
    new_h = min(max(int(round(ch * scale)), 1), size)
    new_w = min(max(int(round(cw * scale)), 1), size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    part = prob_map[top : top + new_h, left : left + new_w]
    resized = cv2.resize(part, (cw, ch), interpolation=interpolation)
    if prob_map.ndim == 3 and resized.ndim == 2:  # OpenCV drops a single channel
        resized = resized[..., None]
    out = np.zeros(tuple(photo_hw) + prob_map.shape[2:], np.float32)
    out[y0:y1, x0:x1] = resized
    return out


def _color(name: str, index: int) -> Tuple[int, int, int]:
    return LESION_COLORS.get(name, PALETTE[index % len(PALETTE)])


def overlay(
    photo: np.ndarray,
    channel_maps: Sequence[Tuple[str, np.ndarray]],
    *,
    threshold: float = 0.5,
    caption: str = "",
    warning: str = "",
) -> np.ndarray:
    """The photograph with lesion channels at or above ``threshold`` painted over it.

    Args:
        photo: uint8 RGB ``[H, W, 3]``.
        channel_maps: ``(channel name, [H, W] probabilities)`` in drawing order.
        threshold: probability from which a pixel is painted.
        caption: text of the banner above the image (the legend follows it).
        warning: a third banner line in :data:`WARNING_COLOR` (the quality flags), or none.

    Returns:
        uint8 RGB ``[H + banner, W, 3]``; each painted pixel is ``(1 - 0.6) * photo + 0.6 *
        colour`` (:data:`LESION_COLORS`).
    """
    out = photo.astype(np.float32)
    for index, (name, prob) in enumerate(channel_maps):
        mask = prob >= threshold
        out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * np.float32(
            _color(name, index)
        )
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    width = photo.shape[1]
    font_scale = max(width / 1200.0, 0.35)
    line = int(math.ceil(28 * font_scale)) + 6
    banner = np.full(((3 if warning else 2) * line, width, 3), 255, np.uint8)
    text_y = line - 8
    cv2.putText(banner, caption, (6, text_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1)
    if warning:
        cv2.putText(
            banner,
            warning,
            (6, 2 * line + text_y),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            WARNING_COLOR,
            1,
        )
    x = 6
    for index, (name, _) in enumerate(channel_maps):
        color = _color(name, index)
        y = line + text_y
        cv2.rectangle(banner, (x, y - line // 2), (x + line // 2, y), color, -1)
        label = keys.LESION_NAMES.get(name, name)
        cv2.putText(
            banner,
            label,
            (x + line // 2 + 4, y),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (0, 0, 0),
            1,
        )
        (text_w, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        x += line // 2 + text_w + 16
    return np.concatenate([banner, out], axis=0)


def _write_png(path: pathlib.Path, rgb_or_grey: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rgb_or_grey
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def _dense_channels(meta: dict) -> Dict[str, List[Tuple[int, str, bool]]]:
    """``{output: [(channel index, channel name, is a lesion channel)]}`` of dense outputs."""
    out = {}
    for name, info in meta["outputs"].items():
        shape = info["shape"]
        if len(shape) != 4 or name.endswith("logits"):
            continue
        spec = info.get("channels")
        if spec:
            chans = [(i, str(c), True) for i, (c, sources) in enumerate(spec) if sources]
        else:
            chans = [(i, f"{name}_{i}" if shape[-1] > 1 else name, False) for i in range(shape[-1])]
        if chans:
            out[name] = chans
    return out


def _unique_names(files: Sequence[pathlib.Path]) -> List[str]:
    seen: Dict[str, int] = {}
    names = []
    for path in files:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _row(path, image, assessment, pred: Dict[str, np.ndarray], outputs: Sequence[str], dense):
    row = {
        "image": str(path),
        "width": image.shape[1],
        "height": image.shape[0],
        "quality": assessment.text,
        "fov_fraction": round(assessment.measures["fov_fraction"], 4),
    }
    for name in outputs:
        if name in dense:
            continue
        value = np.asarray(pred[name], np.float64)
        if name == keys.GRADE_PROBS:
            grade = int(np.argmax(value))
            row["grade"] = grade
            names = keys.GRADE_NAMES if value.size == keys.NUM_GRADES else ()
            row["grade_name"] = names[grade] if names else str(grade)
            row.update({f"p_grade_{k}": float(p) for k, p in enumerate(value.ravel())})
        elif name == keys.PATCH_LOGITS:
            row["image_score"] = float(metrics.image_scores_from_patches(value[None])[0])
        elif value.size == 1:
            row[name] = float(value.ravel()[0])
        else:
            row.update({f"{name}_{k}": float(v) for k, v in enumerate(value.ravel())})
    return row


def _skip(skipped: list, path, reason: str, flags: str) -> None:
    log.warning("skipped %s", reason if reason.startswith(str(path)) else f"{path}: {reason}")
    skipped.append({"image": str(path), "reason": reason, "flags": flags})


def _batches(files, batch_size: int, skipped: list, strict: bool):
    """Consecutive readable (with ``strict``: unflagged) photographs of the same size,
    ``batch_size`` at most per batch, as ``(batch, number of files skipped)``; each item is
    ``(index, path, image, assessment)``."""
    batch: list = []
    for index, path in enumerate(files):
        try:
            data, image = read_photo(path)
        except ValueError as err:
            _skip(skipped, path, str(err), UNREADABLE)
            yield [], 1
            continue
        assessment = quality.assess(data, image)
        if strict and not assessment.ok:
            _skip(
                skipped,
                path,
                f"{path}: quality flags (--strict): {quality.describe(assessment)}",
                assessment.text,
            )
            yield [], 1
            continue
        if batch and (len(batch) >= batch_size or image.shape != batch[0][2].shape):
            yield batch, 0
            batch = []
        batch.append((index, path, image, assessment))
    if batch:
        yield batch, 0


def _model_error(err: Exception) -> str:
    text = getattr(err, "message", None) or str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _predict_each(exported, batch) -> list:
    """Per photograph of ``batch``: ``{output: value}``, or the error the model raised on it
    (a failing batch is retried image by image, so one bad photograph costs only itself)."""
    errors = (tf.errors.OpError, ValueError)
    try:
        pred = exported.predict(np.stack([item[2] for item in batch]))
        return [{k: v[i] for k, v in pred.items()} for i in range(len(batch))]
    except errors as err:
        if len(batch) == 1:
            return [err]
    out = []
    for item in batch:
        try:
            pred = exported.predict(item[2][None])
            out.append({k: v[0] for k, v in pred.items()})
        except errors as err:
            out.append(err)
    return out


class StagedOutput:
    """Outputs written under ``<out>/.<prefix>-<pid>.tmp`` and moved into ``out`` on
    :meth:`commit`; :meth:`discard` (on any failure) deletes them, leaving ``out`` as it was:
    an interrupted or failed run leaves no partial output (``drkeras.evaluate`` uses it too).

    Example::

        staged = StagedOutput(pathlib.Path("out"), "predict")
        staged.path("maps/a/x.png").write_bytes(png)   # out/.predict-<pid>.tmp/maps/a/x.png
        staged.commit()                                 # now out/maps/a/x.png
    """

    def __init__(self, out: pathlib.Path, prefix: str):
        self.out = pathlib.Path(out)
        self.root = self.out / f".{prefix}-{os.getpid()}.tmp"
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.files: List[pathlib.PurePath] = []

    def path(self, relative) -> pathlib.Path:
        """Where to write the output ``relative`` (to ``out``) now (its folder is created);
        remembered for :meth:`commit`."""
        self.files.append(pathlib.PurePath(relative))
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, remove=()) -> None:
        """Move every staged file into ``out`` (replacing older ones) and delete ``remove``
        (outputs of an earlier run that this run does not write, e.g. its ``skipped.csv``)."""
        for relative in remove:
            (self.out / relative).unlink(missing_ok=True)
        for relative in self.files:
            target = self.out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / relative, target)
        shutil.rmtree(self.root, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _write_csv(path: pathlib.Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, lineterminator="\n")


def predict(
    model_path,
    images: Sequence,
    out_dir,
    *,
    batch_size: int = 8,
    threshold: float = 0.5,
    maps: bool = True,
    overlays: bool = True,
    progress: bool = True,
    strict: bool = False,
) -> Dict[str, object]:
    """Run an exported model on image files and write the CSV, maps and overlays (module doc).

    Args:
        model_path: SavedModel folder from :func:`drkeras.export.export_model`.
        images: files and folders (see :func:`find_images`).
        out_dir: output folder (created).
        batch_size: images per serving call (consecutive images of equal size are batched).
        threshold: probability from which overlays paint a lesion pixel.
        maps, overlays: write the probability maps / the overlays.
        progress: show a tqdm progress bar.
        strict: skip photographs with any quality flag (:mod:`drkeras.data.quality`) into
            ``skipped.csv`` instead of grading them.

    Returns:
        ``{"table": DataFrame of predictions.csv, "csv": path, "skipped": [{"image", "reason",
        "flags"}], "maps": [paths], "overlays": [paths]}``.

    Raises:
        FileNotFoundError: no such model or image path, or no image file found.
        ValueError: no file could be read as an image (or, with ``strict``, none passed the
            quality checks); ``skipped.csv`` says why for each.
    """
    out = pathlib.Path(out_dir)
    files = find_images(images)
    if not files:
        raise FileNotFoundError(
            f"--images {' '.join(map(str, images))}: no image files found (looked for "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    exported = load_exported(model_path)
    out.mkdir(parents=True, exist_ok=True)
    staging = StagedOutput(out, "predict")
    try:
        result = _predict_files(
            exported, files, staging, batch_size, threshold, maps, overlays, progress, strict
        )
    except BaseException:
        staging.discard()
        raise
    rows, skipped, map_paths, overlay_paths = result
    if not rows:
        # skipped.csv is complete (every file is in it): keep it, drop older predictions.
        staging.commit(remove=["predictions.csv"])
        what = "passed the quality checks (--strict)" if strict else "could be read as an image"
        raise ValueError(f"none of the {len(files)} file(s) {what}; see {out / 'skipped.csv'}")
    table = pd.DataFrame(rows)
    _write_csv(staging.path("predictions.csv"), table)
    staging.commit(remove=[] if skipped else ["skipped.csv"])
    csv_path = out / "predictions.csv"
    flagged = int((table["quality"] != quality.OK).sum())
    log.info(
        "predicted %d image(s) (%d with quality flags, %d skipped); %s, maps and overlays in %s",
        len(rows),
        flagged,
        len(skipped),
        csv_path,
        out,
    )
    return {
        "table": table,
        "csv": csv_path,
        "skipped": skipped,
        "maps": map_paths,
        "overlays": overlay_paths,
    }


def _predict_files(
    exported, files, staging, batch_size, threshold, maps, overlays, progress, strict
):
    meta = exported.meta
    fov_crop = bool(meta["preprocess"].get("fov_crop", True))
    dense = _dense_channels(meta)
    patches = keys.PATCH_LOGITS in exported.output_names
    names = _unique_names(files)
    rows, skipped, map_paths, overlay_paths = [], [], [], []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for batch, n_skipped in _batches(files, batch_size, skipped, strict):
        bar.update(n_skipped)
        if not batch:
            continue
        for (index, path, image, assessment), pred in zip(batch, _predict_each(exported, batch)):
            if isinstance(pred, Exception):
                reason = f"{path}: the model failed on it: {_model_error(pred)}"
                _skip(skipped, path, reason, MODEL_ERROR)
                continue
            row = _row(path, image, assessment, pred, exported.output_names, dense)
            rows.append(row)
            if not (maps or overlays):
                continue
            box = _fov_box(image, fov_crop)
            hw = image.shape[:2]
            lesion_maps = []
            for output, chans in dense.items():
                full = map_to_photo(uncrop_dense(pred[output], meta), box, hw)
                for c, cname, is_lesion in chans:
                    if maps:
                        relative = pathlib.PurePath("maps", names[index], f"{output}_{cname}.png")
                        grey = np.round(np.clip(full[..., c], 0.0, 1.0) * 255).astype(np.uint8)
                        _write_png(staging.path(relative), grey)
                        map_paths.append(staging.out / relative)
                    if is_lesion:
                        lesion_maps.append((cname, full[..., c]))
            if patches and maps:
                scores = _sigmoid(np.squeeze(pred[keys.PATCH_LOGITS])).astype(np.float32)
                # The patch grid tiles the model's square input.
                side = exported.image_size
                grid = cv2.resize(scores, (side, side), interpolation=cv2.INTER_NEAREST)
                full = map_to_photo(
                    uncrop_dense(grid, meta), box, hw, interpolation=cv2.INTER_NEAREST
                )
                relative = pathlib.PurePath("maps", names[index], "patch_scores.png")
                _write_png(staging.path(relative), np.round(full * 255).astype(np.uint8))
                map_paths.append(staging.out / relative)
            if overlays:
                caption = path.name
                if "grade" in row:
                    grade = row["grade"]
                    caption += (
                        f"  grade {grade} ({row['grade_name']}), p = {row[f'p_grade_{grade}']:.2f}"
                    )
                warning = "" if assessment.ok else f"QUALITY: {assessment.text} - do not trust"
                relative = pathlib.PurePath("overlays", f"{names[index]}.png")
                painted = overlay(
                    image, lesion_maps, threshold=threshold, caption=caption, warning=warning
                )
                _write_png(staging.path(relative), painted)
                overlay_paths.append(staging.out / relative)
        bar.update(len(batch))
    bar.close()
    if skipped:
        _write_csv(staging.path("skipped.csv"), pd.DataFrame(skipped, columns=SKIPPED_COLUMNS))
    return rows, skipped, map_paths, overlay_paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.predict",
        description="Grade fundus photographs and map their lesions with an exported model.",
    )
    parser.add_argument("--model", required=True, help="SavedModel folder written by export")
    parser.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="image files and/or folders"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8, help="images per serving call")
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="probability painted in overlays"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="skip photographs with any quality flag into skipped.csv instead of grading them",
    )
    parser.add_argument("--no-maps", action="store_true", help="do not write probability maps")
    parser.add_argument("--no-overlays", action="store_true", help="do not write overlays")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    drkeras.startup.add_verbose_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad arguments or inputs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        result = predict(
            args.model,
            args.images,
            args.out,
            batch_size=args.batch_size,
            threshold=args.threshold,
            maps=not args.no_maps,
            overlays=not args.no_overlays,
            progress=not args.no_progress,
            strict=args.strict,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = result["table"]
    print(f"{len(table)} image(s) predicted; table: {result['csv']}")
    flagged = table[table["quality"] != quality.OK]
    if len(flagged):
        print(f"{len(flagged)} with quality flags (see the quality column):")
        for _, row in flagged.iterrows():
            print(f"  {row['image']}: {row['quality']}")
    if result["skipped"]:
        print(f"{len(result['skipped'])} file(s) skipped: {pathlib.Path(args.out) / 'skipped.csv'}")
    return 0


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    raise SystemExit(main())
