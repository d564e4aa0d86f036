"""Evaluate an exported model on converted records: ``python -m drkeras.evaluate``.

Usage::

    python -m drkeras.evaluate --model runs/pldmlt_smoke/export/pldmlt \\
        --data records/idrid --split test --out runs/pldmlt_smoke/eval_idrid

The model is the SavedModel written by :func:`drkeras.export.export_model`; it receives the raw
uint8 photographs of the records (its serving signature applies the training preprocessing).
Every metric that applies is computed (``drkeras.metrics``):

- **grading**, when the model serves ``grade_probs`` and grades are known: accuracy, top-2
  accuracy, quadratic weighted kappa, one-vs-rest AUC per grade, confusion matrix (ICDRS
  datasets), and the screening tasks referable / normal (AUC and accuracy) on the dataset's
  grade scale (``messidor``: 0-3; every other dataset: ICDRS 0-4);
- **image scores**, when the model serves ``image_score`` or ``patch_logits`` (Lecouat et al.
  2018: ``sum_j sigmoid(l_ij)``): ROC AUC of abnormal (grade > 0) vs normal;
- **segmentation**, for every dense output with a channel spec in the export metadata
  (``lesion_probs``; ``seg_probs`` when the exporter named its classes): per channel, pixel
  AUC-ROC and AUC-PR (``ap`` and ``trapezoid``) pooled over the split, Dice and IoU (per-image
  mean and pooled) at threshold 0.5, and their means over channels. The record masks get the
  same FOV crop and square resize as the image (nearest neighbour,
  ``drkeras.data.preprocess.prepare_example_masks``), i.e. metrics are at the model's output
  resolution. A channel made of several lesion types (MTUnet's "red" = MA + HE) is compared
  with their union and counts only on images where all of them are annotated.

Outputs in ``--out``: ``metrics.csv`` (``task,metric,target,value``), ``metrics.md``, and plots:
``roc_pr_<output>.png``, ``confusion_matrix.png``, ``overlay_<k>_<id>.png`` (a few images).

Damaged records are never skipped silently and never half-reported. The records folder must
hold the ``manifest.json`` its converter wrote (``python -m data_prep``): a TFRecord shard has no
footer, so one cut short exactly at a record boundary reads as a complete shorter shard, and only
the manifest's record count of the split tells. The shards are read one after the other, and a
record that cannot be read (a truncated or corrupted shard, an image or mask that does not
decode, a mask of the wrong size, a label outside the schema's range), an id that occurs twice,
or a split whose record count differs from ``manifest.json`` stops the evaluation with a message
naming the shard file (or the manifest), the record's position and id, and what was expected
(exit code 2; a missing manifest is refused the same way, before anything is read). The outputs
are written to a temporary folder and moved into ``--out`` only when everything succeeded, so a
failed run leaves no partial output.
"""

from __future__ import annotations

import argparse
import logging
import math
import pathlib
import re
import sys
from typing import Dict, List, Optional, Sequence

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from drkeras import keys, metrics, plots
from drkeras.data import preprocess as prep
from drkeras.data import records
from drkeras.export import load_exported, masks_for_model, model_frame, serving_input
from drkeras.predict import StagedOutput

__all__ = ["evaluate", "main", "segmentation_channels"]

log = logging.getLogger("drkeras")

METRIC_COLUMNS = ("task", "metric", "target", "value")


def segmentation_channels(meta: dict) -> Dict[str, List[tuple]]:
    """Dense outputs to score: ``{output: [(channel index, name, record lesion indices)]}``.

    Channels without lesion types (background) are skipped.
    """
    out = {}
    for name, info in meta["outputs"].items():
        spec = info.get("channels")
        if not spec or len(info["shape"]) != 4:
            continue
        chans = [
            (i, cname, [keys.LESIONS.index(t) for t in sources])
            for i, (cname, sources) in enumerate(spec)
            if sources
        ]
        if chans:
            out[name] = chans
    return out


def _scale_of(dataset: str) -> str:
    # Messidor (original) is graded 0-3; Messidor-2's adjudicated grades are ICDRS 0-4.
    return "messidor" if dataset == "messidor" else "icdrs"


def _record_id(shard: str, index: int) -> str:
    """The id of record ``index`` of ``shard``, or ``"?"`` when even that cannot be read."""
    try:
        raw = next(iter(tf.data.TFRecordDataset(shard).skip(index).take(1)))
        return records.parse_labels(raw)[keys.ID].numpy().decode("utf-8", "replace")
    except (tf.errors.OpError, StopIteration, ValueError):  # UnicodeDecodeError is a ValueError
        return "?"


def _error_text(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        # TensorFlow quotes the record's raw bytes in some messages and then cannot decode them.
        return "corrupted bytes (TensorFlow's own error message was not UTF-8 text)"
    text = (getattr(err, "message", None) or str(err)).strip()
    # TensorFlow prefixes "{{function_node ...}}" and appends "[[{{node ...}}]]" lines.
    lines = [line for line in text.splitlines() if line.strip() and "{{node" not in line]
    first = lines[0] if lines else type(err).__name__
    return first.split("}} ", 1)[-1] if first.startswith("{{function_node") else first


def _read_examples(records_dir, split: str, max_examples: int = 0):
    """Parsed examples of one split, shard after shard (records decoded in parallel within a
    shard, in order), each checked: an unreadable record or a repeated id raises ``ValueError``
    naming the shard, the record's position and id, and what was expected."""
    seen: Dict[str, str] = {}
    n = 0
    for shard in records.list_shards(records_dir, split):
        ds = tf.data.TFRecordDataset(shard).map(
            records.parse_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        iterator = ds.as_numpy_iterator()
        index = 0
        while not max_examples or n < max_examples:
            try:
                example = next(iterator)
            except StopIteration:
                break
            except (tf.errors.OpError, UnicodeDecodeError) as err:
                raise ValueError(
                    f"{shard}: record {index} (id {_record_id(shard, index)}) cannot be read: "
                    f"{_error_text(err)}; expected a complete record of the drkeras schema "
                    f"(convert the dataset again with python -m data_prep)"
                ) from None
            example_id = example[keys.ID].decode("utf-8", "replace")
            if example_id in seen:
                raise ValueError(
                    f"{shard}: record {index} repeats id {example_id!r} (first in "
                    f"{seen[example_id]}); expected one record per id in split {split!r}"
                )
            seen[example_id] = shard
            yield example
            index += 1
            n += 1


def _batches(ds, batch_size: int):
    """Group consecutive examples whose images have the same shape (one serving call each)."""
    batch = []
    for example in ds:
        if batch and (
            len(batch) >= batch_size or example[keys.IMAGE].shape != batch[0][keys.IMAGE].shape
        ):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


def _expected_count(records_dir, split) -> int:
    """The number of records of ``split`` that ``manifest.json`` counts.

    A TFRecord shard has no footer: one cut short exactly at a record boundary reads as a
    complete, shorter shard. Only the count the converter wrote tells that records are missing,
    so evaluation needs it.

    Raises:
        FileNotFoundError: the folder, its shards of ``split`` or its ``manifest.json`` are
            missing (the message names the file and the command that writes it).
        ValueError: the manifest is not JSON or has no record count for ``split``.
    """
    records.list_shards(records_dir, split)  # names the folder or the missing split first
    path = pathlib.Path(records_dir) / records.MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: evaluate reads converted records and checks every split's "
            f"record count against their manifest (a shard cut short at a record boundary "
            f"looks complete); expected the folder written by `python -m data_prep <dataset> "
            f"--src RAW --out {records_dir}`"
        )
    try:
        manifest = records.read_manifest(records_dir)
    except (ValueError, OSError) as err:
        raise ValueError(
            f"{path}: cannot be read as JSON ({err}); convert the dataset again"
        ) from None
    counts = manifest.get("counts") if isinstance(manifest, dict) else None
    value = counts.get(split) if isinstance(counts, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{path}: expected a record count of split {split!r} in 'counts' (a whole number), "
            f"got {value!r}; convert the dataset again"
        )
    return value


class _SegState:
    """Curves, overlap counts and a few overlay examples of one dense output."""

    def __init__(self, channels, num_thresholds, threshold):
        self.channels = channels
        names = [c[1] for c in channels]
        self.curves = metrics.PerLesionCurves(names, num_thresholds)
        self.counter = metrics.SegmentationCounter(names, threshold=threshold)
        self.overlays = []


def _targets(masks: np.ndarray, present: np.ndarray, channels) -> tuple:
    """Per-channel target masks (union of the channel's lesion types) and annotation flags."""
    t = np.stack([masks[..., idx].max(axis=-1) for _, _, idx in channels], axis=-1)
    p = np.array([bool(np.all(present[idx])) for _, _, idx in channels])
    return t, p


def evaluate(
    model_path,
    records_dir,
    *,
    split: str = "test",
    out_dir,
    batch_size: int = 8,
    num_thresholds: int = 1000,
    threshold: float = 0.5,
    overlays: int = 4,
    max_examples: int = 0,
    progress: bool = True,
) -> Dict[str, object]:
    """Run an exported model over one split of converted records and write the reports.

    Args:
        model_path: SavedModel folder from :func:`drkeras.export.export_model`.
        records_dir: folder written by ``python -m data_prep``.
        split: ``train``, ``val`` or ``test``.
        out_dir: where ``metrics.csv``, ``metrics.md`` and the plots go.
        batch_size: images per serving call (consecutive images of equal size are batched).
        num_thresholds: bins of the pixel ROC/PR accumulators.
        threshold: probability threshold of Dice/IoU.
        overlays: number of prediction/ground-truth overlay figures per dense output.
        max_examples: stop after this many examples (0 = all).
        progress: show a tqdm progress bar.

    Returns:
        ``{"metrics": DataFrame (task, metric, target, value), "csv": path, "md": path,
        "plots": [paths], "n": examples, "exported": the loaded model}`` (an
        :class:`drkeras.export.ExportedModel`, for a caller that serves it further).

    Example::

        result = evaluate("runs/x/export/mtunet", "records/idrid", split="test", out_dir="eval")
        result["metrics"].query("metric == 'kappa'")
    """
    for name, value, least in (
        ("batch_size", batch_size, 1),
        ("num_thresholds", num_thresholds, 2),
        ("max_examples", max_examples, 0),
        ("overlays", overlays, 0),
    ):
        if int(value) < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
    out = pathlib.Path(out_dir)
    expected = _expected_count(records_dir, split)  # before loading anything: a quick refusal
    exported = load_exported(model_path)
    meta = exported.meta
    size = exported.image_size
    fov_crop = bool(meta["preprocess"].get("fov_crop", True))
    seg = {
        name: _SegState(chans, num_thresholds, threshold)
        for name, chans in segmentation_channels(meta).items()
    }
    outputs = set(exported.output_names)
    grade_probs, grades, image_scores, datasets = [], [], [], set()

    examples = _read_examples(records_dir, split, int(max_examples or 0))
    total = min(expected, max_examples) if max_examples else expected
    n = 0
    bar = tqdm(total=total, desc=f"evaluate {split}", unit="img", disable=not progress)
    for batch in _batches(examples, batch_size):
        images = np.stack([ex[keys.IMAGE] for ex in batch])
        pred = exported.predict(images)
        for i, ex in enumerate(batch):
            datasets.add(ex[keys.DATASET].decode("utf-8", "replace"))
            grades.append(int(ex[keys.GRADE]))  # for the grading and the image-score metrics
            if keys.GRADE_PROBS in outputs:
                grade_probs.append(pred[keys.GRADE_PROBS][i])
            if keys.IMAGE_SCORE in outputs:
                image_scores.append(float(np.ravel(pred[keys.IMAGE_SCORE][i])[0]))
            elif keys.PATCH_LOGITS in outputs:
                image_scores.append(
                    float(metrics.image_scores_from_patches(pred[keys.PATCH_LOGITS][i : i + 1])[0])
                )
            if not seg:
                continue
            image = ex[keys.IMAGE]
            box = prep.fov_box(image) if fov_crop else [0, 0, image.shape[0], image.shape[1]]
            masks = masks_for_model(ex[keys.MASKS], box, meta)  # the served frame
            present = ex[keys.MASK_PRESENT]
            for name, state in seg.items():
                target, flags = _targets(masks, present, state.channels)
                if not flags.any():
                    continue
                probs = pred[name][i][..., [c[0] for c in state.channels]]
                state.curves.update(probs[None], target[None], present=flags[None])
                state.counter.update(probs[None], target[None], present=flags[None])
                if len(state.overlays) < overlays:
                    shown = serving_input(
                        image, size=size, resize_size=model_frame(meta)[0], fov_crop=fov_crop
                    ).numpy()  # "unit": the served window in [0, 1]
                    example_id = ex[keys.ID].decode("utf-8", "replace")
                    state.overlays.append((example_id, shown, probs, target, flags))
        n += len(batch)
        bar.update(len(batch))
    bar.close()
    if n != total:
        raise ValueError(
            f"{records_dir}: split {split!r} holds {n} readable records but "
            f"{pathlib.Path(records_dir) / records.MANIFEST} counts {expected}; expected the "
            f"shards the converter wrote, complete (a shard was cut short or removed: convert "
            f"the dataset again)"
        )
    if n == 0:
        raise ValueError(
            f"{records_dir}: split {split!r} holds no examples; expected at least one record"
        )
    out.mkdir(parents=True, exist_ok=True)
    staged = StagedOutput(out, "evaluate")
    try:
        result = _report(
            staged,
            seg,
            grade_probs,
            grades,
            image_scores,
            datasets,
            split,
            threshold,
            model_path,
            records_dir,
            n,
        )
    except BaseException:
        staged.discard()
        raise
    staged.commit()
    log.info("evaluated %d %s examples; metrics in %s", n, split, result["csv"])
    return dict(result, exported=exported)


def _report(
    staged,
    seg,
    grade_probs,
    grades,
    image_scores,
    datasets,
    split,
    threshold,
    model_path,
    records_dir,
    n,
) -> Dict[str, object]:
    """Compute the metrics, write metrics.csv, metrics.md and the plots (into ``staged``)."""
    out = staged.out

    rows: List[tuple] = []
    plot_paths: List[pathlib.Path] = []
    dataset = sorted(datasets)[0]
    if len(datasets) > 1:
        log.warning("records mix datasets %s; grades read on the %s scale", datasets, dataset)
    scale = _scale_of(dataset)
    known = np.array(grades) >= 0 if grades else np.zeros(0, bool)
    if grade_probs and known.any():
        probs = np.stack(grade_probs)[known]
        truth = np.array(grades)[known]
        if scale == "icdrs":
            g = metrics.grading_scores(probs, truth)
            rows += [("grading", m, "all", g[m]) for m in ("accuracy", "top2_accuracy", "kappa")]
            rows += [("grading", "auc", name, v) for name, v in g["auc"].items()]
            rows.append(("grading", "n", "all", g["n"]))
            plots.plot_confusion_matrix(
                g["confusion"], staged.path("confusion_matrix.png"), title=f"{dataset} {split}"
            )
            plot_paths.append(out / "confusion_matrix.png")
        s = metrics.screening_scores(probs, truth, scale=scale)
        rows += [("screening", m, scale, v) for m, v in s.items()]
    if image_scores and known.any():
        truth = np.array(grades)[known] > 0
        auc = metrics.roc_auc(truth, np.array(image_scores)[known])
        rows.append(("image_score", "abnormal_auc", "all", auc))

    for name, state in seg.items():
        roc, ap = state.curves.roc_auc(), state.curves.pr_auc("ap")
        trap = state.curves.pr_auc("trapezoid")
        res = state.counter.result()
        for cname in state.curves.names:
            rows += [
                (name, "roc_auc", cname, roc[cname]),
                (name, "pr_auc_ap", cname, ap[cname]),
                (name, "pr_auc_trapezoid", cname, trap[cname]),
            ]
            for key in ("dice_per_image", "dice_pooled", "iou_per_image", "iou_pooled"):
                rows.append((name, key, cname, res[key][cname]))
        for key in ("mdice_per_image", "mdice_pooled", "miou_per_image", "miou_pooled"):
            rows.append((name, key, "mean", res[key]))
        rows.append((name, "images", "all", state.counter.num_images))
        if state.counter.num_images:
            plots.plot_roc_pr(
                state.curves, staged.path(f"roc_pr_{name}.png"), title=f"{name} {split}"
            )
            plot_paths.append(out / f"roc_pr_{name}.png")
        for k, (ex_id, shown, probs, target, flags) in enumerate(state.overlays):
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", ex_id)
            file_name = f"overlay_{name}_{k}_{safe}.png"
            plot_paths.append(out / file_name)
            plots.plot_mask_overlay(
                shown,
                probs,
                target,
                staged.path(file_name),
                names=state.curves.names,
                threshold=threshold,
                present=flags,
                title=ex_id,
            )

    frame = pd.DataFrame.from_records(
        [(t, m, g, float(v)) for t, m, g, v in rows], columns=list(METRIC_COLUMNS)
    )
    frame.to_csv(staged.path("metrics.csv"), index=False, lineterminator="\n")
    staged.path("metrics.md").write_text(
        _markdown(frame, model_path, records_dir, split, n), encoding="utf-8"
    )
    return {
        "metrics": frame,
        "csv": out / "metrics.csv",
        "md": out / "metrics.md",
        "plots": plot_paths,
        "n": n,
    }


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return str(int(value)) if float(value).is_integer() and abs(value) > 1 else f"{value:.4f}"


def _markdown(frame: pd.DataFrame, model_path, records_dir, split: str, n: int) -> str:
    lines = [
        f"# Evaluation of `{model_path}`",
        "",
        f"Records `{records_dir}`, split `{split}`, {n} examples.",
        "",
    ]
    for task, part in frame.groupby("task", sort=False):
        targets = list(dict.fromkeys(part["target"]))
        names = list(dict.fromkeys(part["metric"]))
        lines += [f"## {task}", "", "| metric | " + " | ".join(targets) + " |"]
        lines.append("| --- " * (len(targets) + 1) + "|")
        for m in names:
            cells = []
            for t in targets:
                hit = part[(part.metric == m) & (part.target == t)]
                cells.append(_fmt(float(hit.value.iloc[0])) if len(hit) else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.evaluate",
        description="Evaluate an exported drkeras model on converted records.",
    )
    parser.add_argument("--model", required=True, help="SavedModel folder written by export")
    parser.add_argument(
        "--data", required=True, help="records folder written by data_prep (with its manifest.json)"
    )
    parser.add_argument("--split", default="test", choices=keys.SPLITS)
    parser.add_argument("--out", required=True, help="output folder for metrics and plots")
    add_metric_arguments(parser)
    drkeras.startup.add_verbose_flag(parser)
    return parser


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`evaluate` shared by the command lines that evaluate exports
    (this one and ``python -m drkeras.leaderboard``); :func:`metric_options` reads them back."""
    parser.add_argument("--batch-size", type=int, default=8, help="images per serving call")
    parser.add_argument("--num-thresholds", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=0.5, help="Dice/IoU threshold")
    parser.add_argument("--overlays", type=int, default=4, help="overlay figures per output")
    parser.add_argument("--max-examples", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def metric_options(args: argparse.Namespace) -> Dict[str, object]:
    """Keyword arguments of :func:`evaluate` from :func:`add_metric_arguments`' options."""
    return dict(
        batch_size=args.batch_size,
        num_thresholds=args.num_thresholds,
        threshold=args.threshold,
        overlays=args.overlays,
        max_examples=args.max_examples,
        progress=not args.no_progress,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad arguments or inputs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(
            args.model, args.data, split=args.split, out_dir=args.out, **metric_options(args)
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["md"].read_text())
    return 0


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    raise SystemExit(main())
