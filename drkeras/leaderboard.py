"""Compare exported models on the same images: ``python -m drkeras.leaderboard``.

Usage::

    python -m drkeras.leaderboard runs/mtunet_smoke runs/pldmlt_smoke \\
        runs/ssl_gan_smoke/export/ssl_gan --data records/idrid --split test --out leaderboard/

Each argument is a run folder (every SavedModel under ``<run>/export/<name>/``, as
:func:`drkeras.export.export_model` writes them, is one row) or an export folder itself (the
folder with ``saved_model.pb``). An argument that is neither is refused before anything is
evaluated (exit code 2, the message names it). Every model is evaluated by
:func:`drkeras.evaluate.evaluate` on the same split with the same settings, and its full output
(``metrics.csv``, ``metrics.md``, ROC/PR curves, confusion matrix, overlays) is kept in
``--out/models/<run>__<export>/``. The leaderboard takes its cells from those metrics
(:data:`COLUMNS` maps every column to evaluate's ``task, metric, target``):

- grading: accuracy and quadratic weighted kappa (ICDRS datasets), referable-DR AUC
  (``screening``, on the dataset's grade scale);
- ``image AUC``: abnormal vs normal ROC AUC of an ``image_score`` / ``patch_logits`` model
  (Lecouat et al. 2018);
- per lesion (MA, HE, EX, SE): pixel AUC-PR (average precision), pixel AUC-ROC and Dice at the
  evaluation threshold (pooled over the split), read from the first dense output, in the order
  ``lesion_probs``, ``seg_probs``, then the export's own, whose channel is that lesion type
  alone (the export's channel specification says which; a channel that joins several types,
  MTUnet's ``red`` = MA + HE, is named in a note instead);
- latency: the median milliseconds per image of ``serving_default`` called on one image at a
  time (the first ``--latency-images`` images of the split, already decoded; the SavedModel's
  own preprocessing included), after one warm-up call, on this machine (the markdown names its
  CPU count, TensorFlow's thread settings and any GPU).

A model without an output gets an empty cell in ``leaderboard.csv`` and "—" in
``leaderboard.md``; a metric that is undefined on the split (no positive pixel of a lesion,
one class only) is empty in the csv too and "n/a" in the markdown, never a number. The markdown
names the records, split and number of images and has a line for every model whose results are
at chance (:func:`chance_notes`). ``leaderboard.png`` draws the headline metrics as grouped
bars, one colour per model (missing values leave a gap, never a bar at zero).

Outputs are written to a temporary folder inside ``--out`` and moved into place only when every
model was evaluated, so a failed run leaves no partial output (and no ``--out`` folder when it
did not exist before).

Example (Python)::

    result = leaderboard(["runs/mtunet_smoke"], "records/idrid", split="test", out_dir="lb")
    result["table"][["run", "export", "grading_kappa", "MA_pr_auc"]]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.patches import Patch
from tqdm import tqdm

from drkeras import evaluate as evaluation
from drkeras import keys, plots
from drkeras.data import records
from drkeras.export import PATCH_EXPORT_FILE
from drkeras.predict import StagedOutput

__all__ = [
    "COLUMNS",
    "Column",
    "Export",
    "chance_notes",
    "find_exports",
    "leaderboard",
    "leaderboard_values",
    "lesion_sources",
    "main",
    "plot_leaderboard",
]

log = logging.getLogger("drkeras")

# The lesion columns: signs of DR (the optic disc, the fifth record type, is anatomy).
LESIONS = ("MA", "HE", "EX", "SE")
# The task of a lesion column is the model's dense output holding that lesion (lesion_sources).
SEGMENTATION = "<segmentation output>"
# Dense outputs searched for a lesion's channel, in this order, before the export's others.
OUTPUT_PREFERENCE = (keys.LESION_PROBS, keys.SEG_PROBS)
MISSING_MD = "—"
UNDEFINED_MD = "n/a"
# Results at chance (chance_notes).
KAPPA_CHANCE_BAND = 0.05
AUC_CHANCE_BAND = 0.02


@dataclasses.dataclass(frozen=True)
class Column:
    """One leaderboard column and the row of evaluate's ``metrics.csv`` it is read from.

    ``task`` :data:`SEGMENTATION` stands for the dense output holding the lesion ``target``;
    ``target`` ``None`` takes the one row of ``(task, metric)`` whatever its target (screening's
    target is the grade scale, ``icdrs`` or ``messidor``).
    """

    name: str  # leaderboard.csv column
    label: str  # leaderboard.md header
    task: str
    metric: str
    target: Optional[str]
    group: str  # panel of leaderboard.png


_LESION_METRICS = (  # (column suffix, label, evaluate's metric, figure panel or "")
    ("pr_auc", "AUC-PR", "pr_auc_ap", "pixel AUC-PR (average precision)"),
    ("roc_auc", "AUC-ROC", "roc_auc", ""),
    ("dice", "Dice", "dice_pooled", "Dice (pooled over the split)"),
)

# The one mapping from leaderboard columns to evaluate's metrics.csv (task, metric, target).
COLUMNS: Tuple[Column, ...] = (
    Column("grading_accuracy", "accuracy", "grading", "accuracy", "all", "image level"),
    Column("grading_kappa", "kappa", "grading", "kappa", "all", "image level"),
    Column("referable_auc", "referable AUC", "screening", "referable_auc", None, "image level"),
    Column("image_auc", "image AUC", "image_score", "abnormal_auc", "all", "image level"),
) + tuple(
    Column(f"{lesion}_{suffix}", f"{lesion} {label}", SEGMENTATION, metric, lesion, group)
    for lesion in LESIONS
    for suffix, label, metric, group in _LESION_METRICS
)
LATENCY = "latency_ms_per_image"


# ---------------------------------------------------------------------------------- arguments


@dataclasses.dataclass(frozen=True)
class Export:
    """One model of the leaderboard: its run folder's name, its export name, its folder."""

    run: str
    name: str
    path: pathlib.Path

    @property
    def key(self) -> str:
        """``<run>__<export>``: its folder under ``--out/models``."""
        return f"{self.run}__{self.name}"


def _is_export(path: pathlib.Path) -> bool:
    # export_model writes "<name>.tmp" first and renames it when complete.
    return (path / "saved_model.pb").is_file() and not path.name.endswith(".tmp")


def _exports_in(folder: pathlib.Path) -> List[pathlib.Path]:
    """The photograph exports of a run's ``export`` folder; patch exports (the SSL-GAN's patch
    classifier, which its image export scores whole photographs with) are left out, logged."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and _is_export(p)):
        if (path / PATCH_EXPORT_FILE).is_file():
            log.info("leaderboard: %s serves patches, not photographs: left out", path)
        else:
            found.append(path)
    return found


def find_exports(paths: Sequence) -> List[Export]:
    """The exports named by command-line arguments, in their order (each at most once).

    An argument is an export folder (``saved_model.pb`` inside; its run is the folder above
    ``export/``, or its parent folder), a run folder (its ``export/<name>/`` folders) or a
    run's ``export`` folder itself.

    Raises:
        FileNotFoundError: an argument holds no export (the message names it and what was
            expected); raised before any model is loaded.
        ValueError: two different exports would share a ``<run>__<export>`` name.
    """
    found: Dict[pathlib.Path, Export] = {}
    for arg in paths:
        path = pathlib.Path(arg)
        if _is_export(path):
            parent = path.resolve().parent
            run = parent.parent if parent.name == "export" else parent
            exports = [Export(run.name, path.name, path)]
        else:
            folder = path if path.name == "export" else path / "export"
            run = path.resolve().parent if path.name == "export" else path.resolve()
            exports = [Export(run.name, p.name, p) for p in _exports_in(folder)]
        if not exports:
            what = "does not exist" if not path.exists() else "holds no exported model"
            raise FileNotFoundError(
                f"{path} {what}: expected a run folder with its SavedModels in "
                f"{path / 'export'}/<name>/saved_model.pb, or an export folder holding "
                "saved_model.pb (written by drkeras.export.export_model)"
            )
        for export in exports:
            found.setdefault(export.path.resolve(), export)
    by_key: Dict[str, Export] = {}
    for export in found.values():
        other = by_key.setdefault(export.key, export)
        if other is not export:
            raise ValueError(
                f"{other.path} and {export.path} would both be reported as {export.key!r} "
                "(same run folder name and export name); expected run folders with distinct "
                "names: rename or copy one of them"
            )
    return list(found.values())


# ---------------------------------------------------------------------------------- cells


def lesion_sources(meta: Mapping) -> Tuple[Dict[str, Tuple[str, str]], List[str]]:
    """Where each lesion column is read: ``{lesion: (output, channel name)}``, and notes on
    the channels that join several lesion types (not in the per-lesion columns).

    The first dense output (``lesion_probs``, ``seg_probs``, then the export's others in its
    order) with a channel made of that lesion type alone, as the export's channel
    specification (:func:`drkeras.evaluate.segmentation_channels`) names it.

    Example::

        >>> meta = {"outputs": {"seg_probs": {"shape": [None, 8, 8, 3], "channels": [
        ...     ["background", []], ["red", ["MA", "HE"]], ["EX", ["EX"]]]}}}
        >>> lesion_sources(meta)
        ({'EX': ('seg_probs', 'EX')}, ['seg_probs channel red = MA + HE'])
    """
    dense = evaluation.segmentation_channels(meta)
    order = [n for n in OUTPUT_PREFERENCE if n in dense] + [
        n for n in dense if n not in OUTPUT_PREFERENCE
    ]
    sources: Dict[str, Tuple[str, str]] = {}
    joined = []
    for output in order:
        for _, channel, indices in dense[output]:
            types = [keys.LESIONS[i] for i in indices]
            if len(types) == 1 and types[0] in LESIONS:
                sources.setdefault(types[0], (output, channel))
            elif len(types) > 1:
                joined.append(f"{output} channel {channel} = {' + '.join(types)}")
    return sources, joined


def leaderboard_values(
    frame: pd.DataFrame, sources: Mapping[str, Tuple[str, str]]
) -> Dict[str, Optional[float]]:
    """The cells of one model from evaluate's metrics frame: ``{column: value}``.

    ``None`` when the model has no such output (or evaluate wrote no such row); NaN when
    evaluate computed the metric and it is undefined on the split.

    Raises:
        ValueError: a column matches several rows (evaluate's naming changed).
    """
    values: Dict[str, Optional[float]] = {}
    for col in COLUMNS:
        task, target = col.task, col.target
        if task == SEGMENTATION:
            if col.target not in sources:
                values[col.name] = None
                continue
            task, target = sources[col.target]
        hit = frame[(frame["task"] == task) & (frame["metric"] == col.metric)]
        if target is not None:
            hit = hit[hit["target"] == target]
        if len(hit) > 1:
            raise ValueError(
                f"metrics frame has {len(hit)} rows for column {col.name} ({task}, "
                f"{col.metric}, {target}); expected one"
            )
        values[col.name] = float(hit["value"].iloc[0]) if len(hit) else None
    return values


def _defined(value) -> bool:
    return value is not None and not math.isnan(value)


def chance_notes(values: Mapping, majority: Optional[Tuple[int, float]] = None) -> List[str]:
    """Why a model's results are at chance (empty when they are not).

    - grading kappa within ``±KAPPA_CHANCE_BAND`` of 0;
    - grading accuracy not above ``majority`` = ``(grade, share)``, the share of the most
      frequent known grade of the split (always answering that grade scores it);
    - a pixel AUC-ROC, the referable AUC or the image AUC within ``0.5 ± AUC_CHANCE_BAND``.

    Example::

        >>> chance_notes({"grading_kappa": 0.01, "grading_accuracy": 0.7}, (0, 0.6))
        ['grading kappa 0.010 within ±0.05 of 0']
    """
    notes = []
    kappa = values.get("grading_kappa")
    if _defined(kappa) and abs(kappa) <= KAPPA_CHANCE_BAND:
        notes.append(f"grading kappa {kappa:.3f} within ±{KAPPA_CHANCE_BAND:g} of 0")
    accuracy = values.get("grading_accuracy")
    if _defined(accuracy) and majority is not None and accuracy <= majority[1]:
        notes.append(
            f"grading accuracy {accuracy:.3f} not above the share of the most frequent grade "
            f"({majority[0]}: {majority[1]:.3f})"
        )
    auc_columns = ["referable_auc", "image_auc"] + [f"{lesion}_roc_auc" for lesion in LESIONS]
    labels = {c.name: c.label for c in COLUMNS}
    for name in auc_columns:
        value = values.get(name)
        if _defined(value) and abs(value - 0.5) <= AUC_CHANCE_BAND:
            what = labels[name].replace("AUC-ROC", "pixel AUC-ROC")
            notes.append(f"{what} {value:.3f} within 0.5±{AUC_CHANCE_BAND:g}")
    return notes


# ---------------------------------------------------------------------------------- the split


def _split_sample(records_dir, split: str, max_examples: int, latency_images: int):
    """``(majority, images)``: the most frequent known grade of the examples evaluate scored and
    its share (``None`` without known grades), and the first ``latency_images`` photographs.

    Read after evaluate has checked the records, in evaluate's order (shard after shard)."""
    shards = records.list_shards(records_dir, split)
    ds = tf.data.TFRecordDataset(shards)
    if max_examples:
        ds = ds.take(max_examples)
    grades = np.array(
        [int(g) for g in ds.map(lambda r: records.parse_labels(r)[keys.GRADE]).as_numpy_iterator()]
    )
    known = grades[grades >= 0]
    majority = None
    if known.size:
        counts = np.bincount(known)
        majority = (int(counts.argmax()), float(counts.max() / known.size))
    images = [
        ex[keys.IMAGE]
        for ex in ds.take(latency_images)
        .map(lambda r: records.parse_example(r, masks=False))
        .as_numpy_iterator()
    ]
    return majority, images


def serving_latency_ms(exported, images: Sequence[np.ndarray]) -> Optional[float]:
    """Median milliseconds per image of ``serving_default`` on batches of one image, after one
    warm-up call; every output is fetched to host memory inside the timing. ``None`` without
    images."""
    if not len(images):
        return None
    serve = exported.signatures["serving_default"]
    batches = [tf.constant(image[None]) for image in images]

    def call(batch):
        for value in serve(images=batch).values():
            value.numpy()

    call(batches[0])  # warm-up: first-call allocations and graph set-up are not latency
    times = []
    for batch in batches:
        start = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def machine_description() -> str:
    """The machine the latency was measured on: platform, CPU, threads, GPUs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    threads = tf.config.threading
    intra, inter = (
        threads.get_intra_op_parallelism_threads(),
        threads.get_inter_op_parallelism_threads(),
    )
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    parts = [
        f"{platform.system()} {platform.machine()}, {cpu}",
        f"os.cpu_count() = {os.cpu_count()}"
        + (f" ({usable} usable by this process)" if usable not in (None, os.cpu_count()) else ""),
        f"TensorFlow {tf.__version__} intra-op threads {intra or 'default'}, "
        f"inter-op threads {inter or 'default'} (default: chosen by TensorFlow from the cores)",
        f"GPUs: {', '.join(gpus)}" if gpus else "no GPU",
    ]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------- run


def leaderboard(
    paths: Sequence,
    records_dir,
    *,
    split: str = "test",
    out_dir,
    latency_images: int = 8,
    batch_size: int = 8,
    num_thresholds: int = 1000,
    threshold: float = 0.5,
    overlays: int = 4,
    max_examples: int = 0,
    progress: bool = True,
) -> Dict[str, object]:
    """Evaluate every export of ``paths`` on one split and write the leaderboard.

    Args:
        paths: run folders and/or export folders (:func:`find_exports`).
        records_dir: folder written by ``python -m data_prep``.
        split: ``train``, ``val`` or ``test``.
        out_dir: where ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.png`` and
            ``models/<run>__<export>/`` go.
        latency_images: images timed per model (0: no latency).
        batch_size, num_thresholds, threshold, overlays, max_examples: passed to
            :func:`drkeras.evaluate.evaluate` for every model.
        progress: show a progress bar over the models.

    Returns:
        ``{"table": DataFrame (one row per export, leaderboard.csv's columns), "csv", "md",
        "png": paths, "n": images evaluated, "chance": {key: [notes]}}``.

    Raises:
        FileNotFoundError, ValueError: a bad argument (before anything is evaluated) or bad
            records (evaluate's message); nothing is left in ``out_dir``.
    """
    if latency_images < 0:
        raise ValueError(f"latency_images must be 0 or more, got {latency_images}")
    exports = find_exports(paths)
    out = pathlib.Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged = StagedOutput(out, "leaderboard")
    try:
        result = _run(
            staged,
            exports,
            records_dir,
            split,
            latency_images,
            dict(
                batch_size=batch_size,
                num_thresholds=num_thresholds,
                threshold=threshold,
                overlays=overlays,
                max_examples=max_examples,
            ),
            progress,
        )
    except BaseException:
        staged.discard()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for export in exports:  # a model's folder holds this evaluation only (no stale overlays)
        shutil.rmtree(out / "models" / export.key, ignore_errors=True)
    staged.commit()
    log.info("leaderboard of %d models in %s", len(exports), result["md"])
    return result


def _run(staged, exports, records_dir, split, latency_images, settings, progress):
    rows, chance, notes = [], {}, {}
    n, sample = None, None
    bar = tqdm(exports, desc=f"leaderboard {split}", unit="model", disable=not progress)
    for export in bar:
        bar.set_postfix_str(export.key)
        model_dir = pathlib.Path("models") / export.key
        result = evaluation.evaluate(
            export.path,
            records_dir,
            split=split,
            out_dir=staged.root / model_dir,
            progress=False,
            **settings,
        )
        for file in sorted((staged.root / model_dir).rglob("*")):
            if file.is_file():
                staged.path(file.relative_to(staged.root))  # moved into --out by commit
        n = result["n"] if n is None else n
        if sample is None:  # the records passed evaluate's checks
            sample = _split_sample(records_dir, split, settings["max_examples"], latency_images)
        majority, images = sample
        exported = result["exported"]  # loaded once, by evaluate
        sources, joined = lesion_sources(exported.meta)
        values = leaderboard_values(result["metrics"], sources)
        values[LATENCY] = serving_latency_ms(exported, images)
        chance[export.key] = chance_notes(values, majority)
        notes[export.key] = joined
        rows.append(
            {
                "run": export.run,
                "export": export.name,
                "path": str(export.path),
                **values,
                "lesion_outputs": ";".join(sorted({output for output, _ in sources.values()})),
                "at_chance": "; ".join(chance[export.key]),
            }
        )
    bar.close()
    # object columns: None (no such output) and NaN (undefined) stay distinct for the md
    table = pd.DataFrame(rows, dtype=object)
    table.to_csv(staged.path("leaderboard.csv"), index=False, lineterminator="\n")
    md = _markdown(table, chance, notes, records_dir, split, n, sample[0], len(sample[1]), settings)
    staged.path("leaderboard.md").write_text(md, encoding="utf-8")
    plot_leaderboard(table, staged.path("leaderboard.png"), title=f"{records_dir} {split}, n={n}")
    out = staged.out
    return {
        "table": table,
        "csv": out / "leaderboard.csv",
        "md": out / "leaderboard.md",
        "png": out / "leaderboard.png",
        "n": n,
        "chance": chance,
    }


# ---------------------------------------------------------------------------------- reports


def _cell(value: Optional[float], digits: int = 4) -> str:
    """A markdown cell: "—" for a missing output, "n/a" for an undefined value, else digits."""
    if value is None:
        return MISSING_MD
    if math.isnan(value):
        return UNDEFINED_MD
    return f"{value:.{digits}f}"


def _markdown(table, chance, notes, records_dir, split, n, majority, timed, settings) -> str:
    headers = ["run", "export"] + [c.label for c in COLUMNS] + ["ms/image", "details"]
    lines = [
        "# Leaderboard",
        "",
        f"Records `{records_dir}`, split `{split}`, {n} images; every model evaluated by "
        f"`drkeras.evaluate` with the same settings (Dice threshold {settings['threshold']:g}, "
        f"{settings['num_thresholds']} curve bins).",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + " --- |" * len(headers),
    ]
    for _, row in table.iterrows():
        key = f"{row['run']}__{row['export']}"
        cells = [row["run"], row["export"]]
        cells += [_cell(row[c.name]) for c in COLUMNS]
        cells += [_cell(row[LATENCY], 1), f"[metrics](models/{key}/metrics.md)"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        f"{MISSING_MD}: the model has no such output (or evaluate reports no such metric for "
        "it, e.g. grading accuracy on Messidor's 0-3 scale or without known grades); "
        f"{UNDEFINED_MD}: undefined on this split (e.g. a lesion without any positive pixel, a "
        "single grade). Columns: accuracy and "
        "kappa (quadratic) of the grade; referable AUC (grade >= 2 vs below, on the dataset's "
        "scale); image AUC (abnormal vs normal from an image or patch score); per lesion the "
        "pixel AUC-PR (average precision) and AUC-ROC pooled over the split and the Dice of "
        "pixels at the threshold, pooled over the split. Each model's own report (per-image "
        "Dice, IoU, per-grade AUCs, curves, overlays) is in `models/<run>__<export>/`.",
        "",
        "## Results at chance",
        "",
    ]
    share = f"{majority[1]:.3f} (grade {majority[0]})" if majority else "none (no known grade)"
    lines.append(
        f"Rules: grading kappa within ±{KAPPA_CHANCE_BAND:g} of 0, or accuracy not above the "
        f"share of the most frequent grade, here {share}; a pixel AUC-ROC, referable or image "
        f"AUC within 0.5±{AUC_CHANCE_BAND:g}."
    )
    lines.append("")
    at_chance = {key: why for key, why in chance.items() if why}
    for key, why in at_chance.items():
        lines.append(f"- `{key}` is at chance: {'; '.join(why)}.")
    if not at_chance:
        lines.append("No model is at chance by these rules.")
    joined = {key: what for key, what in notes.items() if what}
    if joined:
        lines += ["", "## Channels not in the per-lesion columns", ""]
        for key, what in joined.items():
            lines.append(f"- `{key}`: {'; '.join(what)} (see its metrics.md).")
    lines += ["", "## Latency", ""]
    if timed:
        lines.append(
            f"Median of {timed} calls of the SavedModel's `serving_default` on one image each "
            f"(the first {timed} images of the split, already decoded to uint8; the export's "
            "preprocessing and the copy of every output to host memory included), after one "
            "warm-up call. Machine: " + machine_description() + "."
        )
    else:
        lines.append("Not measured (`--latency-images 0`).")
    lines.append("")
    return "\n".join(lines)


def plot_leaderboard(table: pd.DataFrame, path, *, title: Optional[str] = None):
    """Grouped bars of the headline metrics, one colour per model: image-level metrics,
    per-lesion pixel AUC-PR, per-lesion Dice, and latency. A missing or undefined value leaves
    a gap (no bar). Figure 12 x 8 inches.

    Args:
        table: :func:`leaderboard`'s table (``leaderboard.csv``'s columns).
        path: output PNG.
        title: figure title.
    """
    labels = [f"{r}/{e}" for r, e in zip(table["run"], table["export"])]
    panels: Dict[str, List[Column]] = {}
    for col in COLUMNS:
        if col.group:
            panels.setdefault(col.group, []).append(col)
    fig = plots.new_figure((12.0, 8.0))
    width = 0.8 / max(len(labels), 1)
    for k, (group, cols) in enumerate(panels.items()):
        ax = fig.add_subplot(2, 2, k + 1)
        lo = 0.0
        for m in range(len(labels)):
            xs, heights = [], []
            for g, col in enumerate(cols):
                value = table[col.name].iloc[m]
                if value is not None and not pd.isna(value):
                    xs.append(g + (m - (len(labels) - 1) / 2) * width)
                    heights.append(float(value))
            bars = ax.bar(xs, heights, width=width, color=f"C{m % 10}")
            # the value on every bar: a 0 shows "0.00", a missing value shows nothing
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
            lo = min([lo] + heights)
        ax.set_xticks(
            range(len(cols)), [c.target if c.task == SEGMENTATION else c.label for c in cols]
        )
        ax.set_ylim(lo - 0.05 if lo < 0 else 0.0, 1.08)  # room for the value labels
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        ax.set_title(group, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if not ax.patches:
            ax.text(0.5, 0.5, "no model has these outputs", ha="center", transform=ax.transAxes)
    ax = fig.add_subplot(2, 2, len(panels) + 1)
    latency = [table[LATENCY].iloc[m] for m in range(len(labels))]
    shown = [m for m, v in enumerate(latency) if v is not None and not pd.isna(v)]
    bars = ax.barh(shown, [float(latency[m]) for m in shown], color=[f"C{m % 10}" for m in shown])
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (median, batch of 1)")
    ax.set_title("latency", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if not shown:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    handles = [Patch(color=f"C{m % 10}", label=label) for m, label in enumerate(labels)]
    rows = math.ceil(len(labels) / 4)
    top = 0.97 if title else 0.995
    if title:
        fig.suptitle(title, fontsize=10, y=0.995, va="top")
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, top),
        ncol=min(len(labels), 4),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, top - 0.035 * rows))
    return plots.save_figure(fig, path)


# ---------------------------------------------------------------------------------- CLI


def _short_table(table: pd.DataFrame) -> str:
    """The table printed at the end: the grade, image and AUC-PR columns and the latency."""
    shown = [
        ("grading_accuracy", "acc"),
        ("grading_kappa", "kappa"),
        ("referable_auc", "ref AUC"),
        ("image_auc", "img AUC"),
    ] + [(f"{lesion}_pr_auc", f"{lesion} AP") for lesion in LESIONS]
    names = [f"{r}/{e}" for r, e in zip(table["run"], table["export"])]
    width = max([len(n) for n in names] + [5])
    head = f"{'model':<{width}} " + " ".join(f"{h:>8}" for _, h in shown) + f" {'ms/img':>8}"
    lines = [head]
    for name, (_, row) in zip(names, table.iterrows()):
        cells = [_cell(row[c], 3) for c, _ in shown] + [_cell(row[LATENCY], 1)]
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.leaderboard",
        description="Evaluate every exported model of the given runs on the same records and "
        "write a leaderboard (md, csv, png).",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders (their export/<name>/) or exports"
    )
    parser.add_argument(
        "--data", required=True, help="records folder written by data_prep (with its manifest.json)"
    )
    parser.add_argument("--split", default="test", choices=keys.SPLITS)
    parser.add_argument("--out", required=True, help="output folder of the leaderboard")
    parser.add_argument(
        "--latency-images", type=int, default=8, help="images timed per model (0: no timing)"
    )
    evaluation.add_metric_arguments(parser)
    drkeras.startup.add_verbose_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad arguments or inputs)."""
    # WARNING: evaluate's per-model INFO lines would interleave with the progress bar.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = leaderboard(
            args.runs,
            args.data,
            split=args.split,
            out_dir=args.out,
            latency_images=args.latency_images,
            **evaluation.metric_options(args),
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_short_table(result["table"]))
    at_chance = [key for key, why in result["chance"].items() if why]
    if at_chance:
        print(f"at chance: {', '.join(at_chance)} (see {result['md']})")
    print(f"leaderboard of {len(result['table'])} model(s) on {result['n']} images: {result['md']}")
    return 0


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    raise SystemExit(main())
