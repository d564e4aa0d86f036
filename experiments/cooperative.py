"""JointSeg: cooperative joint segmentation and classification learning.

Reproduces "Rethinking Convolutional Semantic Segmentation Learning", arXiv:1710.07991 (2017),
the paper of joint cooperative end-to-end learning (fidelity table: ``docs/papers/cooperative.md``):
Tables I-IV, the partial-random-label
experiment of section II-C and a Fig. 6-style comparison.

Command::

    python experiments/cooperative.py                               # synthetic, smoke
    python experiments/cooperative.py --data RECORDS --preset paper  # RECORDS/{idrid,eyepacs}

Expected runtime: smoke, 3-4 minutes on 2 CPU cores (measured from a fresh clone: 2 min 44 s wall; 3
min 27 s wall, 3 min 8 s of CPU beside other jobs; synthetic IDRiD and EyePACS layouts generated and
converted at twice the default counts, 10 training stages of 30 eager steps at 96 px); paper, days
on a GPU (not run here).

Expected result: smoke, every cell of Tables I-IV and of the partial-label table filled beside
the paper's numbers, ``fig6_segmentation.png``, ``training_curves.png`` and
``export/cooperative`` (reload checked). Thirty steps on synthetic data do not reproduce the
paper: the segmenters that learned anything predict background almost everywhere (mIoU ~19.6 %:
the background's IoU ~98 % averaged with four lesion classes at 0), lesion mIoU is 0-1 %, and
grading is at chance (top-1 15-25 % on 20 test images). The paper preset on the real data should
approach Table I (JointSeg mIoU 66.1) and Table III (top-1 85.1 %).

What runs, ``train.runs`` times (seeds ``seed, seed + 1, ...``), every network at
``train.epochs`` x ``train.steps_per_epoch`` steps:

1. JointSeg (:class:`drkeras.training.cooperative.CooperativeTrainer` on
   :func:`drkeras.models.cooperative.build_cooperative_model`, random initialisation): the
   segmentation agent on ``method.seg_dataset`` (IDRiD-S stands for the paper's private 5K
   annotated EyePACS subset), the classifier agent on ``method.cls_dataset`` (EyePACS) with a
   batch ``method.batch_ratio`` times larger (:func:`drkeras.data.pipeline.two_stream_dataset`)
   and a learning rate ``method.lr_ratio`` times larger; both Nesterov SGD with the polynomial
   policy (``optimizers.segmentation``; the classifier's is derived from it).
2. Section II-C: JointSeg again with only ``method.true_label_fraction`` (20 %) of the
   classifier's training labels true, the others replaced once by uniformly random grades
   (:func:`write_partial_random_labels` writes that copy of the records).
3. Tables I-II baselines on the segmentation stream alone, same steps, batch and optimizer as
   the segmentation agent: FCN-8s (VGG16) and the improved-inception UNet, each (Table I) with
   its encoder first trained as a classifier on the classification stream (same steps, batch
   and optimizer as the classifier agent), and (Table II) from random weights.
4. Tables III-IV baselines on the classification stream, same steps, batch and optimizer as the
   classifier agent: VGG-19 and InceptionV3 (``keras.applications``).

Evaluation. Segmentation on ``seg_test_split``: each pixel takes the argmax class of
``method.class_set`` (background, MA, HE, EX, SE by default); IoU per class pooled over the
images (``drkeras.metrics.SegmentationCounter``; classes not annotated for an image are left
out for it, classes absent from both prediction and truth everywhere are left out of the mean),
mIoU = the mean over classes, background included (the usual semantic-segmentation mIoU; the
paper does not define it further); "lesion mIoU" leaves the background out. Classification on
``cls_test_split``: top-1 and top-2 accuracy over the 5 grades, and binary accuracy of DR >= 1 vs
DR 0 with ``p(DR >= 1) = 1 - p_0 >= 0.5`` (:func:`drkeras.metrics.screening_scores`).

Input (section III "Preprocessing"): resized to ``method.resize_size`` (256), random crops of
``data.image_size`` (224) for training (a central crop for evaluation), random flips both ways,
random padding (a random shift with black fill), hue/contrast/saturation jitter for the
classification images only, as the paper says; each image standardised by its own mean and
standard deviation (``data.normalization="standardize"``). The
exported model (``export/cooperative``) applies the evaluation transform: the field of view
resized to ``method.resize_size``, its central ``data.image_size`` crop
(:func:`export_preprocess`), so it sees lesions at the training scale.

Reading choices (documented on :class:`Method`): widths and depths of the networks, learning
rates, batch sizes and epochs are not given in the paper.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Callable, Dict, List, Sequence, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, metrics
from drkeras.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)
from drkeras.data import augment as aug
from drkeras.data import pipeline, preprocess, records
from drkeras.experiment import Experiment, RunContext, main, run_config_summary
from drkeras.export import export_model, pipeline_preprocess
from drkeras.models import cooperative, mtunet
from drkeras.models.cooperative import build_reference_grader
from drkeras.plots import display_image, new_figure, plot_history, save_figure
from drkeras.results import ResultsTable
from drkeras.training.cooperative import (
    SEG_TARGET,
    CooperativeTrainer,
    agent_optimizer_configs,
)
from drkeras.training.optim import build_optimizer

__all__ = [
    "JointSegExperiment",
    "Method",
    "PAPER",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "PAPER_TABLE3",
    "PAPER_TABLE4",
    "SMOKE",
    "SegmentationIoU",
    "export_preprocess",
    "plot_segmentation_comparison",
    "write_partial_random_labels",
]

log = logging.getLogger("drkeras.cooperative")

# ------------------------------------------------------------------------------ the paper's data

MIOU, LESION_MIOU = "mIoU (%)", "lesion mIoU (%)"
TOP1, TOP2, BINARY = "Top-1 (%)", "Top-2 (%)", "Binary Accuracy (%)"
LABELS_CORRECT = "correct classifier labels (%)"
JOINT = "JointSeg [This work]"
FCN, UNET = "FCN-8s", "UNet"
VGG, INCEPTION = "VGG", "InceptionV3"
GRADER_ROWS = {VGG: "vgg19", INCEPTION: "inception_v3"}

PAPER_TABLE1 = {FCN: {MIOU: 55.3}, UNET: {MIOU: 64.4}, JOINT: {MIOU: 66.1}}
PAPER_TABLE2 = {FCN: {MIOU: 15.3}, UNET: {MIOU: 25.4}, JOINT: {MIOU: 66.1}}
PAPER_TABLE3 = {
    VGG: {TOP1: 82.5, TOP2: 85.3},
    INCEPTION: {TOP1: 84.3, TOP2: 87.2},
    JOINT: {TOP1: 85.1, TOP2: 88.1},
}
PAPER_TABLE4 = {VGG: {BINARY: 89.5}, INCEPTION: {BINARY: 94.7}, JOINT: {BINARY: 95.5}}
HUMAN_BINARY = 95.1

# Section III "Preprocessing": flips left/right and up/down and random padding "for both
# classification and segmentation" (masks transformed with their image); "for classification
# additional augmentation such as ... changing the image pixel values randomly using hue,
# contrast and saturation". The ranges are not given.
SEGMENTATION_AUGMENT = dataclasses.replace(
    aug.NO_AUGMENT,
    flip_horizontal=True,
    flip_vertical=True,
    shift=0.05,  # random padding: the image shifted by up to 5 % of its side, black fill
)
CLASSIFICATION_AUGMENT = dataclasses.replace(
    SEGMENTATION_AUGMENT, contrast=0.2, saturation=0.2, hue=0.02
)


# ------------------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class Method:
    """JointSeg's settings (``--set method.<field>=...``).

    Attributes:
        seg_dataset / seg_train_split / seg_test_split: pixel-level data of the segmentation
            agent (the paper's 5K annotated EyePACS subset is private; IDRiD-S stands for it).
        cls_dataset / cls_train_split / cls_test_split: graded data of the classifier agent
            (EyePACS: 25K training images and the 55K test set in the paper). The test split
            may join splits with ``+`` (:func:`drkeras.data.pipeline.evaluation_dataset`):
            ``val+test`` is EyePACS' Public and Private test images, 53,576 together.
        class_set: pixel classes (:data:`drkeras.models.mtunet.CLASS_SETS`); the paper's five
            pathological features plus artefacts are not in public data, IDRiD's four lesions
            are.
        lr_ratio: classifier learning rate / segmenter learning rate (30, section III).
        batch_ratio: classifier batch / segmenter batch (32, section III); the segmenter batch
            is ``data.batch_size``.
        resize_size: images are resized to this and randomly cropped to ``data.image_size``
            (256 -> 224 in the paper).
        encoder_widths, encoder_blocks: filters per level and cascaded residual inception blocks
            per level of the shared encoder (not given in the paper; ours).
        classifier_widths, classifier_blocks: the same for the classifier agent.
        unet_decoder_blocks: residual inception blocks per decoder stage of the UNet baseline.
        fc_units: FCN-8s ``fc6``/``fc7`` filters before ``model.width`` (4096 in FCN).
        graders: the ``keras.applications`` networks of the VGG and InceptionV3 rows.
        true_label_fraction: share of the classifier's training labels kept true in the
            partial-random-label run (0.2, section II-C); the others become uniform random grades.
        figure_images: validation images shown in the Fig. 6-style comparison.
        run_eagerly: train eagerly. Faster for a few steps on a CPU: tracing the cooperative
            train step (two forward and backward passes through the inception blocks) takes
            longer than a smoke run's whole training of it.
    """

    seg_dataset: str = "idrid"
    seg_train_split: str = "train"
    seg_test_split: str = "test"
    cls_dataset: str = "eyepacs"
    cls_train_split: str = "train"
    cls_test_split: str = "val+test"
    class_set: str = "lesions"
    lr_ratio: float = 30.0
    batch_ratio: int = 32
    resize_size: int = 256
    encoder_widths: Tuple[int, ...] = (32, 64, 128, 256)
    encoder_blocks: int = 2
    classifier_widths: Tuple[int, ...] = (256, 512)
    classifier_blocks: int = 2
    unet_decoder_blocks: int = 1
    fc_units: int = 4096
    graders: Tuple[str, ...] = ("vgg19", "inception_v3")
    true_label_fraction: float = 0.2
    figure_images: int = 2
    run_eagerly: bool = False


# Section III: 224 x 224 crops of 256 x 256 images, Nesterov momentum with the polynomial policy,
# the classifier's learning rate 30x and batch 32x the segmenter's. Not given: the learning rates
# (segmenter 1e-3, so the classifier gets 3e-2, a usual SGD rate for an image classifier), the
# momentum (0.9), the policy's power (0.9, the usual "poly" policy), the batch (2 segmentation
# images -> 64 classification images per step) and the length (50 epochs of the 3.5K annotated
# images: 1750 steps each, during which the classifier sees 112K images, 4.5 passes over 25K).
# Section III, "Training procedure": Nesterov momentum with a polynomial learning-rate policy.
_NESTEROV_POLY = OptimizerConfig(
    name="sgd", learning_rate=1e-3, momentum=0.9, nesterov=True, schedule="polynomial", power=0.9
)
PAPER = Config(
    method=Method(),
    data=DataConfig(image_size=224, batch_size=2, normalization="standardize", augment=True),
    model=ModelConfig(encoder_weights=None, width=1.0),
    optimizers={"segmentation": _NESTEROV_POLY},
    train=TrainConfig(epochs=50, steps_per_epoch=1750, runs=1, verbose=2),
)

# Minutes on 2 CPU cores: 96 px crops (InceptionV3 needs >= 75 px, FCN-8s a multiple of 32),
# narrow networks, a 4x batch ratio (2 segmentation + 8 classification images per step), 30 eager
# steps per network, a 3x larger segmentation learning rate than the paper preset's (the 30x
# ratio kept) so a few steps move the weights, twice the default synthetic counts (20 EyePACS
# test images).
SMOKE = Config(
    method=Method(
        batch_ratio=4,
        resize_size=110,
        encoder_widths=(8, 16, 32),
        encoder_blocks=1,
        classifier_widths=(32,),
        classifier_blocks=1,
        fc_units=4096,
        figure_images=2,
        run_eagerly=True,
    ),
    data=DataConfig(
        image_size=96,
        batch_size=2,
        normalization="standardize",
        augment=True,
        synthetic_size=128,
        synthetic_scale=2.0,
    ),
    model=ModelConfig(encoder_weights=None, width=0.125),
    optimizers={"segmentation": dataclasses.replace(_NESTEROV_POLY, learning_rate=3e-3)},
    train=TrainConfig(epochs=1, steps_per_epoch=30, runs=1, verbose=2, keep_checkpoints="none"),
)


# ------------------------------------------------------------------------------ partial labels


def write_partial_random_labels(
    records_dir,
    split: str,
    out_dir,
    *,
    true_fraction: float,
    num_grades: int = keys.NUM_GRADES,
    seed: int = 0,
) -> Dict[str, float]:
    """A copy of a graded split where only ``true_fraction`` of the labels are true (II-C).

    ``round(true_fraction * N)`` graded images (stratified by grade,
    :func:`drkeras.data.pipeline.fraction_split`) keep their grade; every other graded image gets
    a grade drawn uniformly from ``0 .. num_grades - 1`` once (so it may hit the true grade by
    chance). Images without a grade are copied unchanged. Written as
    ``out_dir/<split>-00000.tfrecord`` (through a temporary name), readable by every pipeline.

    Returns:
        ``{"images", "true_labels", "correct"}``: graded images, labels kept true, and the
        fraction of labels that equal the true grade after corruption.

    Example::

        stats = write_partial_random_labels("records/eyepacs", "train", "records/eyepacs_20",
                                            true_fraction=0.2, seed=0)
    """
    if not 0.0 <= true_fraction <= 1.0:
        raise ValueError(f"true_fraction must be in [0, 1], got {true_fraction}")
    labels = pipeline.read_labels(records_dir, split)
    graded = labels[keys.GRADE] >= 0
    ids = [str(i) for i in labels[keys.ID][graded]]
    grades = labels[keys.GRADE][graded]
    if not ids:
        raise ValueError(f"{records_dir} split {split!r} has no graded image to corrupt")
    kept, _ = pipeline.fraction_split(ids, true_fraction, seed=seed, stratify=grades.tolist())
    kept = set(kept)
    rng = np.random.default_rng([seed, 11])
    new_grade = {
        i: int(g) if i in kept else int(rng.integers(0, num_grades)) for i, g in zip(ids, grades)
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{split}-00000.tfrecord"
    tmp = out / f".{split}-00000.tfrecord.tmp"
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for raw in tf.data.TFRecordDataset(records.list_shards(records_dir, split)):
            example = tf.train.Example.FromString(raw.numpy())
            example_id = example.features.feature[keys.ID].bytes_list.value[0].decode()
            if example_id in new_grade:
                example.features.feature[keys.GRADE].int64_list.value[:] = [new_grade[example_id]]
            writer.write(example.SerializeToString())
    tmp.replace(final)
    correct = float(np.mean([new_grade[i] == int(g) for i, g in zip(ids, grades)]))
    return {"images": len(ids), "true_labels": len(kept), "correct": correct}


# ------------------------------------------------------------------------------ metrics


class SegmentationIoU:
    """mIoU of softmax predictions against the record masks, over a class set (Tables I-II).

    Each pixel's true class comes from :func:`drkeras.models.mtunet.masks_to_classes`, the
    predicted one is the argmax; IoU per class is pooled over all images
    (:class:`drkeras.metrics.SegmentationCounter`), over the images where the class is annotated
    (:func:`drkeras.models.mtunet.classes_annotated`); a class empty in both prediction and truth
    everywhere is left out of the means.

    Example::

        score = SegmentationIoU("lesions")
        score.update(model(images)["seg_probs"], masks, mask_present)
        score.result()["miou"], score.result()["lesion_miou"]
    """

    def __init__(self, class_set: str):
        self.class_set = class_set
        self.names = mtunet.class_names(class_set)
        self._counter = metrics.SegmentationCounter(self.names, empty_score=np.nan)

    def update(self, seg_probs, masks, mask_present=None) -> None:
        probs = np.asarray(seg_probs)
        if probs.ndim != 4 or probs.shape[-1] != len(self.names):
            raise ValueError(
                f"seg_probs must be [B, H, W, {len(self.names)}] over {self.names}, got "
                f"{probs.shape}"
            )
        target = mtunet.masks_to_classes(masks, self.class_set).numpy()
        if target.shape != probs.shape:
            raise ValueError(f"masks {np.shape(masks)} do not match seg_probs {probs.shape}")
        pred = np.eye(len(self.names), dtype=bool)[probs.argmax(axis=-1)]
        present = None
        if mask_present is not None:
            present = mtunet.classes_annotated(mask_present, self.class_set).numpy()
        self._counter.update(pred, target, present=present)

    def result(self) -> Dict[str, object]:
        """``{"miou", "lesion_miou", "iou": {class: value}}`` (fractions; NaN if undefined)."""
        iou = np.array([self._counter.result()["iou_pooled"][c] for c in self.names])
        lesions = [i for i, (_, sources) in enumerate(mtunet.CLASS_SETS[self.class_set]) if sources]
        return {
            "miou": _nanmean(iou),
            "lesion_miou": _nanmean(iou[lesions]),
            "iou": dict(zip(self.names, iou.tolist())),
        }


def _nanmean(values) -> float:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ------------------------------------------------------------------------------ figure

_CLASS_COLORS = (
    (0.0, 0.0, 0.0),
    (0.95, 0.1, 0.1),
    (1.0, 0.55, 0.0),
    (1.0, 0.95, 0.1),
    (0.2, 0.9, 0.9),
    (0.6, 0.2, 0.85),
)


def plot_segmentation_comparison(
    images, truths, predictions: Dict[str, np.ndarray], path, *, class_names, title: str
):
    """Fig. 6-style figure: each image, its ground truth and every network's prediction.

    Args:
        images: ``[N, S, S, 3]`` (uint8 or float; shown with :func:`drkeras.plots.display_image`).
        truths: ``[N, S, S]`` true class ids.
        predictions: ``{network: [N, S, S] predicted class ids}``, in column order.
        path: output PNG, ``2.2 * (2 + networks)`` by ``2.4 * N + 0.6`` inches.
        class_names: names of the class ids (class 0 = background, not painted).
        title: figure title.
    """
    images, truths = np.asarray(images), np.asarray(truths)
    if len(class_names) > len(_CLASS_COLORS):
        raise ValueError(f"at most {len(_CLASS_COLORS)} classes can be drawn, got {class_names}")
    columns = [("image", None), ("ground truth", truths)] + list(predictions.items())
    rows = len(images)
    fig = new_figure((2.2 * len(columns), 2.4 * rows + 0.6))
    for r in range(rows):
        base = display_image(images[r])
        for c, (name, classes) in enumerate(columns):
            ax = fig.add_subplot(rows, len(columns), r * len(columns) + c + 1)
            shown = base.copy()
            if classes is not None:
                for k in range(1, len(class_names)):
                    where = np.asarray(classes[r]) == k
                    shown[where] = 0.2 * shown[where] + 0.8 * np.asarray(_CLASS_COLORS[k])
            ax.imshow(shown)
            if r == 0:
                ax.set_title(name, fontsize=8)
            ax.axis("off")
    legend = ", ".join(f"{n}: {_color_name(k)}" for k, n in enumerate(class_names) if k)
    fig.suptitle(f"{title}\n{legend}", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86, wspace=0.04, hspace=0.06)
    return save_figure(fig, path)


def _color_name(k: int) -> str:
    return ("black", "red", "orange", "yellow", "cyan", "purple")[k]


# ------------------------------------------------------------------------------ the experiment


class _Run:
    """One execution of the experiment: data streams, model builders, training, evaluation."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config
        self.method: Method = ctx.config.method
        self.data = ctx.config.data
        self.size = int(self.data.image_size)
        self.shape = (self.size, self.size, 3)
        self.seg_batch = int(self.data.batch_size)
        self.cls_batch = int(self.method.batch_ratio) * self.seg_batch
        self.num_grades = int(self.config.model.num_grades)
        self.class_names = mtunet.class_names(self.method.class_set)
        self.steps = int(self.config.train.steps_per_epoch)
        self.epochs = int(self.config.train.epochs)
        self._check()
        self.seg_dir = ctx.records(self.method.seg_dataset)
        self.cls_dir = ctx.records(self.method.cls_dataset)
        self._cache: Dict[tuple, object] = {}
        seg_cfg = self._scheduled(self.config.optimizers["segmentation"])
        self.clf_opt_cfg, self.seg_opt_cfg = agent_optimizer_configs(seg_cfg, self.method.lr_ratio)

    def _check(self) -> None:
        m = self.method
        if m.class_set not in mtunet.CLASS_SETS:
            raise ValueError(
                f"method.class_set={m.class_set!r}: choose one of {sorted(mtunet.CLASS_SETS)}"
            )
        if m.batch_ratio < 1:
            raise ValueError(f"method.batch_ratio must be >= 1, got {m.batch_ratio}")
        if not 0 < self.size <= m.resize_size:
            raise ValueError(
                f"data.image_size={self.size} must be in (0, method.resize_size={m.resize_size}]"
                " (random crops of the resized image)"
            )
        if self.steps <= 0:
            raise ValueError(
                "train.steps_per_epoch must be > 0: the two data streams repeat forever"
            )
        if "segmentation" not in self.config.optimizers:
            raise ValueError(
                "optimizers.segmentation is required (the classifier's is derived from it with "
                f"method.lr_ratio); got {sorted(self.config.optimizers)}"
            )
        unknown = [g for g in m.graders if g not in cooperative.REFERENCE_GRADERS]
        if len(m.graders) != len(GRADER_ROWS) or unknown:
            raise ValueError(
                f"method.graders={m.graders}: expected {len(GRADER_ROWS)} of "
                f"{sorted(cooperative.REFERENCE_GRADERS)} (the {list(GRADER_ROWS)} rows)"
            )

    def _scheduled(self, cfg: OptimizerConfig) -> OptimizerConfig:
        """A schedule with ``decay_steps`` 0 decays over the whole stage."""
        if cfg.schedule != "constant" and cfg.decay_steps <= 0:
            return dataclasses.replace(cfg, decay_steps=self.epochs * self.steps)
        return cfg

    def _preprocess(self) -> dict:
        return {
            "fov_crop": self.data.fov_crop,
            "graham": self.data.graham,
            "normalization": self.data.normalization,
        }

    def _stream_options(self, task: str) -> dict:
        """Pipeline keywords of the ``"segmentation"`` or ``"classification"`` stream."""
        params = CLASSIFICATION_AUGMENT if task == "classification" else SEGMENTATION_AUGMENT
        return dict(
            size=self.method.resize_size,
            crop_size=self.size,
            augment=self.data.augment,
            augment_params=params,
            max_examples=self.data.max_examples,
            **self._preprocess(),
        )

    def _classes(self, masks):
        return mtunet.masks_to_classes(masks, self.method.class_set)

    # -------------------------------------------------------------------------- data

    def _cached(self, key: tuple, build: Callable[[], object]):
        """Each stream is built once and reused: building one traces its functions (seconds on
        a CPU), and every network of a run should see the same batches anyway (the streams
        are deterministic functions of the seed and restart with every ``fit``)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def two_streams(self, cls_dir, seed: int) -> tf.data.Dataset:
        return self._cached(("two", str(cls_dir), seed), lambda: self._two_streams(cls_dir, seed))

    def _two_streams(self, cls_dir, seed: int) -> tf.data.Dataset:
        """``({"seg_image", "cls_image"}, {"seg_probs": one-hot classes, "grade"})``."""
        ds = pipeline.two_stream_dataset(
            self.seg_dir,
            self.method.seg_train_split,
            cls_dir,
            self.method.cls_train_split,
            seg_batch_size=self.seg_batch,
            ratio=self.method.batch_ratio,
            seed=seed,
            drop_remainder=True,
            seg_options={"augment_params": SEGMENTATION_AUGMENT},
            cls_options={"augment_params": CLASSIFICATION_AUGMENT},
            **self._stream_options("segmentation"),
        )
        return ds.map(
            lambda x, y: (x, {SEG_TARGET: self._classes(y[keys.MASKS]), keys.GRADE: y[keys.GRADE]})
        )

    def seg_stream(self, seed: int) -> tf.data.Dataset:
        return self._cached(("seg", seed), lambda: self._seg_stream(seed))

    def _seg_stream(self, seed: int) -> tf.data.Dataset:
        ds = pipeline.segmentation_dataset(
            self.seg_dir,
            self.method.seg_train_split,
            batch_size=self.seg_batch,
            seed=seed,
            repeat=True,
            shuffle=True,
            drop_remainder=True,
            **self._stream_options("segmentation"),
        )
        return ds.map(lambda x, y: (x, {keys.SEG_PROBS: self._classes(y[keys.MASKS])}))

    def cls_stream(self, seed: int) -> tf.data.Dataset:
        return self._cached(("cls", seed), lambda: self._cls_stream(seed))

    def _cls_stream(self, seed: int) -> tf.data.Dataset:
        ds = pipeline.grading_dataset(
            self.cls_dir,
            self.method.cls_train_split,
            batch_size=self.cls_batch,
            num_classes=self.num_grades,
            seed=seed + 1,
            repeat=True,
            shuffle=True,
            drop_remainder=True,
            **self._stream_options("classification"),
        )
        return ds.map(lambda x, grade: (x, {keys.GRADE_PROBS: grade}))

    def seg_eval(self) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Batches ``(image, masks, mask_present)`` of the segmentation test split (central
        crops), read once."""

        def read():
            options = dict(self._stream_options("segmentation"), augment=False)
            ds = pipeline.segmentation_dataset(
                self.seg_dir, self.method.seg_test_split, batch_size=8, shuffle=False, **options
            )
            return [(x.numpy(), t[keys.MASKS].numpy(), t[keys.MASK_PRESENT].numpy()) for x, t in ds]

        return self._cached(("seg_eval",), read)

    def cls_eval(self) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Batches ``(image, grade)`` of the classification test split, read once."""

        def read():
            options = dict(self._stream_options("classification"), augment=False)
            ds = pipeline.evaluation_dataset(
                pipeline.grading_dataset,
                self.cls_dir,
                self.method.cls_test_split,
                batch_size=16,
                num_classes=self.num_grades,
                **options,
            )
            return [(x.numpy(), grade.numpy()) for x, grade in ds]

        return self._cached(("cls_eval",), read)

    # -------------------------------------------------------------------------- training

    def _build(self, seed: int, build: Callable[[], keras.Model]) -> keras.Model:
        tf.keras.utils.set_random_seed(seed)
        with self.ctx.strategy.scope():
            return build()

    def _fit(self, model, data, stage: str):
        return self.ctx.fit(model, data, stage=stage, steps_per_epoch=self.steps)

    def joint(self, cls_dir, stage: str, seed: int) -> keras.Model:
        """JointSeg trained cooperatively; returns the joint inference network."""
        m = self.method
        network = self._build(
            seed,
            lambda: cooperative.build_cooperative_model(
                input_shape=self.shape,
                num_seg_classes=len(self.class_names),
                num_grades=self.num_grades,
                encoder_widths=m.encoder_widths,
                encoder_blocks=m.encoder_blocks,
                classifier_widths=m.classifier_widths,
                classifier_blocks=m.classifier_blocks,
                dropout=self.config.model.dropout,
                name="jointseg",
            ),
        )
        with self.ctx.strategy.scope():
            trainer = CooperativeTrainer.from_model(network)
            trainer.compile(
                clf_optimizer=build_optimizer(self.clf_opt_cfg),
                seg_optimizer=build_optimizer(self.seg_opt_cfg),
                run_eagerly=self.method.run_eagerly,
            )
        self._fit(trainer, self.two_streams(cls_dir, seed), stage)
        return network

    def _compile_seg(self, model):
        with self.ctx.strategy.scope():
            model.compile(
                optimizer=build_optimizer(self.seg_opt_cfg),
                loss={keys.SEG_PROBS: keras.losses.CategoricalCrossentropy()},
                run_eagerly=self.method.run_eagerly,
            )

    def _compile_cls(self, model):
        with self.ctx.strategy.scope():
            model.compile(
                optimizer=build_optimizer(self.clf_opt_cfg),
                loss={keys.GRADE_PROBS: keras.losses.SparseCategoricalCrossentropy()},
                run_eagerly=self.method.run_eagerly,
            )

    def segmentation_baseline(self, row: str, pretrained: bool, tag: str, seed: int):
        """FCN-8s or the inception UNet; ``pretrained``: its encoder first trained as a
        classifier on the classification stream (Table I), else random (Table II)."""
        m = self.method
        kind = "fcn8s" if row == FCN else "unet"
        stage = f"{tag}_{kind}_{'pretrained' if pretrained else 'random'}"

        def encoder():
            if kind == "fcn8s":
                return cooperative.build_vgg16_fcn_encoder(
                    input_shape=self.shape,
                    width=self.config.model.width,
                    fc_units=m.fc_units,
                    name="fcn8s_encoder",
                )
            return cooperative.build_shared_encoder(
                input_shape=self.shape,
                widths=m.encoder_widths,
                blocks_per_level=m.encoder_blocks,
                name="unet_encoder",
            )

        enc = self._build(seed, encoder)
        if pretrained:
            feature = "fc7" if kind == "fcn8s" else cooperative.ENCODER_OUTPUT
            with self.ctx.strategy.scope():
                classifier = cooperative.build_encoder_classifier(
                    enc,
                    feature=feature,
                    num_grades=self.num_grades,
                    dropout=self.config.model.dropout,
                )
            self._compile_cls(classifier)
            self._fit(classifier, self.cls_stream(seed), f"{tag}_{kind}_encoder_classifier")
        with self.ctx.strategy.scope():
            if kind == "fcn8s":
                model = cooperative.build_fcn8s(
                    input_shape=self.shape,
                    num_seg_classes=len(self.class_names),
                    encoder=enc,
                )
            else:
                model = cooperative.build_inception_unet(
                    input_shape=self.shape,
                    num_seg_classes=len(self.class_names),
                    decoder_blocks=m.unet_decoder_blocks,
                    encoder=enc,
                )
        self._compile_seg(model)
        self._fit(model, self.seg_stream(seed), stage)
        return model

    def grader(self, row: str, tag: str, seed: int) -> keras.Model:
        name = dict(zip(GRADER_ROWS, self.method.graders))[row]
        model = self._build(
            seed,
            lambda: build_reference_grader(
                name,
                input_shape=self.shape,
                num_grades=self.num_grades,
                encoder_weights=self.config.model.encoder_weights,
                dropout=self.config.model.dropout,
            ),
        )
        self._compile_cls(model)
        self._fit(model, self.cls_stream(seed), f"{tag}_{name}")
        return model

    # -------------------------------------------------------------------------- evaluation

    @staticmethod
    def _outputs(model, images) -> Dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in model(images, training=False).items()}

    def evaluate_segmentation(self, model) -> Tuple[Dict[str, object], np.ndarray]:
        """Scores on the segmentation test split and the predicted class ids ``[N, S, S]``."""
        score = SegmentationIoU(self.method.class_set)
        predicted = []
        for image, masks, present in self.seg_eval():
            probs = self._outputs(model, image)[keys.SEG_PROBS]
            score.update(probs, masks, present)
            predicted.append(probs.argmax(-1))
        return score.result(), np.concatenate(predicted)

    def evaluate_grading(self, model) -> Dict[str, float]:
        truth, probs = [], []
        for image, grade in self.cls_eval():
            probs.append(self._outputs(model, image)[keys.GRADE_PROBS])
            truth.append(grade)
        truth, probs = np.concatenate(truth), np.concatenate(probs)
        return {
            TOP1: 100.0 * metrics.accuracy(truth, probs),
            TOP2: 100.0 * metrics.top_k_accuracy(truth, probs, k=2),
            BINARY: 100.0 * metrics.screening_scores(probs, truth)["normal_accuracy"],
        }

    def eval_images(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """The first ``count`` segmentation test images (as fed) and their true class ids."""
        images, classes = [], []
        for image, masks, _ in self.seg_eval():
            images.append(image)
            classes.append(self._classes(masks).numpy().argmax(-1))
            if sum(len(i) for i in images) >= count:
                break
        return np.concatenate(images)[:count], np.concatenate(classes)[:count]

    def display(self, images) -> np.ndarray:
        shown = preprocess.denormalize(images, self.data.normalization).numpy()
        return np.clip(shown, 0, 255).astype(np.uint8)

    def export(self, network: keras.Model) -> pathlib.Path:
        """``export/cooperative``: the joint network's serving signatures, reload-checked; the
        served input is the evaluation transform (:func:`export_preprocess`)."""
        return export_model(
            network,
            self.ctx.export_dir / "cooperative",
            image_size=self.size,
            preprocess=export_preprocess(self.config),
            output_names=[keys.GRADE_PROBS, keys.SEG_PROBS],
            channels={keys.SEG_PROBS: mtunet.CLASS_SETS[self.method.class_set]},
        )


def export_preprocess(config: Config) -> dict:
    """The export's input transform: the evaluation pipeline's (``_Run.seg_eval``,
    ``_Run.cls_eval``), i.e. the field of view resized to ``method.resize_size`` (256), rounded
    to uint8 as the record pipelines cache it, its central ``data.image_size`` (224) crop, then
    ``data.graham`` and ``data.normalization``. A photograph served by the SavedModel thus shows
    lesions at the scale of training (random 224 crops of the 256 image), not 12.5 % smaller as
    a direct resize to 224 would."""
    return pipeline_preprocess(
        fov_crop=config.data.fov_crop,
        graham=config.data.graham,
        normalization=config.data.normalization,
        resize_size=config.method.resize_size,
    )


class JointSegExperiment(Experiment):
    """The cooperative-learning paper: Tables I-IV, partial random labels, Fig. 6 (module doc)."""

    name = "cooperative"
    title = "JointSeg: cooperative joint segmentation and classification learning"
    presets = {"smoke": SMOKE, "paper": PAPER}

    def run(self, ctx: RunContext) -> Sequence[ResultsTable]:
        r = _Run(ctx)
        method, config = r.method, ctx.config
        tables = self._tables(r)
        t1, t2, t3, t4, t5 = tables
        pct = round(100 * method.true_label_fraction)
        partial_row = f"JointSeg, {pct} % true classifier labels"
        figure: Dict[str, np.ndarray] = {}
        shown = method.figure_images
        for run in range(int(config.train.runs)):
            seed = int(config.seed) + run
            tag = f"run{run}"

            # JointSeg with every label true: Tables I-IV.
            network = r.joint(r.cls_dir, f"{tag}_jointseg", seed)
            seg, pred = r.evaluate_segmentation(network)
            grading = r.evaluate_grading(network)
            for table in (t1, t2):
                table.add(JOINT, MIOU, 100.0 * seg["miou"])
                table.add(JOINT, LESION_MIOU, 100.0 * seg["lesion_miou"])
            t3.add(JOINT, TOP1, grading[TOP1])
            t3.add(JOINT, TOP2, grading[TOP2])
            t4.add(JOINT, BINARY, grading[BINARY])
            self._partial_row(t5, "JointSeg, all classifier labels true", seg, grading, 100.0)
            if run == 0:
                figure[JOINT] = pred[:shown]
                if ctx.is_chief:
                    path = r.export(network)
                    log.info("exported JointSeg to %s", path)

            # Section II-C: the classifier trained on partial random labels.
            partial_dir = ctx.out_dir / "data" / "partial_labels" / f"{method.cls_dataset}_{tag}"
            stats = write_partial_random_labels(
                r.cls_dir,
                method.cls_train_split,
                partial_dir,
                true_fraction=method.true_label_fraction,
                num_grades=r.num_grades,
                seed=seed,
            )
            log.info("partial random labels: %s", stats)
            network = r.joint(partial_dir, f"{tag}_jointseg_partial_labels", seed)
            seg_p, _ = r.evaluate_segmentation(network)
            self._partial_row(
                t5, partial_row, seg_p, r.evaluate_grading(network), 100.0 * stats["correct"]
            )

            # Tables I-II: segmentation baselines, pre-trained and random.
            for row in (FCN, UNET):
                for pretrained, table in ((True, t1), (False, t2)):
                    model = r.segmentation_baseline(row, pretrained, tag, seed)
                    scores, pred = r.evaluate_segmentation(model)
                    table.add(row, MIOU, 100.0 * scores["miou"])
                    table.add(row, LESION_MIOU, 100.0 * scores["lesion_miou"])
                    if run == 0 and row == UNET and pretrained:
                        figure["UNet (improved inception, pre-trained)"] = pred[:shown]

            # Tables III-IV: graders.
            for row in GRADER_ROWS:
                grading = r.evaluate_grading(r.grader(row, tag, seed))
                t3.add(row, TOP1, grading[TOP1])
                t3.add(row, TOP2, grading[TOP2])
                t4.add(row, BINARY, grading[BINARY])

        self._figures(r, figure)
        return tables

    @staticmethod
    def _partial_row(table, row, seg, grading, correct) -> None:
        table.add(row, MIOU, 100.0 * seg["miou"])
        table.add(row, LESION_MIOU, 100.0 * seg["lesion_miou"])
        for column in (TOP1, TOP2, BINARY):
            table.add(row, column, grading[column])
        table.add(row, LABELS_CORRECT, correct)

    @staticmethod
    def _tables(r: _Run) -> List[ResultsTable]:
        m, config = r.method, r.config
        summary = run_config_summary(config)
        budget = (
            f"{config.train.epochs} x {config.train.steps_per_epoch} steps per network, "
            f"segmentation batch {r.seg_batch}, classification batch {r.cls_batch} "
            f"(ratio {m.batch_ratio}), learning rates {r.seg_opt_cfg.learning_rate:g} / "
            f"{r.clf_opt_cfg.learning_rate:g} (ratio {m.lr_ratio:g}), {r.size} px crops of "
            f"{m.resize_size} px"
        )
        seg_where = f"{m.seg_dataset} {m.seg_test_split}"
        cls_where = f"{m.cls_dataset} {m.cls_test_split}"
        miou_note = (
            f"mIoU over the classes {', '.join(r.class_names)} (background included), IoU pooled "
            "over the images; lesion mIoU without the background"
        )
        t1 = ResultsTable(
            "table1",
            f"Table I: mIoU (%) on {seg_where}; FCN-8s and UNet encoders pre-trained as "
            f"classifiers on {m.cls_dataset} {m.cls_train_split}; JointSeg from random weights; "
            f"{miou_note} ({summary}; {budget})",
            [MIOU, LESION_MIOU],
            paper=PAPER_TABLE1,
            digits=1,
        )
        t2 = ResultsTable(
            "table2",
            f"Table II: mIoU (%) on {seg_where}, every network from random weights; {miou_note} "
            f"({summary}; {budget})",
            [MIOU, LESION_MIOU],
            paper=PAPER_TABLE2,
            digits=1,
        )
        t3 = ResultsTable(
            "table3",
            f"Table III: top-1 / top-2 accuracy (%) over the 5 DR grades on {cls_where}; VGG = "
            f"{m.graders[0]}, InceptionV3 = {m.graders[1]} (encoder weights "
            f"{config.model.encoder_weights}) ({summary}; {budget})",
            [TOP1, TOP2],
            paper=PAPER_TABLE3,
            digits=1,
        )
        t4 = ResultsTable(
            "table4",
            f"Table IV: binary accuracy (%) of DR >= 1 vs DR 0 on {cls_where}, predicted "
            f"abnormal when 1 - p(DR 0) >= 0.5; the paper's human performance: {HUMAN_BINARY} % "
            f"({summary}; {budget})",
            [BINARY],
            paper=PAPER_TABLE4,
            digits=1,
        )
        t5 = ResultsTable(
            "partial_labels",
            f"Section II-C (no table in the paper, which reports the segmentation agent "
            f"unaffected and the classifier less accurate): JointSeg with "
            f"{round(100 * m.true_label_fraction)} % of the classifier's training labels true "
            f"and the rest uniformly random grades, beside JointSeg with true labels; "
            f"{miou_note} ({summary}; {budget})",
            [MIOU, LESION_MIOU, TOP1, TOP2, BINARY, LABELS_CORRECT],
            digits=1,
        )
        return [t1, t2, t3, t4, t5]

    @staticmethod
    def _figures(r: _Run, figure: Dict[str, np.ndarray]) -> None:
        shown = min(r.method.figure_images, *(len(v) for v in figure.values())) if figure else 0
        if shown:
            images, truths = r.eval_images(shown)
            columns = {}
            for name in ("UNet (improved inception, pre-trained)", JOINT):
                if name in figure:
                    columns[name] = figure[name][:shown]
            path = plot_segmentation_comparison(
                r.display(images),
                truths,
                columns,
                r.ctx.out_dir / "fig6_segmentation.png",
                class_names=r.class_names,
                title=f"Fig. 6-style comparison on {r.method.seg_dataset} "
                f"{r.method.seg_test_split} (run 0)",
            )
            log.info("Fig. 6 written to %s", path)
        if r.ctx.history_path.is_file():
            plot_history(r.ctx.history_path, r.ctx.out_dir / "training_curves.png")


if __name__ == "__main__":
    raise SystemExit(main(JointSegExperiment()))
