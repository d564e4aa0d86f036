"""MTUnet: multi-task DR grading and lesion segmentation with a semi-supervised stage.

Reproduces Foo, Hsu, Lee, Lim, Wong, "Multi-Task Learning for Diabetic Retinopathy Grading and
Lesion Segmentation", AAAI 2020: Tables 1-4 and Fig. 6.

Command::

    python experiments/mtunet.py                                # --data synthetic --preset smoke
    python experiments/mtunet.py --data RECORDS --preset paper  # RECORDS/{idrid,eyepacs,messidor2}

Expected runtime: smoke, 6-10 minutes on 2 CPU cores (measured from a fresh clone: 5 min 36 s
wall on a quiet 2-core VM, 9 min 39 s with other jobs beside it; synthetic IDRiD, EyePACS and
DDR layouts generated and converted; 2 runs of 14 networks at 96 px, 3 steps per network on
EyePACS, 12 on IDRiD-S); paper, days on a multi-GPU server (3 runs x 14 networks at 512 x 512,
50 epochs; not run here).

Expected result: smoke, every row of Tables 1-4 filled beside the paper's numbers, the paired
t-test of Table 2, ``fig6_segmentation.png``, ``history.png`` and ``export/mtunet`` (reload
checked), and, printed at the end and saved as ``comparison.json``, whether MTUnet's lesion Dice
is not worse than single-task UNet's at equal budget. Smoke numbers are not the paper's: after
12 steps the VGG16-UNets predict background only (red / yellow Dice 0, pseudo masks ~100 %
background), the other segmenters' class maps are still noise (Dice 0-4 %), grading ROC is
near chance (50 %); a longer synthetic run (40 IDRiD-S steps, 3 runs) gave Dice 0 for every
network but UNet (0.4 %). Unweighted Eq. (1) on 96-px images with lesions of a few pixels needs
far more steps than a CPU budget allows. The paper preset on the real data should approach
Tables 1-4 (MTUnet: Dice 75.2 / 84.3 red / yellow, ROC 84-99 % per grade on IDRiD-D).

Mini preset (``--preset mini``): the paper preset scaled to learn the synthetic benchmark on a
CPU; every key it changes, with its kind and why, is in ``MINI_CHANGES`` (128 px, quarter width,
the smaller grader and encoder families, random initialisation, the published IDRiD-S counts,
40 + 12 epochs, one run, Adam 1e-3).

What runs, ``train.runs`` times (seeds ``seed, seed + 1, ...``), every network from scratch:

1. Fig. 7, the semi-supervised process. (a) The initial segmenter, MTUnet's VGG16-UNet without
   the grading head, learns the lesion masks of IDRiD-S train (Eq. 1). (b) It predicts masks for
   the image-level set, EyePACS train + val + test pooled and balanced to the count of the
   rarest grade (grade 4: 1,914 per grade in the paper); for grade-0 images the red and yellow
   outputs are ignored (:func:`drkeras.pseudo_masks.pseudo_masks_from_probs`). The pseudo masks
   are written once per run (``pseudo/run<r>.tfrecord``: class map and grade, in the order of
   the balanced set) and augmented with the image, read again from the records.
   (c) The multi-task networks learn (pseudo mask, grade) on that set, ``L = L_B + alpha L_C``
   (Eq. 1-3, alpha 1).
2. Table 1: variants A (grade from the decoder), B (two steps: segmenter, then a grader on image
   + masks) and C (= MTUnet) trained as 1(c). Dice (%): the mean of the red- and yellow-lesion
   Dice on IDRiD-S test (below); ROC (%): the mean over the five grades of the one-vs-rest ROC
   AUC on IDRiD-D test. The paper does not define either aggregate; these are our readings.
3. Table 2: UNet, LinkNet, Feature Pyramid, DeepLabv3 (segmentation-models / keras-cv baselines,
   single task) and MTUNet, each trained on IDRiD-S train for ``method.seg_epochs``; MTUNet's
   grades for those images come from the semi-supervised process (the Table 1 variant C's
   predicted grades, "we use the semi-supervised process in Figure 7 to obtain the DR severity
   level for the images in IDRiD-S"). Extra row: the Fig. 7 initial network, i.e. MTUnet's own
   architecture without the grading head, trained identically: the like-for-like single-task
   comparison. The paired t-test MTUNet vs LinkNet over the runs is a row of the table.
4. Tables 3-4: NASNet, DenseNet-201, ResNeXt-101, InceptionResNetV2 graders trained on the
   balanced EyePACS set (the same images, augmentations and steps as 1(c)) and the Table 1
   variant C (MTUnet); one-vs-rest ROC AUC per grade on IDRiD-D test (Table 3) and on the
   external set (Table 4). SiDRP14-15 is private; ``method.external`` names the converted
   dataset used instead: Messidor-2 (ICDRS grades, adjudicated) in the paper and mini presets,
   DDR's test split in smoke (fewer images to generate).
5. Fig. 6: image, ground truth and every Table 2 network's prediction on IDRiD-S test images
   (red lesions red, yellow lesions yellow, optic disc purple); ``export/mtunet``: the run-0
   MTUnet as a SavedModel (``grade_probs``, ``seg_probs``) with its reload check.

Stages. Each network of each run is one declared stage (:class:`drkeras.stages.Stage`) named
``run<r>_<network>`` in the group ``<network>`` (a dry run trains run 0 and only builds the data
of the others): ``initial_segmenter``, ``variant_a``, ``variant_b_step1``, ``variant_b_step2``
(consumes step 1's network), ``variant_c``, ``grader_<row>`` (these consume the run's
``initial_segmenter``: its pseudo masks), ``unet``, ``linknet``, ``feature_pyramid``,
``deeplabv3`` and ``mtunet_idrid_s`` (consumes ``variant_c``: its predicted grades). The
datasets (IDRiD-S train and test, IDRiD-D test, the external set, the balanced EyePACS set) come
from ``ctx.data``, cached as the runner decides (``data.cache``); evaluations stream the test
splits through the metrics.

Dice. Pixel classes are ``method.class_set`` (default background / red = MA + HE / yellow = EX +
SE / optic disc, mutually exclusive, see :mod:`drkeras.models.mtunet`); a pixel's predicted class
is the argmax. Red (yellow) Dice is ``2|X n Y| / (|X| + |Y|)`` with TP, FP and FN POOLED over
all pixels of all test images (one value per class and run, the IDRiD-challenge convention),
not a mean of per-image Dice; tables show mean ± std over runs (sample std).

Equal budget. Within a table every network sees the same training stream (same images, order,
augmentation draws and number of steps), the same optimizer and input size. Variant B trains
each of its two steps for the same epochs. In a run, the VGG16-UNet family (the single-task
initial network, the variants, both MTUnets) starts from the same weights in the layers it
shares, so single- vs multi-task differences are not differences of initialisation.
Per-network input scaling: with ``model.encoder_weights=imagenet`` each network gets the
scaling its ImageNet weights expect (VGG16: caffe; NASNet / InceptionResNetV2: [-1, 1];
DenseNet: torch; image-classifiers ResNeXt / ResNet: raw 0-255; keras-cv ResNetV2 of DeepLab:
[0, 1]), from the table shared with PLDMLT and the exports
(:mod:`drkeras.models.input_scaling`); without pretrained weights all use
``data.normalization``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import math
import pathlib
import zlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, metrics
from drkeras.claims import Claim
from drkeras.config import (
    PUBLISHED_IDRID_S,
    RANDOM_WEIGHTS,
    SYMMETRIC_INPUTS,
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PresetChange,
    TrainConfig,
    derive_preset,
)
from drkeras.data import augment as aug
from drkeras.data import pipeline, preprocess
from drkeras.experiment import Experiment, RunContext, main, run_config_summary
from drkeras.export import export_model, pipeline_preprocess
from drkeras.models import baselines, blocks, mtunet
from drkeras.models.input_scaling import input_scaling
from drkeras.plots import display_image, new_figure, plot_history, save_figure
from drkeras.pseudo_masks import pseudo_masks_from_probs
from drkeras.results import ResultsTable
from drkeras.stages import Data, Net, Stage
from drkeras.training.optim import build_optimizer

__all__ = [
    "GRADER_ROWS",
    "GRADE_COLUMNS",
    "MTUNET_AUGMENT",
    "MTUnetExperiment",
    "Method",
    "PAPER",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "PAPER_TABLE3",
    "PAPER_TABLE4",
    "SEGMENTER_ROWS",
    "SMOKE",
    "balanced_grading_ids",
    "dice_table",
    "lesion_group_dice",
    "plot_segmentation_comparison",
]

log = logging.getLogger("drkeras.mtunet")

# ------------------------------------------------------------------------------ the paper's data

DICE, ROC = "Dice (%)", "ROC (%)"
RED, YELLOW = "Red lesions", "Yellow lesions"
GRADE_COLUMNS = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")

# Table 1: network variants (Dice %, ROC %).
PAPER_TABLE1: Dict[str, Dict[str, float]] = {
    "Variant A": {DICE: 55.37, ROC: 86.27},
    "Variant B": {DICE: 73.89, ROC: 82.05},
    "Variant C": {DICE: 76.12, ROC: 89.45},
}
VARIANT_ROWS = {"Variant A": "A", "Variant B": "B", "Variant C": "C"}

# Table 2: Dice (%) for red / yellow lesions, (mean, std) over 3 runs.
PAPER_TABLE2: Dict[str, Dict[str, Tuple[float, float]]] = {
    "UNet": {RED: (62.25, 7.646), YELLOW: (76.03, 1.415)},
    "LinkNet": {RED: (73.56, 1.026), YELLOW: (83.54, 0.19)},
    "Feature Pyramid": {RED: (72.66, 0.541), YELLOW: (77.28, 0.429)},
    "DeepLabv3": {RED: (56.73, 1.217), YELLOW: (72.01, 1.661)},
    "MTUNet": {RED: (75.15, 0.778), YELLOW: (84.27, 0.456)},
}
SEGMENTER_ROWS = {
    "UNet": "unet",
    "LinkNet": "linknet",
    "Feature Pyramid": "fpn",
    "DeepLabv3": "deeplabv3plus",
}
MTUNET_T2_ROW = "MTUNet"
SINGLE_TASK_ROW = "VGG16-UNet, single task (Fig. 7 initial network)"
TTEST_ROW = "MTUNet vs LinkNet: paired t-test p"

# Tables 3-4: ROC (%) per DR level, (mean, std) over runs.
PAPER_TABLE3: Dict[str, Tuple[Tuple[float, float], ...]] = {
    "NASNet": ((93.00, 0.784), (79.07, 3.881), (71.75, 5.342), (72.63, 4.239), (83.95, 4.729)),
    "DenseNet-201": (
        (62.25, 13.49),
        (38.64, 5.872),
        (40.49, 5.590),
        (36.98, 6.060),
        (36.83, 12.78),
    ),
    "ResNeXt-101": ((92.09, 3.223), (79.28, 4.391), (67.22, 2.499), (72.26, 9.102), (66.62, 4.879)),
    "InceptionResNetV2": (
        (94.86, 3.286),
        (77.92, 10.03),
        (67.91, 13.00),
        (75.74, 5.868),
        (67.17, 14.09),
    ),
    "MTUnet": ((99.00, 0.330), (89.94, 2.093), (84.13, 3.011), (82.86, 3.110), (87.20, 2.859)),
}
PAPER_TABLE4: Dict[str, Tuple[Tuple[float, float], ...]] = {
    "NASNet": ((61.37, 0.569), (47.14, 1.547), (59.81, 3.224), (81.88, 8.410), (87.64, 0.538)),
    "DenseNet-201": (
        (51.00, 3.190),
        (48.11, 2.053),
        (43.44, 9.126),
        (57.47, 16.385),
        (66.33, 14.374),
    ),
    "ResNeXt-101": (
        (55.55, 3.921),
        (52.10, 1.461),
        (58.69, 4.049),
        (75.59, 12.481),
        (42.76, 5.103),
    ),
    "InceptionResNetV2": (
        (66.79, 4.272),
        (46.84, 5.985),
        (59.16, 10.337),
        (83.23, 7.013),
        (83.52, 2.653),
    ),
    "MTUnet": ((78.56, 0.122), (58.44, 0.606), (84.75, 1.875), (97.77, 0.745), (98.11, 0.867)),
}
GRADER_ROWS = ("NASNet", "DenseNet-201", "ResNeXt-101", "InceptionResNetV2")
MTUNET_GRADING_ROW = "MTUnet"
# The architectures each grader row of the paper names; anything else is a substitute and the
# table title says so.
_ROW_ARCHITECTURES = {
    "NASNet": ("nasnet_large", "nasnet_mobile"),
    "DenseNet-201": ("densenet201",),
    "ResNeXt-101": ("resnext101",),
    "InceptionResNetV2": ("inception_resnet_v2",),
}
# A VGG16 classifier (MTUnet's encoder + its grading head, at model.width): not in the paper,
# accepted as a cheap grader for quick test runs, always named in the table title.
VGG16_GRADER = "vgg16"
# The name of MTUnet's VGG16 encoder (keras.applications layout and weights) in the
# input-scaling table (drkeras.models.input_scaling).
VGG16_ENCODER = "vgg16"

# "random rotations, width/height shifts, shear, zoom, vertical/horizontal flips and channel
# shifts" (section "Semi-Supervised Training"): the parameter list of Keras'
# ImageDataGenerator (the paper's networks are Keras), whose conventions we follow: one channel
# shift for all channels clipped to the image's own range, x and y zoom drawn apart, the
# nearest edge pixel as fill. The ranges are not given, these are ours.
MTUNET_AUGMENT = dataclasses.replace(
    aug.NO_AUGMENT,
    flip_horizontal=True,
    flip_vertical=True,
    rotation_deg=20.0,
    zoom=0.1,
    zoom_per_axis=True,
    shift=0.1,
    shear_deg=10.0,
    channel_shift=10.0,
    channel_shift_shared=True,
    fill="nearest",
)

# A pseudo-mask record (``pseudo/run<r>.tfrecord``): the class map of one image of the balanced
# set (PNG) and its grade, in the order of that set; the image itself is read from the records.
_PSEUDO_FEATURES = {
    "classes": tf.io.FixedLenFeature([], tf.string),
    keys.GRADE: tf.io.FixedLenFeature([], tf.int64),
}

# The run's datasets (``ctx.data`` keys).
SEG_TRAIN, SEG_TEST = "idrid_s_train", "idrid_s_test"
IDRID_TEST, EXTERNAL_TEST = "idrid_d_test", "external_test"
BALANCED_SET = "grading_balanced"


# ------------------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class Method:
    """MTUnet's own settings (``--set method.<field>=...``).

    Attributes:
        alpha: weight of the grading loss, ``L = L_B + alpha L_C`` (Eq. 3; 1 in the paper).
        class_set: pixel classes (:data:`drkeras.models.mtunet.CLASS_SETS`); Table 2's red and
            yellow Dice group the classes made of MA/HE and of EX/SE.
        seg_epochs: epochs of every IDRiD-S training (the Fig. 7 initial network and Table 2);
            ``train.epochs`` is that of the EyePACS stage (Table 1, Tables 3-4). The paper gives
            50 epochs for the variants only; we use 50 for both.
        grading_set: the image-level dataset of the semi-supervised stage (Kaggle = EyePACS).
        grading_splits: its splits pooled before balancing (the paper combines Kaggle's
            training and test images; our EyePACS records split the test set into val + test).
        max_per_grade: cap on images per grade after balancing (0: the paper's rule only, the
            count of the rarest grade, 1,914 on EyePACS).
        external: the converted dataset standing in for the private SiDRP14-15 (Table 4): an
            ICDRS-graded set, ``messidor2`` (paper and mini presets) or ``ddr`` (smoke).
        external_split: its split used as the test set.
        graders: registry names (:data:`drkeras.models.baselines.GRADERS`, or ``vgg16``) of
            the four grader rows, in the order of :data:`GRADER_ROWS`; a name the paper's row
            does not name is written in the table title.
        segmenter_backbone: encoder of the UNet / LinkNet / Feature Pyramid baselines
            (segmentation-models; the paper does not say, VGG16 is MTUnet's own encoder).
        deeplab_backbone: encoder of the DeepLab baseline (:data:`baselines.DEEPLAB_BACKBONES`).
        run_eagerly: train and predict eagerly. Faster for a few steps on a CPU: tracing the
            graphs of DenseNet-201, ResNeXt or NASNet takes one to five minutes each.
        figure_images: IDRiD-S test images shown in Fig. 6.
    """

    alpha: float = 1.0
    class_set: str = mtunet.DEFAULT_CLASS_SET
    seg_epochs: int = 50
    grading_set: str = "eyepacs"
    grading_splits: Tuple[str, ...] = ("train", "val", "test")
    max_per_grade: int = 0
    external: str = "messidor2"
    external_split: str = "test"
    graders: Tuple[str, ...] = ("nasnet_large", "densenet201", "resnext101", "inception_resnet_v2")
    segmenter_backbone: str = "vgg16"
    deeplab_backbone: str = "resnet50_v2"
    run_eagerly: bool = False
    figure_images: int = 2


# "Performance Study": Adam 1e-5, 512 x 512 x 3, ImageNet encoder, 50 epochs; Table 2 averages
# three runs. Not given: the batch size (8 assumed: two 512-px images per V100 of their 4-GPU
# server) and the augmentation ranges (MTUNET_AUGMENT).
PAPER = Config(
    method=Method(),
    data=DataConfig(
        image_size=512,
        batch_size=8,
        normalization="imagenet_caffe",  # what the ImageNet VGG16 encoder expects
        augment=True,
    ),
    model=ModelConfig(encoder_weights="imagenet", width=1.0),
    optimizers={"model": OptimizerConfig(name="adam", learning_rate=1e-5)},
    train=TrainConfig(epochs=50, runs=3, verbose=2),
)

# Minutes on 2 CPU cores: 96 px (InceptionResNetV2 needs >= 75, the VGG16-UNet a multiple of
# 32), quarter-width VGG16-UNets and decoders, 2 runs (mean ± std and the t-test need two), a
# learning rate that moves in a few steps. The EyePACS stage is 3 steps per network (4 images
# per grade, batch 8): the ImageNet graders cost 5-15 s per step and 5-30 s to build on a CPU.
# The IDRiD-S stage gets 12 steps. NASNet is NASNetMobile, ResNeXt-101 is ResNeXt-50 and the
# baselines' encoders are ResNet-18 (the titles say so): NASNetLarge or ResNeXt-101 alone would
# take most of the budget.
SMOKE = Config(
    method=Method(
        seg_epochs=12,
        max_per_grade=4,
        external="ddr",
        graders=("nasnet_mobile", "densenet201", "resnext50", "inception_resnet_v2"),
        segmenter_backbone="resnet18",
        deeplab_backbone="resnet18_v2",
        run_eagerly=True,
    ),
    data=DataConfig(image_size=96, batch_size=8, synthetic_size=128, augment=True),
    model=ModelConfig(encoder_weights=None, width=0.25),
    optimizers={"model": OptimizerConfig(name="adam", learning_rate=1e-3)},
    train=TrainConfig(epochs=1, runs=2, verbose=2, keep_checkpoints="none"),
)

# The paper's topology and algorithm, scaled to learn the synthetic benchmark on 2 CPU cores
# (``--preset mini``; make evidence): every key it changes from PAPER, with its kind and why.
MINI_CHANGES = {
    "data.image_size": PresetChange("resolution", "128", "512 px -> 128 px (a multiple of 32)"),
    "model.width": PresetChange("width", "0.25", "quarter-width VGG16-UNets and decoders"),
    "method.graders": PresetChange(
        "width",
        "nasnet_mobile,densenet201,resnext50,inception_resnet_v2",
        "NASNet-Mobile for NASNet-Large and ResNeXt-50 for ResNeXt-101, the smaller members of "
        "their families (either large one alone would take the CPU budget); titles say so",
    ),
    "method.segmenter_backbone": PresetChange(
        "width", "resnet18", "Table 2's UNet / LinkNet / FPN encoders: ResNet-18 for VGG16"
    ),
    "method.deeplab_backbone": PresetChange(
        "width", "resnet18_v2", "Table 2's DeepLab encoder: ResNet-18 V2 for ResNet-50 V2"
    ),
    "model.encoder_weights": RANDOM_WEIGHTS,
    "data.normalization": SYMMETRIC_INPUTS,
    "data.synthetic_scale": PUBLISHED_IDRID_S,
    "method.seg_epochs": PresetChange("steps", "40", "IDRiD-S trainings: 40 epochs of 7 steps"),
    "train.epochs": PresetChange("steps", "12", "EyePACS stage: 12 epochs"),
    "train.runs": PresetChange("steps", "1", "one run (make evidence repeats it over seeds)"),
    "optimizers.model.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 1e-5: a few hundred steps from random weights"
    ),
}
MINI = derive_preset(PAPER, MINI_CHANGES)

# The paper's directional claims (drkeras.claims; make evidence checks them over seeds).
CLAIMS = (
    *(
        Claim("Table 1", "variant C outperforms A and B", "table1", column, "Variant C",
              ("Variant A", "Variant B"))
        for column in (DICE, ROC)
    ),
    *(
        Claim("Table 2", "MTUnet outperforms every other network", "table2", column,
              MTUNET_T2_ROW, tuple(SEGMENTER_ROWS))
        for column in (RED, YELLOW)
    ),
    *(
        Claim("Table 2 (text)", "grading as an auxiliary task sharpens segmentation: MTUnet "
              "above its own architecture trained single-task", "table2", column,
              MTUNET_T2_ROW, (SINGLE_TASK_ROW,))
        for column in (RED, YELLOW)
    ),
    *(
        Claim(f"Table {n}", "MTUnet scores higher for all severity levels", f"table{n}", column,
              MTUNET_GRADING_ROW, GRADER_ROWS)
        for n in (3, 4)
        for column in GRADE_COLUMNS
    ),
)  # fmt: skip

# ------------------------------------------------------------------------------ helpers


def balanced_grading_ids(
    labels_per_split: Mapping[str, Mapping[str, np.ndarray]],
    *,
    num_grades: int = keys.NUM_GRADES,
    max_per_grade: int = 0,
    seed: int = 0,
) -> Dict[str, List[str]]:
    """Pool graded images of several splits and keep the same number of each grade.

    The paper's Kaggle training set: "we combine the training and test images and downsample
    the images by the number of images with DR severity level of 4. This gives us 1914 images
    per severity level" (Foo et al. 2020, "Performance Study", item 3). Every grade keeps
    ``n = min_g count(g)`` images (capped by ``max_per_grade`` when > 0), drawn at random with
    ``seed``; unknown grades (-1) are left out.

    Args:
        labels_per_split: ``{split: pipeline.read_labels(records, split)}``.
        num_grades: grades ``0 .. num_grades - 1``.
        max_per_grade: optional cap on ``n``.
        seed: selection seed.

    Returns:
        ``{split: sorted selected ids}`` (splits without a selected image are absent).

    Raises:
        ValueError: a grade has no image.

    Example::

        labels = {s: pipeline.read_labels("records/eyepacs", s) for s in ("train", "test")}
        ids = balanced_grading_ids(labels, seed=0)   # 1,914 per grade on the real EyePACS
    """
    pooled: Dict[int, List[Tuple[str, str]]] = {g: [] for g in range(num_grades)}
    for split in sorted(labels_per_split):
        labels = labels_per_split[split]
        for example_id, grade in zip(labels[keys.ID], labels[keys.GRADE]):
            if 0 <= int(grade) < num_grades:
                pooled[int(grade)].append((split, str(example_id)))
    counts = {g: len(v) for g, v in pooled.items()}
    if min(counts.values()) == 0:
        raise ValueError(
            f"cannot balance the grading set: grade counts {counts} over splits "
            f"{sorted(labels_per_split)}; every grade 0..{num_grades - 1} needs an image"
        )
    n = min(counts.values())
    if max_per_grade > 0:
        n = min(n, int(max_per_grade))
    rng = np.random.default_rng(seed)
    chosen: Dict[str, List[str]] = {}
    for grade in range(num_grades):
        members = sorted(pooled[grade])
        for index in sorted(rng.choice(len(members), size=n, replace=False)):
            split, example_id = members[index]
            chosen.setdefault(split, []).append(example_id)
    return {split: sorted(ids) for split, ids in chosen.items()}


def _class_groups(class_set: str) -> Dict[str, List[int]]:
    """Channels of ``class_set`` forming the red (MA, HE) and yellow (EX, SE) lesion groups."""
    groups = {RED: [], YELLOW: []}
    for index, (_, sources) in enumerate(mtunet.CLASS_SETS[class_set]):
        if sources and set(sources) <= {"MA", "HE"}:
            groups[RED].append(index)
        elif sources and set(sources) <= {"EX", "SE"}:
            groups[YELLOW].append(index)
    return groups


def lesion_group_dice(pred_classes, true_classes, class_set: str = mtunet.DEFAULT_CLASS_SET):
    """Pooled Dice of the red and yellow lesion groups from class-index maps (Table 2).

    A pixel is "red" when its class is made of microaneurysms / haemorrhages, "yellow" when of
    hard / soft exudates. TP, FP and FN are summed over every pixel of every image before
    ``Dice = 2 TP / (2 TP + FP + FN)`` (:class:`drkeras.metrics.SegmentationCounter`,
    ``dice_pooled``); a group absent from prediction and truth scores 1.

    Args:
        pred_classes: int ``[N, H, W]`` predicted class indices (argmax of ``seg_probs``).
        true_classes: int ``[N, H, W]`` true class indices.
        class_set: the class set of the indices.

    Returns:
        ``{"Red lesions": dice, "Yellow lesions": dice}`` as fractions in [0, 1].

    Example::

        pred = np.array([[[1, 1, 0, 2]]]); true = np.array([[[1, 0, 0, 2]]])
        lesion_group_dice(pred, true)   # red 2*1/(2+1) = 0.667, yellow 1.0
    """
    dice = _GroupDice(class_set)
    dice.update(pred_classes, true_classes)
    return dice.result()


class _GroupDice:
    """:func:`lesion_group_dice` accumulated batch by batch (the counts are summed, so the
    result equals one call on all the maps)."""

    def __init__(self, class_set: str):
        groups = _class_groups(class_set)
        self.names = [name for name, members in groups.items() if members]
        if not self.names:
            raise ValueError(f"class_set {class_set!r} has no red or yellow lesion class")
        self.members = [groups[name] for name in self.names]
        self.counter = metrics.SegmentationCounter(self.names)

    def update(self, pred_classes, true_classes) -> None:
        pred_classes, true_classes = np.asarray(pred_classes), np.asarray(true_classes)
        if pred_classes.shape != true_classes.shape:
            raise ValueError(
                f"lesion_group_dice: predicted {pred_classes.shape} and true "
                f"{true_classes.shape} class maps differ in shape"
            )
        pred = np.stack([np.isin(pred_classes, m) for m in self.members], axis=-1)
        true = np.stack([np.isin(true_classes, m) for m in self.members], axis=-1)
        self.counter.update(pred, true.astype(np.uint8))

    def result(self) -> Dict[str, float]:
        return dict(self.counter.result()["dice_pooled"])


def dice_table(dice: Mapping[str, Sequence[Mapping[str, float]]], *, title: str) -> ResultsTable:
    """Table 2 from per-run Dice: one row per network, plus the paired t-test row.

    Rows are the paper's (:data:`PAPER_TABLE2`, its means beside ours) followed by the networks
    only we report; with two or more runs the row :data:`TTEST_ROW` holds, per column, the
    two-sided p-value of the paired t-test MTUNet vs LinkNet over the runs
    (:func:`drkeras.metrics.paired_ttest`; the paper: "under the paired t-test at 10%
    significance level, the improvement of MTUnet over LinkNet is statistically significant").
    Two identical series get p = 1 (no evidence of a difference; the t statistic is 0 / 0).

    Args:
        dice: ``{row: [{"Red lesions": %, "Yellow lesions": %} per run]}``; must hold every
            row of :data:`PAPER_TABLE2`.
        title: the table's title (one sentence is appended when the t-test is skipped).

    Example::

        t = dice_table({row: [{RED: 60.0, YELLOW: 70.0}] * 3 for row in PAPER_TABLE2}, title="T2")
        t.values("MTUNet vs LinkNet: paired t-test p", "Red lesions")   # [1.0]
    """
    missing = [row for row in PAPER_TABLE2 if row not in dice]
    if missing:
        raise ValueError(f"dice_table: no Dice for row(s) {missing}")
    table = ResultsTable(
        "table2",
        title,
        [RED, YELLOW],
        row_header="Network",
        paper={row: {c: v[0] for c, v in cells.items()} for row, cells in PAPER_TABLE2.items()},
        digits=2,
    )
    for row, runs in dice.items():
        for column in (RED, YELLOW):
            table.add(row, column, [scores[column] for scores in runs])
    if min(len(dice[MTUNET_T2_ROW]), len(dice["LinkNet"])) >= 2:
        for column in (RED, YELLOW):
            ours = [s[column] for s in dice[MTUNET_T2_ROW]]
            linknet = [s[column] for s in dice["LinkNet"]]
            if np.allclose(ours, linknet):
                p = 1.0
            else:
                _, p = metrics.paired_ttest(ours, linknet)
            table.add(TTEST_ROW, column, p)
    else:
        table.title += "; paired t-test not computed (needs train.runs >= 2)"
    return table


def _network_input(image, mode: str) -> tf.Tensor:
    """A float RGB image (or batch) in [0, 255] scaled as a network expects (``mode``: from
    :func:`drkeras.models.input_scaling.input_scaling`)."""
    return preprocess.normalize(tf.cast(image, tf.float32), mode)


def _stage_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}/{name}".encode()) % (2**31 - 1)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _png(array: np.ndarray) -> bytes:
    return tf.io.encode_png(tf.convert_to_tensor(array, tf.uint8)).numpy()


@tf.autograph.experimental.do_not_convert
def _parse_pseudo(serialized):
    """A pseudo-mask record -> ``(classes uint8 [S, S], grade int32)``."""
    ex = tf.io.parse_single_example(serialized, _PSEUDO_FEATURES)
    classes = tf.io.decode_png(ex["classes"], channels=1)[..., 0]
    return classes, tf.cast(ex[keys.GRADE], tf.int32)


@tf.autograph.experimental.do_not_convert
def _join_pseudo(example, serialized):
    """A balanced-set example ``(image, grade)`` and its pseudo-mask record ->
    ``(image, classes, grade)``. The two were read in the same order; their grades must agree."""
    image, grade = example
    classes, recorded = _parse_pseudo(serialized)
    check = tf.debugging.assert_equal(
        grade,
        recorded,
        message="pseudo masks and balanced images out of step (grades differ): the pseudo-mask "
        "file does not belong to this selection",
    )
    with tf.control_dependencies([check]):
        classes = tf.identity(classes)
    return image, classes, grade


def _to_uint8(image):
    """A pipeline image read with ``normalization="unit"`` back to its cached 0-255 uint8."""
    return tf.cast(tf.round(image * 255.0), tf.uint8)


def _shuffle_buffer(count: int) -> int:
    """Examples the shuffle buffer of a training stream over ``count`` examples holds."""
    return max(1, min(int(count), 2048))


@dataclasses.dataclass
class _Images:
    """Decoded images at training size (uint8) with their labels, held in memory."""

    images: np.ndarray  # uint8 [N, S, S, 3], 0-255 RGB after FOV crop and resize
    grades: np.ndarray  # int32 [N] (-1 unknown)
    classes: Optional[np.ndarray] = None  # uint8 [N, S, S] class indices of method.class_set

    def __len__(self) -> int:
        return len(self.images)


# ------------------------------------------------------------------------------ one execution


class _Run:
    """One MTUnet run: its declared stages (Fig. 7, Tables 1-4, per run) and its report.

    :meth:`stages` reads the records' labels only (counts, the balanced EyePACS selection) and
    declares every stage; each stage builds, trains and evaluates its network when the runner
    executes it, streaming the test splits through the metrics, and records its numbers here
    for :meth:`report`.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config
        self.method: Method = ctx.config.method
        self.data = ctx.config.data
        self.size = int(self.data.image_size)
        self.shape = (self.size, self.size, 3)
        self.batch = int(self.data.batch_size)
        self.class_set = self.method.class_set
        self.class_names = mtunet.class_names(self.class_set)
        self.num_classes = len(self.class_names)
        self.pseudo_dir = ctx.out_dir / "pseudo"
        self.seg_epochs = int(self.method.seg_epochs)
        self.epochs = int(self.config.train.epochs)
        # Read from the records' labels by stages(): ids, counts, the balanced selection.
        self.ids: Dict[str, List[str]] = {}
        self.examples: Dict[str, int] = {}
        self.grade_counts: Dict[str, np.ndarray] = {}
        self.selection: Dict[str, List[str]] = {}
        self.shown = 0
        # Written by the stages, read by report(): per row, one entry per run that trained.
        self.dice_scores: Dict[str, List[Dict[str, float]]] = {}
        self.variant_scores: Dict[str, List[Tuple[float, float]]] = {}
        self.roc_idrid: Dict[str, List[np.ndarray]] = {}
        self.roc_external: Dict[str, List[np.ndarray]] = {}
        self.figure: Dict[str, np.ndarray] = {}
        self.figure_truth: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._check()

    # -------------------------------------------------------------------------- set-up

    def _check(self) -> None:
        method = self.method
        if method.class_set not in mtunet.CLASS_SETS:
            raise ValueError(
                f"method.class_set={method.class_set!r}: choose one of {sorted(mtunet.CLASS_SETS)}"
            )
        groups = _class_groups(method.class_set)
        if not groups[RED] or not groups[YELLOW]:
            raise ValueError(
                f"method.class_set={method.class_set!r} has no red or no yellow lesion class; "
                "Tables 1-2 need both"
            )
        if self.config.model.num_grades != keys.NUM_GRADES:
            raise ValueError(
                f"model.num_grades={self.config.model.num_grades}: MTUnet's tables grade on the "
                f"{keys.NUM_GRADES}-level ICDRS scale"
            )
        if len(method.graders) != len(GRADER_ROWS):
            raise ValueError(
                f"method.graders={method.graders}: give {len(GRADER_ROWS)} names, one per row "
                f"{GRADER_ROWS}"
            )
        unknown = [g for g in method.graders if g not in baselines.GRADERS and g != VGG16_GRADER]
        if unknown:
            raise ValueError(
                f"method.graders: unknown grader(s) {unknown}; choose from "
                f"{sorted(baselines.GRADERS) + [VGG16_GRADER]}"
            )
        small = [
            g
            for g in method.graders
            if g in baselines.GRADERS and self.size < baselines.GRADERS[g].min_size
        ]
        if small:
            raise ValueError(
                f"data.image_size={self.size} is below the minimum input size of {small} "
                f"({[baselines.GRADERS[g].min_size for g in small]} px); raise data.image_size "
                "or choose other method.graders"
            )
        if self.size % blocks.VGG16_DOWNSAMPLING:
            raise ValueError(
                f"data.image_size={self.size}: MTUnet's VGG16-UNet needs a multiple of "
                f"{blocks.VGG16_DOWNSAMPLING}"
            )
        if method.seg_epochs < 1 or self.config.train.epochs < 1:
            raise ValueError("method.seg_epochs and train.epochs must be >= 1")

    def _input_mode(self, network: str) -> str:
        """The input scaling of ``network`` (:mod:`drkeras.models.input_scaling`)."""
        return input_scaling(
            network,
            encoder_weights=self.config.model.encoder_weights,
            default=self.data.normalization,
        )

    def _steps(self, count: int) -> int:
        steps = self.config.train.steps_per_epoch
        return int(steps) if steps else max(1, math.ceil(count / self.batch))

    # -------------------------------------------------------------------------- data

    def _common(self) -> dict:
        # Images are read at training size as 0-255 values ("unit" * 255); augmentation,
        # Graham and each network's own scaling are applied afterwards, in the pipeline order.
        return dict(
            size=self.size,
            batch_size=self.batch,
            normalization="unit",
            fov_crop=self.data.fov_crop,
            graham=False,
            augment=False,
            shuffle=False,
        )

    def segmentation_ids(self, split: str) -> List[str]:
        """Ids of the IDRiD-S images of a split whose masks annotate every class of
        ``class_set`` (from the labels; nothing decoded)."""
        if split in self.ids:
            return self.ids[split]
        records = self.ctx.records("idrid")
        labels = pipeline.read_labels(records, split)
        present = mtunet.classes_annotated(labels[keys.MASK_PRESENT], self.class_set).numpy()
        # Images with lesion masks whose classes are all annotated (not annotated != empty).
        keep = labels[keys.MASK_PRESENT].any(axis=1) & present.all(axis=1)
        ids = [str(i) for i in labels[keys.ID][keep]]
        if self.data.max_examples:
            ids = ids[: self.data.max_examples]
        if not ids:
            raise ValueError(
                f"{records} split {split!r}: no image with every lesion type of class_set "
                f"{self.class_set!r} annotated (IDRiD-S images were expected)"
            )
        self.ids[split] = ids
        return ids

    def segmentation_source(self, split: str, ids: Sequence[str], cache=False) -> tf.data.Dataset:
        """IDRiD-S images ``ids`` of ``split``, one ``(image uint8 [S, S, 3], classes uint8
        [S, S] of class_set, grade -1)`` per element; the pipeline caches the decoded examples
        where ``cache`` says (the runner's choice, ``data.cache``)."""
        records = self.ctx.records("idrid")
        ds = pipeline.segmentation_dataset(records, split, ids=ids, cache=cache, **self._common())
        class_set = self.class_set

        @tf.autograph.experimental.do_not_convert
        def element(image, target):
            one_hot = mtunet.masks_to_classes(target[keys.MASKS], class_set)
            classes = tf.cast(tf.argmax(one_hot, axis=-1), tf.uint8)
            grades = tf.fill(tf.shape(classes)[:1], keys.UNKNOWN)
            return _to_uint8(image), classes, grades

        return ds.map(element).unbatch()

    def grading_source(self, dataset: str, split: str, *, ids=None, cache=False) -> tf.data.Dataset:
        """Graded images (0-4) of a split, one ``(image uint8 [S, S, 3], grade int32)`` per
        element (``ids``: only these; otherwise ``data.max_examples`` caps the split)."""
        records = self.ctx.records(dataset)
        ds = pipeline.grading_dataset(
            records,
            split,
            ids=ids,
            num_classes=keys.NUM_GRADES,
            max_examples=self.data.max_examples if ids is None else 0,
            cache=cache,
            **self._common(),
        )
        return ds.map(lambda image, grade: (_to_uint8(image), tf.cast(grade, tf.int32))).unbatch()

    def balanced_source(self, cache=False) -> tf.data.Dataset:
        """The balanced image-level set (:meth:`balanced_grading_set`), its splits in sorted
        order: the images the initial segmenter labels and the EyePACS stage trains on."""
        parts = [
            self.grading_source(
                self.method.grading_set,
                split,
                ids=ids,
                cache=f"{cache}.{split}" if isinstance(cache, str) else cache,
            )
            for split, ids in sorted(self.selection.items())
        ]
        return functools.reduce(lambda a, b: a.concatenate(b), parts)

    def _materialise(self, ds: tf.data.Dataset, what: str) -> _Images:
        images, classes, grades = [], [], []
        for element in ds.batch(self.batch):
            images.append(element[0].numpy())
            grades.append(element[-1].numpy())
            if len(element) == 3:
                classes.append(element[1].numpy())
        if not images:
            raise ValueError(f"{what}: no image read (expected at least one)")
        return _Images(
            np.concatenate(images),
            np.concatenate(grades),
            np.concatenate(classes) if classes else None,
        )

    def segmentation_images(self, split: str) -> _Images:
        """IDRiD-S images of a split held in memory, as the run's evaluation reads them (for
        inspection and tests; the run itself streams them)."""
        ids = self.segmentation_ids(split)
        return self._materialise(
            self.segmentation_source(split, ids), f"idrid split {split!r} (IDRiD-S)"
        )

    def grading_images(self, dataset: str, split: str, ids=None) -> _Images:
        """Graded images of a split held in memory (see :meth:`segmentation_images`)."""
        return self._materialise(
            self.grading_source(dataset, split, ids=ids),
            f"{dataset} split {split!r} (graded images 0-4)",
        )

    def graded_counts(self, dataset: str, split: str) -> np.ndarray:
        """Images per grade 0-4 the evaluation of a split reads (from the labels, in record
        order, capped by ``data.max_examples`` as the pipeline caps it)."""
        records = self.ctx.records(dataset)
        grades = pipeline.read_labels(records, split)[keys.GRADE]
        grades = grades[(grades >= 0) & (grades < keys.NUM_GRADES)]
        if self.data.max_examples:
            grades = grades[: self.data.max_examples]
        if not len(grades):
            raise ValueError(f"{records} split {split!r}: no graded image (grades 0-4 expected)")
        counts = np.bincount(grades.astype(np.int64), minlength=keys.NUM_GRADES)
        missing = [g for g in range(keys.NUM_GRADES) if not counts[g]]
        if missing:
            log.warning(
                "%s %s has no image of grade(s) %s: their ROC AUC is undefined (NaN)",
                dataset,
                split,
                missing,
            )
        return counts

    def balanced_grading_set(self) -> Dict[str, List[str]]:
        records = self.ctx.records(self.method.grading_set)
        labels = {}
        for split in self.method.grading_splits:
            try:
                split_labels = pipeline.read_labels(records, split)
            except FileNotFoundError as err:
                # e.g. EyePACS converted without retinopathy_solution.csv has no val split
                log.warning("%s: split %r skipped: %s", self.method.grading_set, split, err)
                continue
            if self.data.max_examples:
                split_labels = {k: v[: self.data.max_examples] for k, v in split_labels.items()}
            labels[split] = split_labels
        return balanced_grading_ids(
            labels, max_per_grade=self.method.max_per_grade, seed=self.config.seed
        )

    def declare_data(self) -> Dict[str, Data]:
        """The run's datasets, sized from the records' labels (nothing is decoded here).

        Training streams shuffle ``min(count, 2048)`` decoded examples (:meth:`stream`); the
        evaluations stream batches through the metrics and hold per image only its five grade
        probabilities and grade (and, for Fig. 6, the first ``method.figure_images`` test
        images, their truth and every Table 2 network's prediction).
        """
        method = self.method
        train_ids, test_ids = self.segmentation_ids("train"), self.segmentation_ids("test")
        self.selection = self.balanced_grading_set()
        for key, (dataset, split) in {
            IDRID_TEST: ("idrid", "test"),
            EXTERNAL_TEST: (method.external, method.external_split),
        }.items():
            self.grade_counts[key] = self.graded_counts(dataset, split)
        self.examples = {
            SEG_TRAIN: len(train_ids),
            SEG_TEST: len(test_ids),
            IDRID_TEST: int(self.grade_counts[IDRID_TEST].sum()),
            EXTERNAL_TEST: int(self.grade_counts[EXTERNAL_TEST].sum()),
            BALANCED_SET: sum(len(ids) for ids in self.selection.values()),
        }
        self.shown = min(int(method.figure_images), len(test_ids))
        per_image = 4 * keys.NUM_GRADES + 4  # float32 probabilities and an int32 grade
        figure = self.shown * self.size**2 * (3 + 1 + len(SEGMENTER_ROWS) + 2)
        log.info(
            "IDRiD-S train %d / test %d images, IDRiD-D test %d, %s %s %d, balanced %s %d",
            self.examples[SEG_TRAIN],
            self.examples[SEG_TEST],
            self.examples[IDRID_TEST],
            method.external,
            method.external_split,
            self.examples[EXTERNAL_TEST],
            method.grading_set,
            self.examples[BALANCED_SET],
        )
        common = dict(size=self.size, batch=self.batch)
        train = dict(train=True, **common)
        return {
            SEG_TRAIN: Data(
                SEG_TRAIN,
                lambda cache: self.segmentation_source("train", train_ids, cache),
                examples=self.examples[SEG_TRAIN],
                masks=keys.NUM_LESIONS,
                shuffle_buffer=_shuffle_buffer(self.examples[SEG_TRAIN]),
                **train,
            ),
            SEG_TEST: Data(
                SEG_TEST,
                lambda cache: self.segmentation_source("test", test_ids, cache),
                examples=self.examples[SEG_TEST],
                masks=keys.NUM_LESIONS,
                held_bytes=figure,
                **common,
            ),
            IDRID_TEST: Data(
                IDRID_TEST,
                lambda cache: self.grading_source("idrid", "test", cache=cache),
                examples=self.examples[IDRID_TEST],
                held_bytes=per_image * self.examples[IDRID_TEST],
                **common,
            ),
            EXTERNAL_TEST: Data(
                EXTERNAL_TEST,
                lambda cache: self.grading_source(
                    method.external, method.external_split, cache=cache
                ),
                examples=self.examples[EXTERNAL_TEST],
                held_bytes=per_image * self.examples[EXTERNAL_TEST],
                **common,
            ),
            BALANCED_SET: Data(
                BALANCED_SET,
                self.balanced_source,
                examples=self.examples[BALANCED_SET],
                shuffle_buffer=_shuffle_buffer(self.examples[BALANCED_SET]),
                **train,
            ),
        }

    def stream(
        self,
        source: tf.data.Dataset,
        count: int,
        *,
        kind: str,
        mode: str,
        seed: int,
        parse=None,
    ):
        """Augmented training batches from ``(image uint8, classes uint8, grade)`` elements.

        ``kind``: ``"seg"`` (targets ``seg_probs``), ``"grade"`` (``grade_probs``) or
        ``"multitask"`` (both). Every network of a table gets the same ``seed``, hence the same
        images, order and augmentation draws; only the input scaling ``mode`` differs.
        ``parse`` turns ``source`` elements (e.g. an image joined with its serialized pseudo
        mask, decoded after the shuffle) into such triples.
        """
        num_classes = self.num_classes
        augment, graham = self.data.augment, self.data.graham
        base = tf.constant(seed, tf.int64)

        @tf.autograph.experimental.do_not_convert
        def element(index, example):
            image, classes, grade = example
            image = tf.cast(image, tf.float32)
            classes = classes[..., None]
            if augment:
                image, classes = aug.augment(
                    image, classes, seed=tf.stack([base, index]), params=MTUNET_AUGMENT
                )
            image = tf.ensure_shape(image, self.shape)
            if graham:
                image = preprocess.graham(image)
            targets = {}
            if kind in ("seg", "multitask"):
                targets[keys.SEG_PROBS] = tf.one_hot(
                    tf.cast(classes[..., 0], tf.int32), num_classes, dtype=tf.float32
                )
            if kind in ("grade", "multitask"):
                targets[keys.GRADE_PROBS] = grade
            return _network_input(image, mode), targets

        ds = source.shuffle(_shuffle_buffer(count), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat()
        if parse is not None:
            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.enumerate().map(element, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(self.batch).prefetch(tf.data.AUTOTUNE)
        return ds.with_options(pipeline.distribution_options())

    def seg_source(self, grades: Optional[np.ndarray] = None) -> tf.data.Dataset:
        """IDRiD-S train (``ctx.data``), with ``grades`` instead of its unknown grades."""
        ds = self.ctx.data(SEG_TRAIN)
        if grades is None:
            return ds
        grades = np.asarray(grades, np.int32)
        if len(grades) != self.examples[SEG_TRAIN]:
            raise ValueError(
                f"{len(grades)} pseudo grades for {self.examples[SEG_TRAIN]} IDRiD-S train images"
            )
        joined = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(grades)))
        return joined.map(lambda example, grade: (example[0], example[1], grade))

    def kaggle_stream(self, pseudo: dict, kind: str, mode: str, *, seed: int):
        """The EyePACS-stage stream (same for every network of a run): the balanced images
        (``ctx.data``) joined with the run's pseudo masks, written in the same order by the
        initial segmenter (``pseudo``: its stage's output)."""
        source = tf.data.Dataset.zip(
            (self.ctx.data(BALANCED_SET), tf.data.TFRecordDataset(str(pseudo["path"])))
        )
        return self.stream(
            source, pseudo["count"], kind=kind, mode=mode, seed=seed + 7919, parse=_join_pseudo
        )

    # -------------------------------------------------------------------------- models
    # Each ``*_fn`` returns a zero-argument builder: with the run's encoder weights for
    # training, with random weights (``weights=None``) for the plan's Net declarations.

    def build(self, name: str, seed: int, builder) -> keras.Model:
        tf.keras.utils.set_random_seed(_stage_seed(seed, name))
        with self.ctx.strategy.scope():
            return builder()

    def _vgg16_unet_fn(self, variant: Optional[str], weights):
        model_cfg = self.config.model
        if variant is None:
            return lambda: mtunet.build_vgg16_unet(
                input_shape=self.shape,
                num_seg_classes=self.num_classes,
                num_grades=None,
                encoder_weights=weights,
                width=model_cfg.width,
                name="initial_segmenter",
            )
        return lambda: mtunet.build_mtunet(
            input_shape=self.shape,
            variant=variant,
            class_set=self.class_set,
            num_grades=model_cfg.num_grades,
            encoder_weights=weights,
            width=model_cfg.width,
            dropout=model_cfg.dropout,
        )

    def vgg16_unet(self, variant: Optional[str], seed: int) -> keras.Model:
        """MTUnet (variant C), variant A or B, or (``None``) its single-task VGG16-UNet."""
        # One seed for the whole family: the layers the networks share start from the same
        # weights, so single- vs multi-task (and variant) comparisons are paired on the init.
        return self.build(
            "vgg16_unet", seed, self._vgg16_unet_fn(variant, self.config.model.encoder_weights)
        )

    def _segmenter_fn(self, name: str, weights):
        width = self.config.model.width

        def scaled(filters):
            return blocks.scaled_filters(filters, width)

        # Decoders narrowed by model.width like MTUnet's (the libraries' default filter counts
        # times the width); pretrained encoders keep their widths.
        options = {
            "unet": dict(
                backbone=self.method.segmenter_backbone,
                decoder_filters=tuple(scaled(f) for f in (256, 128, 64, 32, 16)),
            ),
            "linknet": dict(backbone=self.method.segmenter_backbone),
            "fpn": dict(backbone=self.method.segmenter_backbone, pyramid_block_filters=scaled(256)),
            "deeplabv3plus": dict(
                backbone=self.method.deeplab_backbone,
                width=width,
                aspp_filters=scaled(256),
                projection_filters=scaled(48),
                head_filters=scaled(256),
            ),
        }[name]
        return lambda: baselines.build_segmenter(
            name,
            input_shape=self.shape,
            num_classes=self.num_classes,
            activation="softmax",
            encoder_weights=weights,
            **options,
        )

    def segmenter(self, name: str, seed: int) -> keras.Model:
        return self.build(name, seed, self._segmenter_fn(name, self.config.model.encoder_weights))

    def segmenter_family(self, name: str) -> str:
        """The encoder of a Table 2 baseline, as named in the input-scaling table."""
        if name == "deeplabv3plus":
            return self.method.deeplab_backbone
        return self.method.segmenter_backbone

    def _grader_fn(self, name: str, weights):
        model_cfg = self.config.model
        if name == VGG16_GRADER:

            def builder():
                inputs = keras.Input(self.shape, name=keys.IMAGE)
                _, bottom = blocks.vgg16_encoder(inputs, width=model_cfg.width)
                head = blocks.grading_head(
                    bottom, num_grades=model_cfg.num_grades, pooling="avg", dropout=0.0
                )
                return keras.Model(inputs, head, name="vgg16_grader")

            return builder
        return lambda: baselines.build_grader(
            name,
            input_shape=self.shape,
            num_grades=model_cfg.num_grades,
            encoder_weights=weights,
            dropout=model_cfg.dropout,
        )

    def grader(self, row: str, name: str, seed: int) -> keras.Model:
        return self.build(
            f"grader_{row}", seed, self._grader_fn(name, self.config.model.encoder_weights)
        )

    def _variant_b_fn(self, step: int):
        """Variant B as its step ``step`` trains it (the other sub-network frozen), for the
        plan's count of trained weights."""
        build = self._vgg16_unet_fn("B", None)

        def builder():
            model = build()
            model.get_layer("segmenter").trainable = step == 1
            model.get_layer("grader").trainable = step == 2
            return model

        return builder

    def nets(self) -> Dict[str, Net]:
        """Every network of a run, with random weights (the plan reads shapes only)."""
        name = self.config.optimizers["model"].name
        optimizer = name if name in ("adam", "sgd", "rmsprop") else "adam"

        def net(key, build):
            return Net(key, build, optimizer=optimizer)

        out = {
            "vgg16_unet": net("vgg16_unet", self._vgg16_unet_fn(None, None)),
            "mtunet_a": net("mtunet_a", self._vgg16_unet_fn("A", None)),
            "mtunet_b_step1": net("mtunet_b_step1", self._variant_b_fn(1)),
            "mtunet_b_step2": net("mtunet_b_step2", self._variant_b_fn(2)),
            "mtunet_c": net("mtunet_c", self._vgg16_unet_fn("C", None)),
        }
        for row, grader in zip(GRADER_ROWS, self.method.graders):
            key = f"grader_{_slug(row)}"
            out[key] = net(key, self._grader_fn(grader, None))
        for segmenter in SEGMENTER_ROWS.values():
            out[segmenter] = net(segmenter, self._segmenter_fn(segmenter, None))
        return out

    def optimizer(self):
        return build_optimizer(self.config.optimizers["model"])

    def compile_seg(self, model: keras.Model) -> None:
        with self.ctx.strategy.scope():
            model.compile(
                optimizer=self.optimizer(),
                loss={keys.SEG_PROBS: mtunet.PixelBinaryCrossentropy(name="seg_loss")},
                run_eagerly=self.method.run_eagerly,
            )

    def compile_grader(self, model: keras.Model) -> None:
        with self.ctx.strategy.scope():
            model.compile(
                optimizer=self.optimizer(),
                loss={keys.GRADE_PROBS: keras.losses.SparseCategoricalCrossentropy()},
                run_eagerly=self.method.run_eagerly,
            )

    def compile_multitask(self, model: keras.Model) -> None:
        with self.ctx.strategy.scope():
            mtunet.compile_mtunet(
                model,
                alpha=self.method.alpha,
                optimizer=self.optimizer(),
                run_eagerly=self.method.run_eagerly,
            )

    def compile_step(self, model: keras.Model, step: int) -> None:
        with self.ctx.strategy.scope():
            mtunet.compile_two_step(
                model, step=step, optimizer=self.optimizer(), run_eagerly=self.method.run_eagerly
            )

    def fit(self, model, data, count: int, epochs: int) -> None:
        """``ctx.fit`` of the stage being executed (its name is the stage's)."""
        self.ctx.fit(model, data, epochs=epochs, steps_per_epoch=self._steps(count))

    # -------------------------------------------------------------------------- prediction

    def forward(self, model: keras.Model, images, mode: str, key: str) -> np.ndarray:
        """``model``'s output ``key`` on one batch of uint8 images."""
        x = tf.cast(tf.convert_to_tensor(images), tf.float32)
        if self.data.graham:
            x = preprocess.graham(x)
        x = _network_input(x, mode)
        out = model(x, training=False) if self.method.run_eagerly else model.predict_on_batch(x)
        return np.asarray(out[key])

    def outputs(self, model: keras.Model, images: np.ndarray, mode: str, key: str) -> np.ndarray:
        """``model``'s output ``key`` on uint8 images, in batches of ``data.batch_size``."""
        parts = [
            self.forward(model, images[start : start + self.batch], mode, key)
            for start in range(0, len(images), self.batch)
        ]
        return np.concatenate(parts)

    def _batches(self, key: str) -> tf.data.Dataset:
        return self.ctx.data(key).batch(self.batch)

    def dice(self, model, mode: str, *, keep: int = 0) -> Tuple[Dict[str, float], np.ndarray]:
        """Pooled red / yellow Dice in percent on IDRiD-S test, streamed batch by batch, and
        the predicted class maps of its first ``keep`` images (Fig. 6; their images and truth
        are kept once, in ``figure_truth``)."""
        counter = _GroupDice(self.class_set)
        kept, truth = [], []
        for images, classes, _ in self._batches(SEG_TEST):
            pred = np.argmax(self.forward(model, images, mode, keys.SEG_PROBS), axis=-1)
            pred = pred.astype(np.uint8)
            classes = classes.numpy()
            counter.update(pred, classes)
            room = keep - sum(len(p) for p in kept)
            if room > 0:
                kept.append(pred[:room])
                truth.append((images.numpy()[:room], classes[:room]))
        if keep and self.figure_truth is None:
            self.figure_truth = tuple(np.concatenate(parts) for parts in zip(*truth))
        scores = {k: 100.0 * v for k, v in counter.result().items()}
        shown = np.concatenate(kept) if kept else np.zeros((0, self.size, self.size), np.uint8)
        return scores, shown

    def roc(self, model, key: str, mode: str) -> np.ndarray:
        """One-vs-rest ROC AUC per grade in percent, ``[5]`` (Tables 3-4), on dataset
        ``key`` streamed batch by batch (only the probabilities are kept)."""
        probs, grades = [], []
        for images, grade in self._batches(key):
            probs.append(self.forward(model, images, mode, keys.GRADE_PROBS))
            grades.append(grade.numpy())
        grades = np.concatenate(grades)
        counts = np.bincount(grades, minlength=keys.NUM_GRADES)
        if counts.tolist() != self.grade_counts[key].tolist():
            raise RuntimeError(
                f"{key}: read {counts.tolist()} images per grade, the labels count "
                f"{self.grade_counts[key].tolist()} (the tables' titles would be wrong)"
            )
        return 100.0 * metrics.one_vs_rest_auc(grades, np.concatenate(probs))

    def predict_grades(self, model, mode: str) -> np.ndarray:
        """Predicted grades of the IDRiD-S train images (Table 2's MTUNet trains on them)."""
        parts = [
            np.argmax(self.forward(model, images, mode, keys.GRADE_PROBS), axis=-1)
            for images, _, _ in self._batches(SEG_TRAIN)
        ]
        return np.concatenate(parts).astype(np.int32)

    # -------------------------------------------------------------------------- pseudo masks

    def write_pseudo_set(self, segmenter, mode: str, path: pathlib.Path) -> int:
        """Fig. 7 (b): pseudo masks of the balanced image-level set (``ctx.data``), written
        as TFRecords (class map PNG and grade) in the order of that set.

        Returns the number of images written.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        count = 0
        pixels = np.zeros(self.num_classes, np.int64)
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for raw, grade in self._batches(BALANCED_SET):
                probs = self.forward(segmenter, raw, mode, keys.SEG_PROBS)
                masks = pseudo_masks_from_probs(probs, grade, class_set=self.class_set)
                classes = np.argmax(masks.numpy(), axis=-1).astype(np.uint8)
                pixels += np.bincount(classes.ravel(), minlength=self.num_classes)
                for k in range(len(classes)):
                    feature = {
                        "classes": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[_png(classes[k][..., None])])
                        ),
                        keys.GRADE: tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[int(grade[k])])
                        ),
                    }
                    example = tf.train.Example(features=tf.train.Features(feature=feature))
                    writer.write(example.SerializeToString())
                    count += 1
        tmp.replace(path)
        if count != self.examples[BALANCED_SET]:
            raise RuntimeError(
                f"{path}: {count} pseudo masks written for {self.examples[BALANCED_SET]} "
                "selected images"
            )
        shares = ", ".join(
            f"{name} {100.0 * n / max(pixels.sum(), 1):.2f} %"
            for name, n in zip(self.class_names, pixels)
        )
        log.info("pseudo masks of %d images in %s: pixels %s", count, path, shares)
        return count

    @staticmethod
    def release() -> None:
        """Free the last network (call once it is unreachable): large graders in turn."""
        gc.collect()
        tf.keras.backend.clear_session()

    # -------------------------------------------------------------------------- stages

    def stages(self) -> List[Stage]:
        """Every stage of every run, in order (per run: Fig. 7 (a)-(b), Table 1's variants,
        Tables 3-4's graders, Table 2's segmenters); stages differing only by run share a
        group."""
        data = self.declare_data()
        nets = self.nets()

        def evaluation(key):
            return dataclasses.replace(data[key], train=False, shuffle_buffer=0)

        seg_train, balanced = data[SEG_TRAIN], data[BALANCED_SET]
        tests = [evaluation(SEG_TEST), evaluation(IDRID_TEST), evaluation(EXTERNAL_TEST)]
        seg = dict(steps=self._steps(seg_train.examples), epochs=self.seg_epochs)
        kaggle = dict(steps=self._steps(balanced.examples), epochs=self.epochs)
        init = ("initial_segmenter",)
        declared = []
        for run in range(int(self.config.train.runs)):
            stage = functools.partial(self._declare, declared, run)
            stage(
                "initial_segmenter",
                self._initial_segmenter,
                nets=[nets["vgg16_unet"]],
                data=[seg_train, evaluation(SEG_TEST), evaluation(BALANCED_SET)],
                **seg,
            )
            stage(
                "variant_a",
                self._variant,
                "A",
                nets=[nets["mtunet_a"]],
                data=[balanced, *tests],
                consumes=init,
                **kaggle,
            )
            stage(
                "variant_b_step1",
                self._variant_b_step1,
                nets=[nets["mtunet_b_step1"]],
                data=[balanced],
                consumes=init,
                release=False,  # its model goes on to step 2
                **kaggle,
            )
            stage(
                "variant_b_step2",
                self._variant,
                "B",
                nets=[nets["mtunet_b_step2"]],
                data=[balanced, *tests],
                consumes=init + ("variant_b_step1",),
                **kaggle,
            )
            stage(
                "variant_c",
                self._variant,
                "C",
                nets=[nets["mtunet_c"]],
                data=[balanced, *tests, evaluation(SEG_TRAIN)],
                consumes=init,
                **kaggle,
            )
            for row, name in zip(GRADER_ROWS, self.method.graders):
                stage(
                    f"grader_{_slug(row)}",
                    self._grader,
                    row,
                    name,
                    nets=[nets[f"grader_{_slug(row)}"]],
                    data=[balanced, tests[1], tests[2]],
                    consumes=init,
                    **kaggle,
                )
            for row, name in SEGMENTER_ROWS.items():
                stage(
                    _slug(row),
                    self._segmenter,
                    row,
                    name,
                    nets=[nets[name]],
                    data=[seg_train, tests[0]],
                    **seg,
                )
            stage(
                "mtunet_idrid_s",
                self._segmenter,
                MTUNET_T2_ROW,
                None,
                nets=[nets["mtunet_c"]],
                data=[seg_train, tests[0]],
                consumes=("variant_c",),
                **seg,
            )
        return declared

    def _declare(
        self, declared: list, run: int, name: str, work, *args, consumes=(), release=True, **options
    ) -> None:
        """Append stage ``run<run>_<name>`` of group ``name`` to ``declared``: it runs
        ``work(run, *args, inputs)``, ``inputs`` mapping the short names of ``consumes`` (same
        run) to their outputs, and frees the network afterwards unless ``release`` is False."""
        tag = f"run{run}"
        names = {f"{tag}_{short}": short for short in consumes}

        def execute(inputs):
            output = work(run, *args, {names[k]: v for k, v in inputs.items()})
            if release:
                self.release()
            return output

        declared.append(
            Stage(
                f"{tag}_{name}",
                run=execute,
                batch=self.batch,
                consumes=tuple(names),
                group=name,
                **options,
            )
        )

    # Each stage's work builds, trains and evaluates one network, records its numbers and
    # returns only what later stages consume, so the network is unreachable afterwards.

    def _initial_segmenter(self, run: int, inputs) -> dict:
        """Fig. 7 (a)-(b): the initial segmenter; returns its pseudo masks' file and count."""
        seed = _run_seed(self.config, run)
        mode = self._input_mode(VGG16_ENCODER)
        model = self.vgg16_unet(None, seed)
        self.compile_seg(model)
        count = self.examples[SEG_TRAIN]
        stream = self.stream(self.seg_source(), count, kind="seg", mode=mode, seed=seed)
        self.fit(model, stream, count, self.seg_epochs)
        scores, pred = self.dice(model, mode, keep=self.shown if run == 0 else 0)
        self.dice_scores.setdefault(SINGLE_TASK_ROW, []).append(scores)
        if run == 0:
            self.figure["VGG16-UNet (single task)"] = pred
        path = self.pseudo_dir / f"run{run}.tfrecord"
        return {"path": path, "count": self.write_pseudo_set(model, mode, path)}

    def _variant_b_step1(self, run: int, inputs) -> keras.Model:
        """Variant B, step 1 (Fig. 3): its segmenter on the pseudo masks."""
        seed, pseudo = _run_seed(self.config, run), inputs["initial_segmenter"]
        mode = self._input_mode(VGG16_ENCODER)
        model = self.vgg16_unet("B", seed)
        self.compile_step(model, 1)
        stream = self.kaggle_stream(pseudo, "seg", mode, seed=seed)
        self.fit(model, stream, pseudo["count"], self.epochs)
        return model

    def _variant(self, run: int, variant: str, inputs) -> Optional[dict]:
        """Table 1 (and, for C, Tables 3-4): one variant trained on the pseudo-labelled set
        (B: its step 2, the grader on the grades, after step 1); C returns its predicted
        grades of the IDRiD-S train images, for Table 2's MTUNet."""
        seed, pseudo = _run_seed(self.config, run), inputs["initial_segmenter"]
        mode = self._input_mode(VGG16_ENCODER)
        if variant == "B":
            model = inputs["variant_b_step1"]
            self.compile_step(model, 2)
            kind = "grade"
        else:
            model = self.vgg16_unet(variant, seed)
            self.compile_multitask(model)
            kind = "multitask"
        stream = self.kaggle_stream(pseudo, kind, mode, seed=seed)
        self.fit(model, stream, pseudo["count"], self.epochs)
        scores, _ = self.dice(model, mode)
        auc = self.roc(model, IDRID_TEST, mode)
        auc_external = self.roc(model, EXTERNAL_TEST, mode)
        row = next(r for r, v in VARIANT_ROWS.items() if v == variant)
        self.variant_scores.setdefault(row, []).append(
            (float(np.mean(list(scores.values()))), float(np.nanmean(auc)))
        )
        if variant != "C":
            return None
        self.roc_idrid.setdefault(MTUNET_GRADING_ROW, []).append(auc)
        self.roc_external.setdefault(MTUNET_GRADING_ROW, []).append(auc_external)
        grades = self.predict_grades(model, mode)
        if run == 0 and self.ctx.is_chief:
            self.export(model, mode)
        return {"grades": grades}

    def _grader(self, run: int, row: str, name: str, inputs) -> None:
        """Tables 3-4: one grader on the pseudo-labelled set's grades."""
        seed, pseudo = _run_seed(self.config, run), inputs["initial_segmenter"]
        mode = self._input_mode(name)
        model = self.grader(row, name, seed)
        self.compile_grader(model)
        stream = self.kaggle_stream(pseudo, "grade", mode, seed=seed)
        self.fit(model, stream, pseudo["count"], self.epochs)
        self.roc_idrid.setdefault(row, []).append(self.roc(model, IDRID_TEST, mode))
        self.roc_external.setdefault(row, []).append(self.roc(model, EXTERNAL_TEST, mode))

    def _segmenter(self, run: int, row: str, name: Optional[str], inputs) -> None:
        """Table 2: a baseline (``name``) or, for ``name=None``, MTUNet with the pseudo grades
        of the run's variant C."""
        seed = _run_seed(self.config, run)
        if name is None:
            mode = self._input_mode(VGG16_ENCODER)
            model = self.vgg16_unet("C", seed)
            self.compile_multitask(model)
            source, kind = self.seg_source(inputs["variant_c"]["grades"]), "multitask"
        else:
            mode = self._input_mode(self.segmenter_family(name))
            model = self.segmenter(name, seed)
            self.compile_seg(model)
            source, kind = self.seg_source(), "seg"
        count = self.examples[SEG_TRAIN]
        stream = self.stream(source, count, kind=kind, mode=mode, seed=seed)
        self.fit(model, stream, count, self.seg_epochs)
        scores, pred = self.dice(model, mode, keep=self.shown if run == 0 else 0)
        self.dice_scores.setdefault(row, []).append(scores)
        if run == 0:
            self.figure[row] = pred

    def export(self, model: keras.Model, mode: str) -> None:
        """``export/mtunet``: serving signatures, reload-checked. The served input is the
        evaluation transform of ``outputs`` on the pipeline-read images (field of view resized
        and rounded to uint8 as the sources store it, ``data.graham``, the network's scaling
        ``mode``): :func:`drkeras.export.pipeline_preprocess`."""
        export_model(
            model,
            self.ctx.export_dir / "mtunet",
            image_size=self.size,
            preprocess=pipeline_preprocess(
                fov_crop=self.data.fov_crop, graham=self.data.graham, normalization=mode
            ),
            output_names=[keys.GRADE_PROBS, keys.SEG_PROBS],
            channels={keys.SEG_PROBS: mtunet.CLASS_SETS[self.class_set]},
        )

    # -------------------------------------------------------------------------- report

    def report(self) -> List[ResultsTable]:
        """Tables 1-4 (our numbers beside the paper's; a run whose stage did not train, e.g.
        in a dry run, adds nothing to a cell), Fig. 6, ``history.png`` and the comparison."""
        tables = self._tables()
        self._figures()
        self._compare()
        return tables

    def _tables(self) -> List[ResultsTable]:
        config, method = self.config, self.method
        summary = run_config_summary(config)
        runs = int(config.train.runs)
        budget = (
            f"EyePACS stage: {self.examples[BALANCED_SET]} balanced images, "
            f"{config.train.epochs} epoch(s); IDRiD-S stage: {method.seg_epochs} epoch(s)"
        )
        t1 = ResultsTable(
            "table1",
            "Table 1: MTUnet variants; Dice = mean of pooled red and yellow Dice on IDRiD-S test, "
            f"ROC = mean one-vs-rest AUC over 5 grades on IDRiD-D test ({summary}; {budget})",
            [DICE, ROC],
            row_header="Network",
            paper=PAPER_TABLE1,
            digits=2,
        )
        for row in VARIANT_ROWS:
            values = self.variant_scores.get(row, [])
            if values:
                t1.add(row, DICE, [v[0] for v in values])
                t1.add(row, ROC, [v[1] for v in values])

        seg_note = (
            f"UNet/LinkNet/Feature Pyramid encoder {method.segmenter_backbone}; DeepLabv3 row: "
            f"keras-cv DeepLabV3+ on {method.deeplab_backbone}"
        )
        t2 = dice_table(
            self.dice_scores,
            title=f"Table 2: Dice (%) pooled over IDRiD-S test ({self.examples[SEG_TEST]} "
            f"images), mean ± std over {runs} run(s); {seg_note}; the paper finds MTUNet > "
            f"LinkNet significant at 10 % (paired t-test) ({summary}; {budget})",
        )

        substitutes = [
            f"{row} = {name}"
            for row, name in zip(GRADER_ROWS, method.graders)
            if name not in _ROW_ARCHITECTURES[row] or name == "nasnet_mobile"
        ]
        grader_note = "graders: " + (", ".join(substitutes) if substitutes else "as in the paper")
        tables = [t1, t2]
        for name, paper, results, key, where in (
            ("table3", PAPER_TABLE3, self.roc_idrid, IDRID_TEST, "IDRiD-D test"),
            (
                "table4",
                PAPER_TABLE4,
                self.roc_external,
                EXTERNAL_TEST,
                f"{method.external} {method.external_split} (instead of the private SiDRP14-15)",
            ),
        ):
            counts = self.grade_counts[key]
            table = ResultsTable(
                name,
                f"Table {name[-1]}: one-vs-rest ROC AUC (%) per DR level on {where}, "
                f"{int(counts.sum())} images (per grade {counts.tolist()}), mean ± std over "
                f"{runs} run(s); trained on the balanced {method.grading_set} set; "
                f"{grader_note} ({summary}; {budget})",
                list(GRADE_COLUMNS),
                row_header="Network",
                paper={
                    row: dict(zip(GRADE_COLUMNS, (v[0] for v in cells)))
                    for row, cells in paper.items()
                },
                digits=2,
            )
            for row in list(GRADER_ROWS) + [MTUNET_GRADING_ROW]:
                if not results.get(row):
                    continue
                values = np.stack(results[row])
                for k, column in enumerate(GRADE_COLUMNS):
                    table.add(row, column, values[:, k])
            tables.append(table)
        return tables

    def _figures(self) -> None:
        if self.figure and self.figure_truth is not None:
            images, truths = self.figure_truth
            path = plot_segmentation_comparison(
                images,
                truths,
                self.figure,
                self.ctx.out_dir / "fig6_segmentation.png",
                class_set=self.class_set,
                title="Fig. 6: IDRiD-S test, run 0 (red: red lesions, yellow: yellow lesions, "
                "purple: optic disc)",
            )
            log.info("Fig. 6 written to %s", path)
        if self.ctx.history_path.is_file():
            plot_history(self.ctx.history_path, self.ctx.out_dir / "history.png")

    def _compare(self) -> dict:
        """Item 5 of the reproduction: is MTUNet's lesion Dice not worse than single-task
        UNet's at equal budget? Printed, and saved as ``comparison.json``."""
        dice = self.dice_scores

        def summary(row):
            out = {}
            for column in (RED, YELLOW):
                values = [s[column] for s in dice[row]]
                mean, std = metrics.mean_std(values)
                out[column] = {"mean": mean, "std": std, "runs": values}
            out["lesion mean"] = float(np.mean([out[c]["mean"] for c in (RED, YELLOW)]))
            return out

        rows = {row: summary(row) for row in (MTUNET_T2_ROW, "UNet", SINGLE_TASK_ROW)}
        mt = rows[MTUNET_T2_ROW]["lesion mean"]
        verdicts = {
            row: ("not worse" if mt >= rows[row]["lesion mean"] else "worse")
            for row in ("UNet", SINGLE_TASK_ROW)
        }
        result = {
            "data": self.data.source,
            "runs": int(self.config.train.runs),
            "budget": f"{self.method.seg_epochs} epoch(s) on IDRiD-S train, batch {self.batch}, "
            f"{self.size} px",
            "dice_percent": rows,
            "mtunet_vs": verdicts,
        }
        (self.ctx.out_dir / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")

        def fmt(row, column):
            cell = rows[row][column]
            std = "" if math.isnan(cell["std"]) else f" ± {cell['std']:.2f}"
            return f"{cell['mean']:.2f}{std}"

        lines = [
            "",
            f"MTUnet vs single-task UNet at equal budget ({result['budget']}; pooled Dice % on "
            f"IDRiD-S test, mean ± std over {result['runs']} run(s), data={self.data.source}):",
        ]
        for column in (RED, YELLOW):
            lines.append(
                f"  {column:15s} MTUNet {fmt(MTUNET_T2_ROW, column)} | UNet "
                f"{fmt('UNet', column)} | VGG16-UNet single task {fmt(SINGLE_TASK_ROW, column)}"
            )
        for row, verdict in verdicts.items():
            lines.append(
                f"  MTUNet's lesion Dice (mean of red and yellow, {mt:.2f}) is {verdict} than "
                f"{row}'s ({rows[row]['lesion mean']:.2f})"
            )
        print("\n".join(lines))
        return result


# ------------------------------------------------------------------------------ figures


_GROUP_COLORS = {RED: (0.95, 0.1, 0.1), YELLOW: (1.0, 0.9, 0.1)}
_DISC_COLOR = (0.6, 0.2, 0.85)


def _class_colors(class_set: str) -> Dict[int, Tuple[float, float, float]]:
    colors = {}
    groups = _class_groups(class_set)
    for group, members in groups.items():
        for index in members:
            colors[index] = _GROUP_COLORS[group]
    for index, (_, sources) in enumerate(mtunet.CLASS_SETS[class_set]):
        if tuple(sources) == ("OD",):
            colors[index] = _DISC_COLOR
    return colors


def _paint(image: np.ndarray, classes: np.ndarray, class_set: str, alpha: float = 0.75):
    out = display_image(image).copy()
    for index, color in _class_colors(class_set).items():
        where = classes == index
        out[where] = (1 - alpha) * out[where] + alpha * np.asarray(color, np.float32)
    return out


def plot_segmentation_comparison(
    images, truths, predictions: Mapping[str, np.ndarray], path, *, class_set: str, title: str
):
    """Fig. 6 of Foo et al. 2020: each image, its ground truth and every network's prediction.

    Red lesions are painted red, yellow lesions yellow, the optic disc purple.

    Args:
        images: uint8 ``[N, S, S, 3]``.
        truths: ``[N, S, S]`` true class indices of ``class_set``.
        predictions: ``{network name: [N, S, S] predicted class indices}``, in column order.
        path: output PNG (``2.2 * (2 + networks)`` by ``2.4 * N`` inches).
        class_set: the class set of the indices.
        title: figure title.

    Example::

        plot_segmentation_comparison(x, y, {"UNet": p_unet, "MTUNet": p_mt}, "fig6.png",
                                     class_set="red_yellow_od", title="IDRiD-S test")
    """
    images, truths = np.asarray(images), np.asarray(truths)
    columns = [("image", None), ("ground truth", truths)] + [
        (name, np.asarray(pred)) for name, pred in predictions.items()
    ]
    rows = len(images)
    fig = new_figure((2.2 * len(columns), 2.4 * rows + 0.6))
    for r in range(rows):
        for c, (name, classes) in enumerate(columns):
            ax = fig.add_subplot(rows, len(columns), r * len(columns) + c + 1)
            shown = images[r] if classes is None else _paint(images[r], classes[r], class_set)
            ax.imshow(display_image(shown))
            if r == 0:
                ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04, hspace=0.06)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ the experiment


def _run_seed(config: Config, run: int) -> int:
    return int(config.seed) + run


class MTUnetExperiment(Experiment):
    """Foo et al. 2020 (AAAI): Tables 1-4, Fig. 6 and the exported MTUnet (module docstring)."""

    name = "mtunet"
    title = "MTUnet: multi-task DR grading and lesion segmentation (Foo et al. 2020)"
    presets = {"smoke": SMOKE, "mini": MINI, "paper": PAPER}

    def pretrained_weights(self, config: Config) -> list:
        """The ImageNet files of ``config`` (``model.encoder_weights``): the VGG16 encoder of
        MTUnet and its variants, the Tables 3-4 graders (the cheap ``vgg16`` grader has none)
        and the Table 2 segmenters' encoders; see :mod:`drkeras.weights`."""
        from drkeras import weights

        w, m = config.model.encoder_weights, config.method
        return weights.collect(
            weights.vgg16_encoder(w, network="VGG16-UNet (MTUnet, variants, single task)"),
            *(weights.grader(g, w) for g in m.graders if g != VGG16_GRADER),
            *(
                weights.segmenter(
                    name,
                    m.deeplab_backbone if name == "deeplabv3plus" else m.segmenter_backbone,
                    w,
                    width=config.model.width,
                )
                for name in SEGMENTER_ROWS.values()
            ),
        )

    def prepare(self, ctx: RunContext) -> _Run:
        """MTUnet's declared stages (Fig. 7 and Tables 1-4, ``train.runs`` times) and its
        report (Tables 1-4, Fig. 6, the comparison); see the module docstring."""
        return _Run(ctx)


if __name__ == "__main__":
    raise SystemExit(main(MTUnetExperiment()))
