"""Section 1, input pipeline: records -> decoded, preprocessed, augmented 512 x 512 batches.

``python -m benchmarks.pipeline --out DIR`` (or as part of ``python -m benchmarks``).

The same synthetic photographs (JPEG, with lesion masks as PNG files) are read three ways, per
source size and task:

- ``python_loop``: the plain loop a researcher writes without ``tf.data``: OpenCV decode, NumPy
  field-of-view crop, OpenCV area resize, one OpenCV affine warp (flips, rotation, zoom) shared by
  image and masks, a NumPy brightness/contrast jitter, normalisation, ``np.stack`` per batch;
  one process;
- ``tf_data``: :func:`drkeras.data.pipeline.grading_dataset` / ``segmentation_dataset`` from
  records holding the very same bytes, no cache: decode, FOV crop, resize, paired augmentation,
  normalisation, parallel maps, prefetch (what every epoch costs when the decoded dataset does
  not fit in memory, e.g. EyePACS);
- ``tf_data_cached``: the same with ``cache=True`` after the first epoch filled the cache at
  training size (every epoch but the first of a multi-epoch run).

Sources: ``idrid_full`` = IDRiD-size JPEGs (4288 x 2848, ~400 KB, what ``data_prep`` stores by
default) and ``max_side_1024`` = the same converted with ``--max-side 1024`` (1024 x 680).
Tasks: ``grading`` (image only) and ``segmentation`` (image + the five lesion masks).

Each round times ``images`` images (whole batches) of each way in turn, each from a fresh iterator
after one untimed warm-up batch (thread pools start, autotuning settles); the cached pipeline's
cache is filled once before the rounds. Medians over the rounds are reported.

Goal (issue 8): ``tf.data`` at least 3x the loop.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from typing import Optional, Sequence

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import cv2
import numpy as np

from benchmarks import common

__all__ = ["CASES", "SOURCES", "TASKS", "pipeline_rate", "prepare_inputs", "run"]

# source name -> photograph height (IDRiD's Kowa camera, width 4288/2848 of the height)
SOURCES = {"idrid_full": 2848, "max_side_1024": 680}
TASKS = ("grading", "segmentation")
# Segmentation datasets are small and converted with --max-side (README), so their full-size
# case is left out of the default run.
CASES = ("idrid_full/grading", "max_side_1024/grading", "max_side_1024/segmentation")
_IDRID_JPEG_BYTES = 450_000  # real IDRiD JPEGs are 246-429 KB
_INPUTS_FORMAT = 1


def prepare_inputs(folder: pathlib.Path, n: int, height: int, seed: int = 0) -> dict:
    """Write ``n`` photographs (JPEG) with their non-empty masks (PNG, 0/255) into
    ``folder/raw`` and the same bytes as records into ``folder/records``; reused when a
    previous call wrote the same inputs. Returns ``{"images": [paths], "masks": [{lesion:
    path}], "records": dir}``.

    Example: ``prepare_inputs(pathlib.Path("/tmp/p"), n=2, height=64)["records"]``.
    """
    import tensorflow as tf

    from drkeras import keys
    from drkeras.data import records

    folder = pathlib.Path(folder)
    stamp = folder / "inputs.json"
    wanted = {"format": _INPUTS_FORMAT, "n": n, "height": height, "seed": seed}
    raw, record_dir = folder / "raw", folder / "records"
    if stamp.is_file() and json.loads(stamp.read_text()) == {**wanted, "complete": True}:
        images = sorted(raw.glob("photo_*.jpg"))
        masks = [
            {k: p for k in keys.LESIONS if (p := raw / f"{img.stem}_{k}.png").is_file()}
            for img in images
        ]
        return {"images": images, "masks": masks, "records": record_dir}
    shutil.rmtree(folder, ignore_errors=True)  # no stale shard of another n may remain
    images, masks = [], []
    raw.mkdir(parents=True, exist_ok=True)
    with records.ShardWriter(record_dir, "train", examples_per_shard=8) as writer:
        for i in range(n):
            image, lesion_masks, grade = common.synthetic_photo(seed + i, height)
            path = raw / f"photo_{i:03d}.jpg"
            common.write_jpeg(path, image, max_bytes=_IDRID_JPEG_BYTES if height > 2000 else None)
            blob = records.encode_example(
                id=f"bench-train-{i:03d}",
                dataset="bench",
                split="train",
                image=path.read_bytes(),  # the very bytes the loop decodes
                masks=lesion_masks,
                mask_present=[True] * keys.NUM_LESIONS,
                grade=grade,
            )
            writer.write(blob)
            stored = tf.train.Example.FromString(blob).features.feature[keys.MASKS]
            found = {}
            for lesion, png in zip(keys.LESIONS, stored.bytes_list.value):
                if png:  # records store an empty mask as an empty string, IDRiD as no file
                    found[lesion] = raw / f"{path.stem}_{lesion}.png"
                    found[lesion].write_bytes(png)
            images.append(path)
            masks.append(found)
    stamp.write_text(json.dumps({**wanted, "complete": True}))
    return {"images": images, "masks": masks, "records": record_dir}


# --------------------------------------------------------------------------------------------
# The plain loop


def _fov_crop_box(image: np.ndarray) -> tuple:
    intensity = np.maximum(image[..., 0], image[..., 1])
    inside = intensity > max(25, int(0.1 * int(intensity.max())))
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if not (rows.size and cols.size):
        return 0, 0, image.shape[0], image.shape[1]
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


def _to_square(array: np.ndarray, box: tuple, size: int, interpolation: int) -> np.ndarray:
    y0, x0, y1, x1 = box
    crop = array[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(crop, (nw, nh), interpolation=interpolation)
    square = np.zeros((size, size) + array.shape[2:], array.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    square[top : top + nh, left : left + nw] = resized.reshape((nh, nw) + array.shape[2:])
    return square


def _loop_example(image_path, mask_paths, size: int, rng: np.random.Generator, with_masks: bool):
    """One example the way a plain loop prepares it; returns ``(image, masks or None)``."""
    from drkeras import keys

    image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    box = _fov_crop_box(image)
    square = _to_square(image, box, size, cv2.INTER_AREA)
    angle = 90.0 * rng.integers(4) + rng.uniform(-15, 15)
    centre = ((size - 1) / 2, (size - 1) / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle, rng.uniform(0.9, 1.1))
    if rng.random() < 0.5:  # horizontal flip folded into the affine matrix
        matrix = matrix @ np.array([[-1, 0, size - 1], [0, 1, 0], [0, 0, 1]], np.float64)
    warped = cv2.warpAffine(square, matrix, (size, size)).astype(np.float32)
    mean = warped.mean(axis=(0, 1))
    jittered = (warped * rng.uniform(0.9, 1.1) - mean) * rng.uniform(0.9, 1.1) + mean
    out = np.clip(jittered, 0, 255) / 255.0
    if not with_masks:
        return out, None
    masks = np.zeros((size, size, keys.NUM_LESIONS), np.float32)
    for k, lesion in enumerate(keys.LESIONS):
        if lesion in mask_paths:
            mask = cv2.imread(str(mask_paths[lesion]), cv2.IMREAD_GRAYSCALE)
            mask = _to_square(mask, box, size, cv2.INTER_NEAREST)
            masks[..., k] = cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_NEAREST) > 0
    return out, masks


def _loop_batches(inputs: dict, size: int, batch_size: int, with_masks: bool, seed: int):
    """Endless batches of the plain loop, cycling over the photographs."""
    rng = np.random.default_rng(seed)
    pairs = list(zip(inputs["images"], inputs["masks"]))
    i = 0
    while True:
        batch = []
        for _ in range(batch_size):
            image_path, mask_paths = pairs[i % len(pairs)]
            batch.append(_loop_example(image_path, mask_paths, size, rng, with_masks))
            i += 1
        images = np.stack([b[0] for b in batch])
        yield images, (np.stack([b[1] for b in batch]) if with_masks else None)


def _timed_stream(make_iterator, warmup: int, batches: int, cores: list):
    """A callable timing ``batches`` batches of a fresh iterator after ``warmup`` untimed ones;
    each call appends the cores it used (CPU time / wall time) to ``cores``.

    A fresh iterator per measurement: a live ``tf.data`` iterator keeps decoding in the
    background, which would steal the cores from whatever is timed next. The warm-up batches
    absorb the start of its thread pools.
    """

    def measure() -> float:
        iterator = make_iterator()
        for _ in range(warmup):
            next(iterator)
        start, cpu = time.perf_counter(), common.cpu_seconds()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
        cores.append((common.cpu_seconds() - cpu) / seconds)
        del iterator
        return seconds

    return measure


# --------------------------------------------------------------------------------------------
# The benchmark


def run(
    out: pathlib.Path,
    *,
    n: int = 16,
    images: int = 32,
    size: int = 512,
    batch_size: int = 8,
    rounds: int = 3,
    cases: Sequence[str] = CASES,
    seed: int = 0,
) -> common.Section:
    """Measure the input pipeline (see the module docstring) and return its section.

    Args:
        out: folder for the inputs (``out/inputs/<source>``, reused by later runs).
        n: photographs per source (the streams cycle over them).
        images: images per timed measurement (rounded up to whole batches).
        size: training resolution.
        batch_size: batch size.
        rounds: measurements per way (interleaved).
        cases: ``"source/task"`` with a source of :data:`SOURCES` and a task of :data:`TASKS`.
        seed: seed of the photographs and of the augmentation.

    Example: ``run(pathlib.Path("/tmp/bench"), n=4, size=64, cases=["max_side_1024/grading"])``.
    """
    from drkeras.data import pipeline

    parsed = [tuple(case.split("/")) for case in cases]
    bad = [
        c for c, p in zip(cases, parsed) if len(p) != 2 or p[0] not in SOURCES or p[1] not in TASKS
    ]
    if bad:
        raise ValueError(
            f"unknown case(s) {bad}; expected source/task with a source of {list(SOURCES)} "
            f"and a task of {TASKS}"
        )
    start = time.perf_counter()
    section = common.Section(
        "pipeline",
        "1. Input pipeline",
        columns=[
            ("source", "source"),
            ("task", "task"),
            ("way", "pipeline"),
            ("images_per_s", "images/s"),
            ("vs_loop", "vs loop"),
            ("noise", "noise"),
            ("cores", "cores used"),
            ("cpu_ms", "CPU ms/img"),
        ],
        config=dict(
            n=n,
            images=images,
            size=size,
            batch_size=batch_size,
            rounds=rounds,
            seed=seed,
            cases=list(cases),
        ),
    )
    batches = -(-images // batch_size)
    fill = -(-n // batch_size)
    for source, task in parsed:
        height = SOURCES[source]
        inputs = prepare_inputs(pathlib.Path(out) / "inputs" / source, n, height, seed)
        with_masks = task == "segmentation"
        build = pipeline.segmentation_dataset if with_masks else pipeline.grading_dataset
        args = dict(
            size=size, batch_size=batch_size, augment=True, shuffle=False, seed=seed, repeat=True
        )
        plain = build(inputs["records"], "train", cache=False, **args)
        cached = build(inputs["records"], "train", cache=True, **args)
        filling = iter(cached)
        for _ in range(fill):  # one pass fills the cache at training size
            next(filling)
        del filling
        cores = {way: [] for way in ("python_loop", "tf_data", "tf_data_cached")}
        measures = {
            "python_loop": _timed_stream(
                lambda w=with_masks, i=inputs: _loop_batches(i, size, batch_size, w, seed),
                0,
                batches,
                cores["python_loop"],
            ),
            "tf_data": _timed_stream(lambda ds=plain: iter(ds), 1, batches, cores["tf_data"]),
            "tf_data_cached": _timed_stream(
                lambda ds=cached: iter(ds), 1, batches, cores["tf_data_cached"]
            ),
        }
        times = common.interleaved(measures, rounds)
        timed_images = batches * batch_size
        loop = common.summarize(times["python_loop"])["median"]
        for way, samples in times.items():
            stats = common.summarize(samples)
            section.rows.append(
                {
                    "source": source,
                    "task": task,
                    "way": way,
                    "images_per_s": timed_images / stats["median"],
                    "vs_loop": loop / stats["median"],
                    "noise": stats["noise"],
                    "cores": common.summarize(cores[way])["median"],
                    "cpu_ms": common.summarize(cores[way])["median"]
                    * stats["median"]
                    / timed_images
                    * 1e3,
                    "seconds": samples,
                    "images": timed_images,
                    "photo_height": height,
                }
            )
            if way != "python_loop":
                section.goals.append(
                    common.Goal.at_least(
                        f"{way} / python loop ({source}, {task})", loop / stats["median"], 3
                    )
                )
    section.notes.append(
        f"{n} synthetic photographs per source -> {size}x{size}, batch {batch_size}; each of "
        f"{rounds} interleaved rounds times {batches * batch_size} images from a fresh iterator "
        "after one warm-up batch (median reported)."
    )
    section.notes.append(
        "'cores used' = CPU time / wall time of the measurement (the loop runs in one thread, "
        "tf.data on every core it gets); 'CPU ms/img' is the cost that does not depend on how "
        "busy the machine was: on an idle 2-core CPU, tf.data / loop approaches 2 x the "
        "CPU-cost ratio."
    )
    section.seconds = time.perf_counter() - start
    return section


def pipeline_rate(section: common.Section, way: str = "tf_data_cached") -> Optional[float]:
    """The lowest images/s of ``way`` over the section's sources and tasks (``None`` if
    absent): what a training run can rely on."""
    rates = [r["images_per_s"] for r in section.rows if r["way"] == way]
    return min(rates) if rates else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.pipeline``: run this section alone and print its table."""
    from benchmarks import report

    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--n", type=int, default=16, help="photographs per source")
    parser.add_argument("--images", type=int, default=32, help="images per measurement")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="source/task,...")
    drkeras.startup.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    section = run(
        args.out,
        n=args.n,
        images=args.images,
        size=args.size,
        batch_size=args.batch_size,
        rounds=args.rounds,
        cases=args.cases.split(","),
    )
    print(report.markdown_table(section.columns, section.rows))
    for goal in section.goals:
        print(f"{goal.name}: {goal.value} (goal {goal.target}, met: {goal.met})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
