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

Mini preset (``--preset mini``): the paper preset at quarter width (every network but the
``keras.applications`` graders, which have no width) and 128 px crops of 146 px images, with
the paper's batches (2 segmentation / 64 classification images), 30x learning-rate ratio and
Nesterov polynomial SGD, 60 graph-mode steps per network, on the published IDRiD-S counts; every
changed key, with its kind and why, is in ``MINI_CHANGES``. Not yet measured end to end; from
per-step times of each network (about 25 CPU-seconds per step over the ten networks, 58 % of it
VGG-19) about 15-19 minutes on 2 quiet CPU cores. Sixty steps show 120 segmentation images to
JointSeg: expect grading above chance sooner than lesion masks.

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
from typing import Callable, Dict, List, Optional, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, metrics
from drkeras.claims import Claim
from drkeras.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PresetChange,
    TrainConfig,
    derive_preset,
)
from drkeras.data import augment as aug
from drkeras.data import pipeline, preprocess, records
from drkeras.experiment import Experiment, RunContext, main, run_config_summary
from drkeras.export import export_model, pipeline_preprocess
from drkeras.models import cooperative, mtunet
from drkeras.models.cooperative import build_reference_grader
from drkeras.plots import display_image, new_figure, plot_history, save_figure
from drkeras.results import ResultsTable
from drkeras.stages import Data, Net, Stage
from drkeras.training.cooperative import (
    SEG_TARGET,
    CooperativeTrainer,
    agent_optimizer_configs,
)
from drkeras.training.optim import build_optimizer

__all__ = [
    "JointSegExperiment",
    "MINI",
    "MINI_CHANGES",
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
# Rows of the partial-label table (section II-C).
ALL_LABELS_TRUE = "JointSeg, all classifier labels true"


def partial_labels_row(true_fraction: float) -> str:
    """The partial-label table's row of JointSeg trained with ``true_fraction`` of the
    classifier's labels true."""
    return f"JointSeg, {round(100 * true_fraction)} % true classifier labels"


PAPER_TABLE1 = {FCN: {MIOU: 55.3}, UNET: {MIOU: 64.4}, JOINT: {MIOU: 66.1}}
PAPER_TABLE2 = {FCN: {MIOU: 15.3}, UNET: {MIOU: 25.4}, JOINT: {MIOU: 66.1}}
PAPER_TABLE3 = {
    VGG: {TOP1: 82.5, TOP2: 85.3},
    INCEPTION: {TOP1: 84.3, TOP2: 87.2},
    JOINT: {TOP1: 85.1, TOP2: 88.1},
}
PAPER_TABLE4 = {VGG: {BINARY: 89.5}, INCEPTION: {BINARY: 94.7}, JOINT: {BINARY: 95.5}}
HUMAN_BINARY = 95.1

# Dataset keys of the test splits (shared by every stage evaluating on them, across runs), the
# evaluation batches and the training streams' shuffle buffer (the pipelines' default).
SEG_TEST, CLS_TEST = "seg_test", "cls_test"
SEG_EVAL_BATCH, CLS_EVAL_BATCH = 8, 16
SHUFFLE_BUFFER = 256

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

# The paper's topology and algorithm at quarter width and 128 px (``--preset mini``): every key
# it changes from PAPER, with its kind and why. Batches (2 / 64), the 30x learning-rate ratio,
# Nesterov SGD with the polynomial policy and the graph-mode training are the paper preset's.
MINI_CHANGES = {
    "data.image_size": PresetChange(
        "resolution", "128", "224 px crops -> 128 px (a multiple of 32, >= 75 for InceptionV3)"
    ),
    "method.resize_size": PresetChange(
        "resolution", "146", "256 px -> 146 px: the paper's crop ratio 224 / 256 kept"
    ),
    "model.width": PresetChange("width", "0.25", "quarter-width FCN-8s VGG16 encoder and fc6/fc7"),
    "method.encoder_widths": PresetChange(
        "width", "8,16,32,64", "quarter-width shared encoder (also the UNet baseline's)"
    ),
    "method.classifier_widths": PresetChange("width", "64,128", "quarter-width classifier agent"),
    "data.synthetic_scale": PresetChange(
        "data", "6.75", "IDRiD-S 54 train / 27 test, EyePACS 135 train / 136 test images"
    ),
    "train.epochs": PresetChange("steps", "4", "4 epochs of 15 steps per network"),
    "train.steps_per_epoch": PresetChange(
        "steps", "15", "60 steps: full-width VGG-19 at batch 64 costs ~8 s a step on 2 cores"
    ),
    "optimizers.segmentation.learning_rate": PresetChange(
        "rate", "0.003", "3e-3 for 1e-3 (classifier 9e-2, ratio 30 kept): 60 steps"
    ),
}
MINI = derive_preset(PAPER, MINI_CHANGES)

# The paper's directional claims (drkeras.claims; section III-A, section II-C). The partial-label
# row is named for the default method.true_label_fraction (every preset keeps it).
CLAIMS = (
    Claim("Table I, section III-A", "joint learning segments better than the FCN-8s and UNet "
          "with classifier-pre-trained encoders", "table1", MIOU, JOINT, (FCN, UNET)),
    Claim("Table II, section III-A", "from random weights, joint learning segments better than "
          "FCN-8s and UNet", "table2", MIOU, JOINT, (FCN, UNET)),
    *(
        Claim("Table III", "the classifier agent grades better than VGG-19 and InceptionV3",
              "table3", column, JOINT, tuple(GRADER_ROWS))
        for column in (TOP1, TOP2)
    ),
    Claim("Table IV", "the classifier agent screens (DR >= 1 vs 0) better than VGG-19 and "
          "InceptionV3", "table4", BINARY, JOINT, tuple(GRADER_ROWS)),
    *(
        Claim("section II-C", "with most classifier labels random the classifier agent is less "
              "accurate", "partial_labels", column, ALL_LABELS_TRUE,
              (partial_labels_row(Method.true_label_fraction),))
        for column in (TOP1, TOP2, BINARY)
    ),
)  # fmt: skip


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
    """One execution of the experiment: its declared stages (data, networks, training and
    evaluation of each row) and its report (tables, Fig. 6, training curves)."""

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
        seg_cfg = self._scheduled(self.config.optimizers["segmentation"])
        self.clf_opt_cfg, self.seg_opt_cfg = agent_optimizer_configs(seg_cfg, self.method.lr_ratio)
        self._counts: Dict[tuple, int] = {}
        self._partial: Dict[str, Tuple[pathlib.Path, Dict[str, float]]] = {}
        # What report() reads, filled by the stages that ran (a stage a dry run skipped leaves
        # its cells empty): scores per stage name, Fig. 6's columns and its images.
        self.scores: Dict[str, dict] = {}
        self.figure: Dict[str, np.ndarray] = {}
        self.figure_inputs: Optional[Tuple[np.ndarray, np.ndarray]] = None

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

    def _count(self, records_dir, split: str, task: str) -> int:
        """Examples the ``task`` pipeline reads from ``split`` (``a+b``: both), from the
        records' labels: images with a lesion annotated (segmentation) or with a grade in
        ``0 .. num_grades - 1`` (classification), each split capped at ``data.max_examples``."""
        total = 0
        for name in pipeline.split_names(split):
            key = (str(records_dir), name, task)
            if key not in self._counts:
                labels = pipeline.read_labels(records_dir, name)
                if task == "segmentation":
                    count = int(labels[keys.MASK_PRESENT].any(axis=1).sum())
                else:
                    grade = labels[keys.GRADE]
                    count = int(((grade >= 0) & (grade < self.num_grades)).sum())
                if self.data.max_examples:
                    count = min(count, int(self.data.max_examples))
                self._counts[key] = count
            total += self._counts[key]
        return total

    def _seg_train(self, tag: str, seed: int, *, joint_with: Optional[str] = None) -> Data:
        """The segmentation training stream of run ``tag`` (one per run: it depends on the
        seed); ``joint_with``: the key of the classification stream a JointSeg stage zips it
        with (the dry run re-batches the pair, :meth:`_joint_stream`)."""
        rebatch = None
        if joint_with is not None:
            key = f"{tag}_seg_train"

            def rebatch(_, global_batch, key=key, cls_key=joint_with):
                return self._joint_stream(
                    self.ctx.data(key).unbatch().batch(global_batch, drop_remainder=True),
                    self.ctx.data(cls_key)
                    .unbatch()
                    .batch(self.method.batch_ratio * global_batch, drop_remainder=True),
                )

        return Data(
            f"{tag}_seg_train",
            build=lambda cache: self._seg_stream(seed, cache),
            examples=self._count(self.seg_dir, self.method.seg_train_split, "segmentation"),
            size=self.method.resize_size,
            masks=keys.NUM_LESIONS,
            shuffle_buffer=SHUFFLE_BUFFER,
            batch=self.seg_batch,
            train=True,
            rebatch=rebatch,
        )

    def _cls_train(self, tag: str, seed: int, *, partial: bool = False) -> Data:
        """The classification training stream of run ``tag``: the true grades, or (``partial``)
        the copy with partial random labels (:meth:`partial_records`, written on first use)."""
        if partial:
            key = f"{tag}_cls_train_partial_labels"

            def build(cache):
                return self._cls_stream(self.partial_records(tag, seed)[0], seed, cache)

        else:
            key = f"{tag}_cls_train"

            def build(cache):
                return self._cls_stream(self.cls_dir, seed, cache)

        return Data(
            key,
            build=build,
            # the partial copy holds the same images; only their grades differ
            examples=self._count(self.cls_dir, self.method.cls_train_split, "classification"),
            size=self.method.resize_size,
            shuffle_buffer=SHUFFLE_BUFFER,
            batch=self.cls_batch,
            train=True,
        )

    def _seg_test(self) -> Data:
        m = self.method
        shown = int(m.figure_images)
        return Data(
            SEG_TEST,
            build=self._seg_test_stream,
            examples=self._count(self.seg_dir, m.seg_test_split, "segmentation"),
            size=m.resize_size,
            masks=keys.NUM_LESIONS,
            batch=SEG_EVAL_BATCH,
            # Fig. 6: its images as fed (float32), true and two networks' predicted class ids
            held_bytes=shown * self.size**2 * (3 * 4 + 8 + 8 * 2),
        )

    def _cls_test(self) -> Data:
        examples = self._count(self.cls_dir, self.method.cls_test_split, "classification")
        return Data(
            CLS_TEST,
            build=self._cls_test_stream,
            examples=examples,
            size=self.method.resize_size,
            batch=CLS_EVAL_BATCH,
            # the evaluation keeps each image's grade probabilities and true grade
            held_bytes=examples * (4 * self.num_grades + 4),
        )

    def _seg_stream(self, seed: int, cache) -> tf.data.Dataset:
        """``(image, {"masks", "mask_present"})`` batches of the segmentation training split."""
        return pipeline.segmentation_dataset(
            self.seg_dir,
            self.method.seg_train_split,
            batch_size=self.seg_batch,
            seed=seed,
            repeat=True,
            shuffle=True,
            shuffle_buffer=SHUFFLE_BUFFER,
            drop_remainder=True,
            cache=cache,
            **self._stream_options("segmentation"),
        )

    def _cls_stream(self, records_dir, seed: int, cache) -> tf.data.Dataset:
        """``(image, grade)`` batches of the classification training split."""
        return pipeline.grading_dataset(
            records_dir,
            self.method.cls_train_split,
            batch_size=self.cls_batch,
            num_classes=self.num_grades,
            seed=seed + 1,
            repeat=True,
            shuffle=True,
            shuffle_buffer=SHUFFLE_BUFFER,
            drop_remainder=True,
            cache=cache,
            **self._stream_options("classification"),
        )

    def _joint_stream(self, seg: tf.data.Dataset, cls: tf.data.Dataset) -> tf.data.Dataset:
        """The cooperative trainer's input: a segmentation batch and a ``method.batch_ratio``
        times larger classification batch per step, ``({"seg_image", "cls_image"},
        {"seg_probs": one-hot classes, "grade"})`` (what
        :func:`drkeras.data.pipeline.two_stream_dataset` yields, made of the run's two training
        streams so that their caches serve every network of the run)."""

        def merge(seg_element, cls_element):
            (seg_image, seg_targets), (cls_image, grade) = seg_element, cls_element
            inputs = {pipeline.SEG_IMAGE: seg_image, pipeline.CLS_IMAGE: cls_image}
            return inputs, {SEG_TARGET: self._classes(seg_targets[keys.MASKS]), keys.GRADE: grade}

        ds = tf.data.Dataset.zip((seg, cls)).map(merge, num_parallel_calls=pipeline.AUTOTUNE)
        return ds.prefetch(pipeline.AUTOTUNE).with_options(pipeline.distribution_options())

    def _seg_pairs(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda x, y: (x, {keys.SEG_PROBS: self._classes(y[keys.MASKS])}))

    @staticmethod
    def _cls_pairs(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda x, grade: (x, {keys.GRADE_PROBS: grade}))

    def _seg_test_stream(self, cache) -> tf.data.Dataset:
        """Batches ``(image, {"masks", "mask_present"})`` of the segmentation test split
        (central crops), in order."""
        options = dict(self._stream_options("segmentation"), augment=False)
        return pipeline.segmentation_dataset(
            self.seg_dir,
            self.method.seg_test_split,
            batch_size=SEG_EVAL_BATCH,
            shuffle=False,
            cache=cache,
            **options,
        )

    def _cls_test_stream(self, cache) -> tf.data.Dataset:
        """Batches ``(image, grade)`` of the classification test split(s), in order."""
        options = dict(self._stream_options("classification"), augment=False)
        return pipeline.evaluation_dataset(
            pipeline.grading_dataset,
            self.cls_dir,
            self.method.cls_test_split,
            cache=cache,
            batch_size=CLS_EVAL_BATCH,
            num_classes=self.num_grades,
            **options,
        )

    def partial_records(self, tag: str, seed: int) -> Tuple[pathlib.Path, Dict[str, float]]:
        """The classification training split of run ``tag`` with only
        ``method.true_label_fraction`` of its labels true (section II-C), written once per run
        under ``data/partial_labels``, and its statistics."""
        if tag not in self._partial:
            m = self.method
            folder = self.ctx.out_dir / "data" / "partial_labels" / f"{m.cls_dataset}_{tag}"
            stats = write_partial_random_labels(
                self.cls_dir,
                m.cls_train_split,
                folder,
                true_fraction=m.true_label_fraction,
                num_grades=self.num_grades,
                seed=seed,
            )
            log.info("partial random labels (%s): %s", tag, stats)
            self._partial[tag] = (folder, stats)
        return self._partial[tag]

    # -------------------------------------------------------------------------- networks

    def _build(self, seed: int, build: Callable[[], keras.Model]) -> keras.Model:
        tf.keras.utils.set_random_seed(seed)
        with self.ctx.strategy.scope():
            return build()

    def _joint_network(self) -> keras.Model:
        m = self.method
        return cooperative.build_cooperative_model(
            input_shape=self.shape,
            num_seg_classes=len(self.class_names),
            num_grades=self.num_grades,
            encoder_widths=m.encoder_widths,
            encoder_blocks=m.encoder_blocks,
            classifier_widths=m.classifier_widths,
            classifier_blocks=m.classifier_blocks,
            dropout=self.config.model.dropout,
            name="jointseg",
        )

    def _encoder(self, kind: str) -> keras.Model:
        m = self.method
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

    def _encoder_classifier(self, kind: str, encoder: keras.Model) -> keras.Model:
        feature = "fc7" if kind == "fcn8s" else cooperative.ENCODER_OUTPUT
        return cooperative.build_encoder_classifier(
            encoder,
            feature=feature,
            num_grades=self.num_grades,
            dropout=self.config.model.dropout,
        )

    def _segmenter(self, kind: str, encoder: keras.Model) -> keras.Model:
        if kind == "fcn8s":
            return cooperative.build_fcn8s(
                input_shape=self.shape, num_seg_classes=len(self.class_names), encoder=encoder
            )
        return cooperative.build_inception_unet(
            input_shape=self.shape,
            num_seg_classes=len(self.class_names),
            decoder_blocks=self.method.unet_decoder_blocks,
            encoder=encoder,
        )

    def _grader(self, name: str, encoder_weights) -> keras.Model:
        return build_reference_grader(
            name,
            input_shape=self.shape,
            num_grades=self.num_grades,
            encoder_weights=encoder_weights,
            dropout=self.config.model.dropout,
        )

    @staticmethod
    def _optimizer_kind(cfg: OptimizerConfig) -> str:
        return cfg.name if cfg.name in ("adam", "sgd", "rmsprop") else "adam"

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

    def _fit(self, model, data):
        return self.ctx.fit(model, data, steps_per_epoch=self.steps)

    # -------------------------------------------------------------------------- stages

    def stages(self) -> List[Stage]:
        """Per run (``train.runs``, seeds ``seed, seed + 1, ...``): JointSeg, JointSeg on
        partial random labels, FCN-8s and the UNet (each: encoder pre-trained as a classifier,
        then segmentation; and from random weights), VGG and InceptionV3."""
        declared: List[Stage] = []
        for run in range(int(self.config.train.runs)):
            seed, tag = int(self.config.seed) + run, f"run{run}"
            declared.append(self._joint_stage(tag, seed, partial=False))
            declared.append(self._joint_stage(tag, seed, partial=True))
            for row in (FCN, UNET):
                kind = "fcn8s" if row == FCN else "unet"
                declared.append(self._encoder_classifier_stage(kind, tag, seed))
                declared.append(self._segmentation_stage(row, kind, True, tag, seed))
                declared.append(self._segmentation_stage(row, kind, False, tag, seed))
            for row in GRADER_ROWS:
                declared.append(self._grader_stage(row, tag, seed))
        return declared

    def _joint_stage(self, tag: str, seed: int, *, partial: bool) -> Stage:
        """JointSeg trained cooperatively (all labels true, or section II-C's partial random
        labels), evaluated on both test splits; run 0's network is exported and drawn."""
        group = "jointseg_partial_labels" if partial else "jointseg"
        name = f"{tag}_{group}"
        cls = self._cls_train(tag, seed, partial=partial)
        seg = self._seg_train(tag, seed, joint_with=cls.key)
        first = tag == "run0" and not partial

        def run(_inputs):
            correct = 100.0
            if partial:
                correct = 100.0 * self.partial_records(tag, seed)[1]["correct"]
            network = self._build(seed, self._joint_network)
            with self.ctx.strategy.scope():
                trainer = CooperativeTrainer.from_model(network)
                trainer.compile(
                    clf_optimizer=build_optimizer(self.clf_opt_cfg),
                    seg_optimizer=build_optimizer(self.seg_opt_cfg),
                    run_eagerly=self.method.run_eagerly,
                )
            self._fit(trainer, self._joint_stream(self.ctx.data(seg.key), self.ctx.data(cls.key)))
            result = self._evaluate_both(network, figure=JOINT if first else None)
            result["correct"] = correct
            if first and self.ctx.is_chief:
                log.info("exported JointSeg to %s", self.export(network))
            self.scores[name] = result
            return result

        return Stage(
            name,
            run=run,
            nets=[
                # Each step feeds the segmentation batch through the whole network and the
                # classification batch through the encoder and classifier: planned as the sum
                # through the whole network (an upper bound on its activations).
                Net(
                    "jointseg",
                    self._joint_network,
                    optimizer=self._optimizer_kind(self.seg_opt_cfg),
                    batch=self.seg_batch + self.cls_batch,
                )
            ],
            data=[seg, cls, self._seg_test(), self._cls_test()],
            steps=self.steps,
            epochs=self.epochs,
            batch=self.seg_batch,
            group=group,
        )

    def _encoder_classifier_stage(self, kind: str, tag: str, seed: int) -> Stage:
        """Table I's pre-training: the baseline's encoder trained as a classifier on the
        classification stream; its output is the trained encoder."""

        def run(_inputs):
            encoder = self._build(seed, lambda: self._encoder(kind))
            with self.ctx.strategy.scope():
                classifier = self._encoder_classifier(kind, encoder)
            self._compile_cls(classifier)
            self._fit(classifier, self._cls_pairs(self.ctx.data(f"{tag}_cls_train")))
            return encoder

        group = f"{kind}_encoder_classifier"
        return Stage(
            f"{tag}_{group}",
            run=run,
            nets=[
                Net(
                    group,
                    lambda: self._encoder_classifier(kind, self._encoder(kind)),
                    optimizer=self._optimizer_kind(self.clf_opt_cfg),
                )
            ],
            data=[self._cls_train(tag, seed)],
            steps=self.steps,
            epochs=self.epochs,
            batch=self.cls_batch,
            group=group,
        )

    def _segmentation_stage(
        self, row: str, kind: str, pretrained: bool, tag: str, seed: int
    ) -> Stage:
        """FCN-8s or the inception UNet on the segmentation stream: on the encoder its
        classification pre-training returned (Table I), or from random weights (Table II)."""
        group = f"{kind}_{'pretrained' if pretrained else 'random'}"
        name = f"{tag}_{group}"
        source = f"{tag}_{kind}_encoder_classifier"
        figure = "UNet (improved inception, pre-trained)" if kind == "unet" and pretrained else None

        def run(inputs):
            if pretrained:
                encoder = inputs[source]
            else:
                encoder = self._build(seed, lambda: self._encoder(kind))
            with self.ctx.strategy.scope():
                model = self._segmenter(kind, encoder)
            self._compile_seg(model)
            self._fit(model, self._seg_pairs(self.ctx.data(f"{tag}_seg_train")))
            seg = self.evaluate_segmentation(model, figure=figure if tag == "run0" else None)
            self.scores[name] = {"seg": seg}
            return self.scores[name]

        return Stage(
            name,
            run=run,
            nets=[
                Net(
                    kind,
                    lambda: self._segmenter(kind, self._encoder(kind)),
                    optimizer=self._optimizer_kind(self.seg_opt_cfg),
                )
            ],
            data=[self._seg_train(tag, seed), self._seg_test()],
            steps=self.steps,
            epochs=self.epochs,
            batch=self.seg_batch,
            consumes=(source,) if pretrained else (),
            group=group,
        )

    def _grader_stage(self, row: str, tag: str, seed: int) -> Stage:
        """Tables III-IV: a ``keras.applications`` grader on the classification stream."""
        name = dict(zip(GRADER_ROWS, self.method.graders))[row]

        def run(_inputs):
            weights = self.config.model.encoder_weights
            model = self._build(seed, lambda: self._grader(name, weights))
            self._compile_cls(model)
            self._fit(model, self._cls_pairs(self.ctx.data(f"{tag}_cls_train")))
            self.scores[f"{tag}_{name}"] = {"grading": self.evaluate_grading(model)}
            return self.scores[f"{tag}_{name}"]

        return Stage(
            f"{tag}_{name}",
            run=run,
            # the plan reads shapes only: random weights, nothing downloaded
            nets=[
                Net(
                    name,
                    lambda: self._grader(name, None),
                    optimizer=self._optimizer_kind(self.clf_opt_cfg),
                )
            ],
            data=[self._cls_train(tag, seed), self._cls_test()],
            steps=self.steps,
            epochs=self.epochs,
            batch=self.cls_batch,
            group=name,
        )

    # -------------------------------------------------------------------------- evaluation

    @staticmethod
    def _outputs(model, images) -> Dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in model(images, training=False).items()}

    def _evaluate_both(self, network, *, figure: Optional[str]) -> dict:
        return {
            "seg": self.evaluate_segmentation(network, figure=figure),
            "grading": self.evaluate_grading(network),
        }

    def evaluate_segmentation(self, model, *, figure: Optional[str] = None) -> Dict[str, object]:
        """Scores on the segmentation test split, streamed batch by batch into the counts.
        ``figure``: keep the predicted class ids of the first ``method.figure_images`` images
        as that column of Fig. 6 (and the images and their truth, once)."""
        score = SegmentationIoU(self.method.class_set)
        keep = int(self.method.figure_images) if figure else 0
        images, truths, predicted = [], [], []
        for image, targets in self.ctx.data(SEG_TEST):
            masks = targets[keys.MASKS].numpy()
            probs = self._outputs(model, image)[keys.SEG_PROBS]
            score.update(probs, masks, targets[keys.MASK_PRESENT].numpy())
            held = sum(len(p) for p in predicted)
            if held < keep:
                take = keep - held
                predicted.append(probs[:take].argmax(-1))
                images.append(image.numpy()[:take])
                truths.append(self._classes(masks[:take]).numpy().argmax(-1))
        if predicted:
            self.figure[figure] = np.concatenate(predicted)
            if self.figure_inputs is None:
                self.figure_inputs = (np.concatenate(images), np.concatenate(truths))
        return score.result()

    def evaluate_grading(self, model) -> Dict[str, float]:
        """Top-1, top-2 and binary accuracy on the classification test split (streamed: only
        the grade probabilities and true grades are kept)."""
        truth, probs = [], []
        for image, grade in self.ctx.data(CLS_TEST):
            probs.append(self._outputs(model, image)[keys.GRADE_PROBS])
            truth.append(grade.numpy())
        truth, probs = np.concatenate(truth), np.concatenate(probs)
        return {
            TOP1: 100.0 * metrics.accuracy(truth, probs),
            TOP2: 100.0 * metrics.top_k_accuracy(truth, probs, k=2),
            BINARY: 100.0 * metrics.screening_scores(probs, truth)["normal_accuracy"],
        }

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

    # -------------------------------------------------------------------------- report

    def report(self) -> List[ResultsTable]:
        """Tables I-IV and the partial-label table from the stages' scores (a cell whose
        stage did not run stays empty), Fig. 6 and the training curves."""
        tables = self._tables()
        t1, t2, t3, t4, t5 = tables
        partial_row = partial_labels_row(self.method.true_label_fraction)
        for run in range(int(self.config.train.runs)):
            tag = f"run{run}"
            joint = self.scores.get(f"{tag}_jointseg")
            if joint:
                for table in (t1, t2):
                    table.add(JOINT, MIOU, 100.0 * joint["seg"]["miou"])
                    table.add(JOINT, LESION_MIOU, 100.0 * joint["seg"]["lesion_miou"])
                self._grading_cells(t3, t4, JOINT, joint["grading"])
                self._partial_row(t5, ALL_LABELS_TRUE, joint)
            partial = self.scores.get(f"{tag}_jointseg_partial_labels")
            if partial:
                self._partial_row(t5, partial_row, partial)
            for row in (FCN, UNET):
                kind = "fcn8s" if row == FCN else "unet"
                for pretrained, table in ((True, t1), (False, t2)):
                    scores = self.scores.get(
                        f"{tag}_{kind}_{'pretrained' if pretrained else 'random'}"
                    )
                    if scores:
                        table.add(row, MIOU, 100.0 * scores["seg"]["miou"])
                        table.add(row, LESION_MIOU, 100.0 * scores["seg"]["lesion_miou"])
            for row, name in zip(GRADER_ROWS, self.method.graders):
                scores = self.scores.get(f"{tag}_{name}")
                if scores:
                    self._grading_cells(t3, t4, row, scores["grading"])
        self._figures()
        return tables

    @staticmethod
    def _grading_cells(t3, t4, row: str, grading: Dict[str, float]) -> None:
        t3.add(row, TOP1, grading[TOP1])
        t3.add(row, TOP2, grading[TOP2])
        t4.add(row, BINARY, grading[BINARY])

    @staticmethod
    def _partial_row(table, row: str, result: dict) -> None:
        seg, grading = result["seg"], result["grading"]
        table.add(row, MIOU, 100.0 * seg["miou"])
        table.add(row, LESION_MIOU, 100.0 * seg["lesion_miou"])
        for column in (TOP1, TOP2, BINARY):
            table.add(row, column, grading[column])
        table.add(row, LABELS_CORRECT, result["correct"])

    def _tables(self) -> List[ResultsTable]:
        m, config = self.method, self.config
        summary = run_config_summary(config)
        budget = (
            f"{config.train.epochs} x {config.train.steps_per_epoch} steps per network, "
            f"segmentation batch {self.seg_batch}, classification batch {self.cls_batch} "
            f"(ratio {m.batch_ratio}), learning rates {self.seg_opt_cfg.learning_rate:g} / "
            f"{self.clf_opt_cfg.learning_rate:g} (ratio {m.lr_ratio:g}), {self.size} px crops of "
            f"{m.resize_size} px"
        )
        seg_where = f"{m.seg_dataset} {m.seg_test_split}"
        cls_where = f"{m.cls_dataset} {m.cls_test_split}"
        miou_note = (
            f"mIoU over the classes {', '.join(self.class_names)} (background included), IoU "
            "pooled over the images; lesion mIoU without the background"
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

    def _figures(self) -> None:
        columns = {
            name: self.figure[name]
            for name in ("UNet (improved inception, pre-trained)", JOINT)
            if name in self.figure
        }
        if columns and self.figure_inputs is not None:
            images, truths = self.figure_inputs
            shown = min(len(images), *(len(v) for v in columns.values()))
            path = plot_segmentation_comparison(
                self.display(images[:shown]),
                truths[:shown],
                {name: pred[:shown] for name, pred in columns.items()},
                self.ctx.out_dir / "fig6_segmentation.png",
                class_names=self.class_names,
                title=f"Fig. 6-style comparison on {self.method.seg_dataset} "
                f"{self.method.seg_test_split} (run 0)",
            )
            log.info("Fig. 6 written to %s", path)
        if self.ctx.history_path.is_file():
            plot_history(self.ctx.history_path, self.ctx.out_dir / "training_curves.png")


def export_preprocess(config: Config) -> dict:
    """The export's input transform: the evaluation pipeline's (``_Run._seg_test_stream``,
    ``_Run._cls_test_stream``), i.e. the field of view resized to ``method.resize_size`` (256),
    rounded to uint8 as the record pipelines cache it, its central ``data.image_size`` (224)
    crop, then ``data.graham`` and ``data.normalization``. A photograph served by the
    SavedModel thus shows lesions at the scale of training (random 224 crops of the 256 image),
    not 12.5 % smaller as a direct resize to 224 would."""
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
    presets = {"smoke": SMOKE, "mini": MINI, "paper": PAPER}

    def pretrained_weights(self, config: Config) -> list:
        """The ImageNet files of the Tables III-IV graders when ``model.encoder_weights`` asks
        for them (the paper preset trains everything from scratch); see :mod:`drkeras.weights`."""
        from drkeras import weights

        w = config.model.encoder_weights
        return weights.collect(*(weights.reference_grader(g, w) for g in config.method.graders))

    def prepare(self, ctx: RunContext) -> _Run:
        """The run's stages (:meth:`_Run.stages`) and its report (:meth:`_Run.report`)."""
        return _Run(ctx)


if __name__ == "__main__":
    raise SystemExit(main(JointSegExperiment()))
