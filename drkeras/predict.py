"""Grade photographs and map their lesions with an exported model: ``python -m drkeras.predict``.

Usage::

    python -m drkeras.predict --model runs/pldmlt_smoke/export/pldmlt \\
        --images photos/ extra/IDRiD_55.jpg --out predictions/

``--images`` takes files and folders (searched recursively for ``.jpg .jpeg .png .tif .tiff
.bmp``); the model is a SavedModel written by :func:`drkeras.export.export_model`, whose serving
signature applies the training preprocessing (FOV crop, resize, normalisation) itself. Writes to
``--out``:

- ``predictions.csv``: one row per image: ``image``, ``width``, ``height``; with a
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
  and the colour legend;
- ``skipped.csv``: files that could not be read as images, with the reason (they are skipped,
  never fatal).

A progress bar counts the images. Exit code 0 when at least one image was predicted, 2 on bad
arguments (no such model or path, no image found, nothing readable).

Example (Python)::

    result = predict("runs/x/export/mtunet", ["photos/"], "predictions/")
    result["table"][["image", "grade", "p_grade_2"]]
"""

from __future__ import annotations

import argparse
import logging
import math
import pathlib
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from drkeras import keys, metrics
from drkeras.export import load_exported, uncrop_dense

__all__ = [
    "IMAGE_SUFFIXES",
    "LESION_COLORS",
    "find_images",
    "main",
    "map_to_photo",
    "overlay",
    "predict",
    "read_image",
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


def read_image(path) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]`` (16-bit and grey images converted).

    Raises:
        ValueError: naming the file, when it is not a readable image.
    """
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(
            f"{path}: not a readable image (expected a JPEG, PNG, TIFF or BMP photograph)"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


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
) -> np.ndarray:
    """The photograph with lesion channels at or above ``threshold`` painted over it.

    Args:
        photo: uint8 RGB ``[H, W, 3]``.
        channel_maps: ``(channel name, [H, W] probabilities)`` in drawing order.
        threshold: probability from which a pixel is painted.
        caption: text of the banner above the image (the legend follows it).

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
    banner = np.full((2 * line, width, 3), 255, np.uint8)
    text_y = line - 8
    cv2.putText(banner, caption, (6, text_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1)
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


def _row(path, image, pred: Dict[str, np.ndarray], i: int, outputs: Sequence[str], dense) -> dict:
    row = {"image": str(path), "width": image.shape[1], "height": image.shape[0]}
    for name in outputs:
        if name in dense:
            continue
        value = np.asarray(pred[name][i], np.float64)
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


def _batches(files, batch_size: int, skipped: list):
    """Consecutive readable images of the same size, ``batch_size`` at most per batch."""
    batch: List[Tuple[int, pathlib.Path, np.ndarray]] = []
    for index, path in enumerate(files):
        try:
            image = read_image(path)
        except ValueError as err:
            log.warning("skipped %s", err)
            skipped.append({"image": str(path), "reason": str(err)})
            yield [], 1
            continue
        if batch and (len(batch) >= batch_size or image.shape != batch[0][2].shape):
            yield batch, 0
            batch = []
        batch.append((index, path, image))
    if batch:
        yield batch, 0


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

    Returns:
        ``{"table": DataFrame of predictions.csv, "csv": path, "skipped": [{"image", "reason"}],
        "maps": [paths], "overlays": [paths]}``.

    Raises:
        FileNotFoundError: no such model or image path, or no image file found.
        ValueError: no file could be read as an image.
    """
    out = pathlib.Path(out_dir)
    files = find_images(images)
    if not files:
        raise FileNotFoundError(
            f"--images {' '.join(map(str, images))}: no image files found (looked for "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    exported = load_exported(model_path)
    meta = exported.meta
    fov_crop = bool(meta["preprocess"].get("fov_crop", True))
    dense = _dense_channels(meta)
    patches = keys.PATCH_LOGITS in exported.output_names
    names = _unique_names(files)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped, map_paths, overlay_paths = [], [], [], []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for batch, n_skipped in _batches(files, batch_size, skipped):
        bar.update(n_skipped)
        if not batch:
            continue
        pred = exported.predict(np.stack([image for _, _, image in batch]))
        for i, (index, path, image) in enumerate(batch):
            row = _row(path, image, pred, i, exported.output_names, dense)
            rows.append(row)
            if not (maps or overlays):
                continue
            box = _fov_box(image, fov_crop)
            hw = image.shape[:2]
            lesion_maps = []
            for output, chans in dense.items():
                full = map_to_photo(uncrop_dense(pred[output][i], meta), box, hw)
                for c, cname, is_lesion in chans:
                    if maps:
                        path_png = out / "maps" / names[index] / f"{output}_{cname}.png"
                        grey = np.round(np.clip(full[..., c], 0.0, 1.0) * 255).astype(np.uint8)
                        _write_png(path_png, grey)
                        map_paths.append(path_png)
                    if is_lesion:
                        lesion_maps.append((cname, full[..., c]))
            if patches and maps:
                scores = _sigmoid(np.squeeze(pred[keys.PATCH_LOGITS][i])).astype(np.float32)
                # The patch grid tiles the model's square input.
                side = exported.image_size
                grid = cv2.resize(scores, (side, side), interpolation=cv2.INTER_NEAREST)
                full = map_to_photo(
                    uncrop_dense(grid, meta), box, hw, interpolation=cv2.INTER_NEAREST
                )
                path_png = out / "maps" / names[index] / "patch_scores.png"
                _write_png(path_png, np.round(full * 255).astype(np.uint8))
                map_paths.append(path_png)
            if overlays:
                caption = path.name
                if "grade" in row:
                    grade = row["grade"]
                    caption += (
                        f"  grade {grade} ({row['grade_name']}), p = {row[f'p_grade_{grade}']:.2f}"
                    )
                path_png = out / "overlays" / f"{names[index]}.png"
                _write_png(
                    path_png, overlay(image, lesion_maps, threshold=threshold, caption=caption)
                )
                overlay_paths.append(path_png)
        bar.update(len(batch))
    bar.close()
    if skipped:
        pd.DataFrame(skipped, columns=["image", "reason"]).to_csv(
            out / "skipped.csv", index=False, lineterminator="\n"
        )
    if not rows:
        raise ValueError(
            f"none of the {len(files)} file(s) could be read as an image; see {out / 'skipped.csv'}"
        )
    table = pd.DataFrame(rows)
    csv_path = out / "predictions.csv"
    table.to_csv(csv_path, index=False, lineterminator="\n")
    log.info(
        "predicted %d image(s) (%d skipped); %s, maps and overlays in %s",
        len(rows),
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
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(result['table'])} image(s) predicted; table: {result['csv']}")
    if result["skipped"]:
        print(f"{len(result['skipped'])} file(s) skipped: {pathlib.Path(args.out) / 'skipped.csv'}")
    return 0


if __name__ == "__main__":
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    raise SystemExit(main())
