"""PLDMLT: multi-task DR grading and lesion segmentation from pixel-level labelled images only.

Reproduces "Pixel-Level Labeled Images for Multi-Task Learning" (PLDMLT): Tables 1-3 and Fig. 6.

Command (``make reproduce`` runs the first one)::

    python experiments/pldmlt.py                              # --data synthetic --preset smoke
    python experiments/pldmlt.py --data RECORDS --preset paper   # RECORDS/{idrid,ddr,diaretdb1}

Expected runtime: smoke, 4-7 minutes on 2 CPU cores (measured: ``make reproduce`` from a fresh
clone, 4.0 min wall on a quiet 2-core VM, 7.0 min with another experiment beside it; synthetic
IDRiD and DDR layouts generated and converted, 23 training stages of 3 steps at 64 px (25
declared stages with the two stage-1 ones, listed by ``_Run.stages``), the
graders run eagerly; the run directory takes 3.1 GB, mostly the resumable checkpoints of the
full-width ResNeXt graders); paper, GPU days
(four graders per dataset, then 9 (IDRiD) and 6 (DDR) pixel-level rows per fold, each 100
epochs at 1024 x 1024, five folds; not run here).

Mini preset (``--preset mini``): the paper's networks, losses and bilevel algorithm scaled to
learn the synthetic benchmark on a CPU; every key it changes, with its kind and why, is in
``MINI_CHANGES`` (IDRiD only, the official split, 128 px, quarter-width VGG16-UNets, NASNet-Mobile
and ResNet-18 encoders for the larger baselines, random initialisation, the published IDRiD-S
counts, 6 epochs for the 9 pixel-level rows and 2 for the 4 graders, Adam 1e-3). Runtime not
yet measured end to end: about 14-21 minutes on 2 quiet CPU cores estimated from per-step
timings, most of it tracing the ResNeXt graphs (graders and stage-1 Grad-CAM).

Expected result: smoke, every row of Tables 1-3 filled beside the paper's numbers, Fig. 6
(``fig6_cams.png``), overlays, training curves and ``export/pldmlt``. The numbers are those of
3 training steps on synthetic images, not the paper's: 5-class mDice about 5-20 % (a network that
predicts only background scores about 19 %: background Dice ~0.95 averaged with four lesion
classes at 0) and grading near chance. The stage-1 table shows the refinement at work on
synthetic IDRiD-S, whose true grades are known: the lesion-mask rules correct pseudo grades
that contradict the lesions (smoke: 25 % correct before refinement, 33 % after). Paper preset on
the real data: Table 1 "Ours" near mDice 96.9 / mIoU 94.2 / accuracy 57.7, Table 2 near
98.9 / 97.8 / 82.0.

What runs, for each dataset (IDRiD-S + DiaRetDB1 with IDRiD-D grades: Tables 1 and 3; DDR:
Table 2), repeated ``train.runs`` times and over ``train.folds`` folds:

1. Stage 1 (sections 3.1, 4.2): ResNeXt-101 and ResNeXt-50 are trained on the grading set
   (IDRiD-D / DDR grading, official training split) and tested on its test split (their Table
   rows); they grade every pixel-level labelled image, the more confident prediction is kept,
   and Grad-CAM maps of the five grades plus the lesion masks refine it
   (:func:`drkeras.pseudo_grades.generate_pseudo_grades`). Fig. 6 shows image, mask and the
   five CAMs.
2. Stage 2 (sections 3.2-3.4, Algorithm 1): the VGG16-UNet multi-task network
   (:func:`drkeras.models.mtunet.build_vgg16_unet`, average-pooled grading head) learns the
   fused lesion mask (section 4.1, :func:`drkeras.models.pldmlt.fuse_lesion_masks`: background,
   MA, HE, EX, SE) and the grade, ``L = L_S + beta L_C`` with categorical focal losses (gamma 2,
   alpha 0.25; beta 0.8 on IDRiD, 0.95 on DDR), Adam 5e-5, the label update network trained
   bilevel (:class:`drkeras.training.bilevel.BilevelMultiTaskTrainer`). The label update
   network starts at the stage-1 pseudo grade (label-smoothed by ``method.label_smoothing``)
   and learns a correction of its logits over all five grades (``method.label_mask=all``,
   section 3.3.2); see :func:`drkeras.models.pldmlt.build_label_update_net`.
3. Baselines on the same images, pipeline, optimizer and budget (epochs x steps x batch):
   UNet (VGG16), LinkNet (ResNet-18), DeepLabv3+ (ResNet-50), FPN (ResNet) on the fused mask
   with the same focal loss; NASNet and DenseNet-201 graders beside the two ResNeXts (sparse
   cross-entropy, the single-task standard); MTUnet (Foo et al. 2020: VGG16-UNet, max-pooled
   head, binary + categorical cross-entropy, weights [1, 1]) on the same masks and stage-1
   pseudo grades. Table 3 ablates Ours on IDRiD: ``L_S`` only; ``+ L_C`` (weights [1, 1], fixed
   pseudo grades); ``+ Upd-Net`` (bilevel, [1, 1]); ``+ Weight`` ([1, beta]: the Ours run).

Input scaling and augmentation. With ``model.encoder_weights=imagenet`` every network gets the
scaling its ImageNet weights were trained with, from the table shared with MTUnet and the exports
(:mod:`drkeras.models.input_scaling`): VGG16 (ours, MTUnet, UNet) caffe; the image-classifiers
ResNeXts of stage 1 and the LinkNet / FPN ResNet encoders 0-255 as they are; NASNet [-1, 1];
DenseNet-201 torch; keras-cv's ResNet50V2 of DeepLabv3+ [0, 1]. Without pretrained weights all
use ``data.normalization``. Training batches are augmented as section 4.1 names it, rotation,
flips and cropping (:data:`PLDMLT_AUGMENT`, our ranges).

Evaluation. Segmentation on the held-out pixel-level images (official test split, or the held-out
fold), Dice (Eq. 5) and IoU on the fused mask. The paper does not define its mDice / mIoU, so
five readings are reported side by side, each beside the paper's pair
(:class:`FusedSegmentationScore`): the 5-class mean with background, the 4-lesion mean, binary
lesion vs background, per-image means, and all pixels pooled (Dice = pixel accuracy). What the
paper's pairs allow: for ONE Dice/IoU pair ``IoU = Dice / (2 - Dice)``, and a mean of unequal
pairs lies above it (:func:`drkeras.metrics.dice_iou_relation`). All six DDR pairs, IDRiD's
DeepLabv3+ and Table 3's "+ L_C" and "+ Weight" satisfy it within rounding (one pair, e.g.
binary lesion or all pixels, or a mean of near-equal values); IDRiD's UNet, LinkNet, MTUnet,
Ours and Table 3's "L_S" lie above it (a mean over classes, images or the five folds); IDRiD's
FPN (87.101 for 92.12) and "+ Upd-Net" lie below it, where no reading can. Values of 96-99 %
need either the background in the aggregate or a near-perfect lesion segmentation; which
reading the paper used is not established, and the tables claim none (their titles list which
paper pairs fit which kind of reading). Grading accuracy (Eq. 6) is measured on the grading
test split (IDRiD-D / DDR grading).

Reading choices where the paper is silent are documented on :class:`Method` and in the tables.
"""

import dataclasses
import functools
import logging
import math
import pathlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses, metrics
from drkeras.cam_figure import plot_class_cams
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
from drkeras.data import pipeline, preprocess, records
from drkeras.experiment import Experiment, RunContext, main, run_config_summary
from drkeras.export import export_model, pipeline_preprocess
from drkeras.models import mtunet
from drkeras.models.baselines import build_grader, build_segmenter
from drkeras.models.blocks import scaled_filters
from drkeras.models.input_scaling import input_scaling
from drkeras.models.pldmlt import (
    DEFAULT_SMOOTHING,
    FUSED_CLASS_SET,
    FUSED_CLASSES,
    NUM_FUSED_CLASSES,
    build_label_update_net,
    fuse_lesion_masks,
    make_training_pair,
)
from drkeras.plots import plot_history, plot_mask_overlay
from drkeras.pseudo_grades import generate_pseudo_grades, lesion_presence
from drkeras.results import ResultsTable
from drkeras.stages import Data, Net, Stage
from drkeras.training.bilevel import BilevelMultiTaskTrainer
from drkeras.training.optim import build_optimizer

__all__ = [
    "PAPER_ABLATION",
    "PLDMLT_AUGMENT",
    "PAPER_ACCURACY",
    "PAPER_SEGMENTATION",
    "PLDMLT",
    "FusedSegmentationScore",
    "Method",
    "SegSource",
    "segmentation_ids",
    "split_sources",
    "synthetic_idrid_seg_truth",
]

log = logging.getLogger("drkeras.pldmlt")


@dataclasses.dataclass(frozen=True)
class Method:
    """PLDMLT's own hyper-parameters (``--set method.<field>=...``).

    Attributes:
        datasets: datasets to run: ``idrid`` (Tables 1 and 3) and/or ``ddr`` (Table 2).
        use_diaretdb1: join DiaRetDB1's pixel-level images to IDRiD-S (Table 1), read from
            ``--data ROOT/diaretdb1``; there is no synthetic DiaRetDB1 layout, so synthetic runs
            use IDRiD-S alone and say so in the table title.
        beta_idrid, beta_ddr: ``beta`` of ``L = L_S + beta L_C`` (Eq. 3; Tables 1-2 "Weight").
        focal_alpha, focal_gamma: the categorical focal loss of Eq. 2 (0.25 and 2.0).
        nasnet: ``nasnet_large`` or ``nasnet_mobile`` for the "NASNet" row (the paper does
            not say which; smoke uses the mobile one).
        unet_backbone, linknet_backbone, deeplab_backbone, fpn_backbone: baseline encoders of
            Tables 1-2 (VGG16, ResNet-18, ResNet-50; the FPN's "ResNet" depth is not given).
        grader_epochs: epochs of the grader stages (stage 1's ResNeXts, NASNet, DenseNet-201),
            which train on the grading set, not on the pixel-level images; 0 = ``train.epochs``
            (the paper gives no grader schedule).
        label_widths, label_hidden: the label update network (Fig. 5 is not in our copy; see
            :func:`drkeras.models.pldmlt.build_label_update_net`).
        label_smoothing: its starting point, the stage-1 pseudo grade label-smoothed by this
            amount (0.1: probability 0.92 on the pseudo grade, 0.02 on each other grade); the
            network learns a correction of it, zero at initialisation.
        label_mask: the mask ``M`` of Eq. 4: ``all`` (the five-grade hierarchy of section
            3.3.2: every grade keeps a probability and can be learnt) or ``allowed`` (only the
            stage-1 grades consistent with the lesions; an image with a single allowed grade
            then keeps it and gives the label network no gradient).
        meta_grade_weight: weight of the grading loss against the stage-1 pseudo grades in the
            meta loss of Algorithm 1 (0: the segmentation loss only; see
            :class:`drkeras.training.bilevel.BilevelMultiTaskTrainer`).
        virtual_lr: step size of Algorithm 1's virtual update (0: the model learning rate).
        cam_threshold, min_overlap, severe_min_kinds, min_lesion_pixels: the stage-1
            refinement rule (:func:`drkeras.pseudo_grades.refine_pseudo_grades`).
        closing_size: square closing applied to each lesion mask before fusing (section 4.1
            "morphological methods"; 0 = none, the paper gives no structuring element).
        run_eagerly: run training, prediction and Grad-CAM eagerly. For a few steps on a CPU
            this is faster: tracing the graph of image-classifiers' ResNeXt-50 takes about two
            minutes, more than the smoke preset's whole training of it.
        stage1_chunk: pixel-level images passed to stage 1 at once (its Grad-CAM functions
            are rebuilt per chunk, so larger chunks cost less; smaller ones less memory).
        stage1_batch: images per forward/backward pass of the graders in stage 1.
        overlays: test images drawn as segmentation overlays (ours vs ground truth).
        fig6_images: pixel-level images shown in Fig. 6 (those with the most lesion kinds).
    """

    datasets: Tuple[str, ...] = ("idrid", "ddr")
    use_diaretdb1: bool = True
    beta_idrid: float = 0.8
    beta_ddr: float = 0.95
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    nasnet: str = "nasnet_large"
    unet_backbone: str = "vgg16"
    linknet_backbone: str = "resnet18"
    deeplab_backbone: str = "resnet50_v2"
    fpn_backbone: str = "resnet50"
    grader_epochs: int = 0
    label_widths: Tuple[int, ...] = (16, 32, 64)
    label_hidden: int = 64
    label_smoothing: float = DEFAULT_SMOOTHING
    label_mask: str = "all"
    meta_grade_weight: float = 0.0
    virtual_lr: float = 0.0
    cam_threshold: float = 0.5
    min_overlap: float = 0.2
    severe_min_kinds: int = 3
    min_lesion_pixels: int = 1
    closing_size: int = 0
    run_eagerly: bool = False
    stage1_chunk: int = 64
    stage1_batch: int = 8
    overlays: int = 3
    fig6_images: int = 2


# Section 4.1 "Data Enhancement": random rotation, vertical/horizontal flipping and cropping,
# nothing else (no zoom, shift, shear or colour change). The ranges are not given; ours: any
# angle (the field of view is a disc), each flip with probability 1/2, and a square window of
# 80-100 % of the side at a random position resized back to the input size (the network input
# stays 1024 x 1024 as section 3.4 says, and evaluation sees whole images).
PLDMLT_AUGMENT = dataclasses.replace(
    aug.NO_AUGMENT,
    flip_horizontal=True,
    flip_vertical=True,
    rotation_deg=180.0,
    crop=0.2,
)

# The paper's section 3.4: Adam, learning rate 5e-5, 1024 x 1024 x 3 inputs, ImageNet encoder;
# Algorithm 1: 100 epochs; Fig. 2: five-fold cross-validation. The batch size is not given: 2
# images of 1024 x 1024 is what a VGG16-UNet trained bilevel fits in the RTX 3090's 24 GB.
PAPER = Config(
    method=Method(),
    data=DataConfig(
        image_size=1024,
        batch_size=2,
        # Without pretrained weights only; with ImageNet weights every network gets the scaling
        # its weights were trained with (drkeras.models.input_scaling): caffe for VGG16.
        normalization="imagenet_caffe",
        augment=True,  # section 4.1: rotations, flips, crops (PLDMLT_AUGMENT)
    ),
    model=ModelConfig(encoder_weights="imagenet", width=1.0),
    optimizers={
        "model": OptimizerConfig(name="adam", learning_rate=5e-5),
        # The label update network's rate is not given; the same Adam 5e-5, with a small epsilon
        # because the meta-gradient scales with the virtual step (5e-5) and would otherwise be
        # drowned by Adam's default epsilon (see BilevelMultiTaskTrainer.compile).
        "label": OptimizerConfig(name="adam", learning_rate=5e-5, epsilon=1e-12),
    },
    train=TrainConfig(epochs=100, folds=5, runs=1, verbose=2),
)

# Minutes on 2 CPU cores: 64 px, narrow networks, the smallest registry variants, a few steps.
SMOKE = Config(
    method=Method(
        nasnet="nasnet_mobile",
        linknet_backbone="resnet18",
        deeplab_backbone="resnet18_v2",
        fpn_backbone="resnet18",
        label_widths=(8, 16),
        label_hidden=16,
        run_eagerly=True,
        stage1_batch=16,
    ),
    data=DataConfig(image_size=64, batch_size=4, synthetic_size=128, augment=True),
    model=ModelConfig(encoder_weights=None, width=0.125),
    optimizers={
        "model": OptimizerConfig(name="adam", learning_rate=1e-3),
        "label": OptimizerConfig(name="adam", learning_rate=1e-3),
    },
    train=TrainConfig(
        epochs=1, steps_per_epoch=3, folds=1, runs=1, verbose=2, keep_checkpoints="none"
    ),
)

# The paper's topology and algorithm, scaled to learn the synthetic benchmark on 2 CPU cores
# (``--preset mini``; make evidence): every key it changes from PAPER, with its kind and why.
MINI_CHANGES = {
    "method.datasets": PresetChange("steps", "idrid", "IDRiD only, as the issue allows"),
    "train.folds": PresetChange("steps", "1", "the official IDRiD-S split, not five folds"),
    "data.image_size": PresetChange("resolution", "128", "1024 px -> 128 px (a multiple of 32)"),
    "model.width": PresetChange("width", "0.25", "quarter-width VGG16-UNets and decoders"),
    "method.nasnet": PresetChange("width", "nasnet_mobile", "NASNet-Mobile for NASNet-Large"),
    "method.unet_backbone": PresetChange(
        "width", "resnet18", "UNet encoder: ResNet-18 for a full-width VGG16 (5x our UNet's cost)"
    ),
    "method.deeplab_backbone": PresetChange(
        "width", "resnet18_v2", "DeepLabv3+ encoder: ResNet-18 V2 for ResNet-50 V2"
    ),
    "method.fpn_backbone": PresetChange(
        "width", "resnet18", "FPN encoder: ResNet-18 for ResNet-50"
    ),
    "model.encoder_weights": RANDOM_WEIGHTS,
    "data.normalization": SYMMETRIC_INPUTS,
    "data.synthetic_scale": PUBLISHED_IDRID_S,
    "train.epochs": PresetChange("steps", "6", "pixel-level rows: 6 epochs of 27 steps"),
    "method.grader_epochs": PresetChange(
        "steps", "2", "graders (ResNeXts, NASNet, DenseNet): 2 epochs of 51 steps"
    ),
    "optimizers.model.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 5e-5: a few hundred steps from random weights"
    ),
    "optimizers.label.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 5e-5, the model's rate as in PAPER"
    ),
}
MINI = derive_preset(PAPER, MINI_CHANGES)

# ------------------------------------------------------------------------------ paper numbers

# The paper does not define how its mDice / mIoU aggregate: candidate readings side by side,
# (name, FusedSegmentationScore keys), the paper's pair beside each.
SEG_READINGS = (
    ("5-class", "mdice", "miou"),
    ("lesions", "lesion_mdice", "lesion_miou"),
    ("binary lesion", "binary_dice", "binary_iou"),
    ("per-image", "image_mdice", "image_miou"),
    ("all pixels", "pixel_dice", "pixel_iou"),
)
SEG_COLUMNS = tuple(
    column for name, _, _ in SEG_READINGS for column in (f"mDice {name} (%)", f"mIoU {name} (%)")
)
READINGS_NOTE = (
    "mDice/mIoU readings (the paper does not define them), each beside the paper's pair: "
    "5-class = mean over background + 4 lesion classes, lesions = mean over the 4 lesion "
    "classes (both per class pooled over the test images); binary lesion = any lesion vs "
    "background, pooled; per-image = each class averaged over images, then over the 5 "
    "classes; all pixels = counts pooled over images and classes (Dice = pixel accuracy)"
)
ACCURACY = "Accuracy (%)"
STAGE1_COLUMNS = (
    "images",
    "changed by refinement",
    "accuracy before refinement (%)",
    "accuracy after refinement (%)",
)

# Tables 1-2, segmentation part: (mDice, mIoU) in percent.
PAPER_SEGMENTATION: Dict[str, Dict[str, Tuple[float, float]]] = {
    "idrid": {
        "UNet": (91.859, 86.216),
        "LinkNet": (95.145, 91.950),
        "DeepLabv3+": (95.732, 91.813),
        "FPN": (95.897, 87.101),
        "MTUnet": (96.181, 93.562),
        "Ours": (96.949, 94.164),
    },
    "ddr": {
        "UNet": (95.612, 91.591),
        "LinkNet": (97.346, 94.829),
        "DeepLabv3+": (96.244, 92.760),
        "FPN": (98.258, 96.577),
        "MTUnet": (98.961, 97.942),
        "Ours": (98.897, 97.820),
    },
}
# Tables 1-2, DR grading part: accuracy in percent.
PAPER_ACCURACY: Dict[str, Dict[str, float]] = {
    "idrid": {
        "NASNet": 50.74,
        "DenseNet-201": 48.98,
        "ResNeXt-50": 53.01,
        "ResNeXt-101": 57.83,
        "MTUnet": 60.75,
        "Ours": 57.69,
    },
    "ddr": {
        "NASNet": 76.59,
        "DenseNet-201": 74.25,
        "ResNeXt-50": 81.39,
        "ResNeXt-101": 82.12,
        "MTUnet": 84.59,
        "Ours": 81.98,
    },
}
# Table 3 (IDRiD): (mDice, mIoU) in percent.
PAPER_ABLATION: Dict[str, Tuple[float, float]] = {
    "L_S": (94.96, 91.02),
    "+ L_C": (94.64, 89.83),
    "+ Upd-Net": (95.05, 90.48),
    "+ Weight": (96.94, 94.06),
}

SEGMENTER_ROWS = {"UNet": "unet", "LinkNet": "linknet", "DeepLabv3+": "deeplabv3plus", "FPN": "fpn"}
# Training-stage names of the pixel-level rows (history.csv, checkpoints, TensorBoard).
STAGE_NAMES = {
    **SEGMENTER_ROWS,
    "MTUnet": "mtunet",
    "L_S": "ls",
    "+ L_C": "ls_lc",
    "+ Upd-Net": "ls_lc_updnet",
    "Ours": "ours",
}
# Rows whose stage is the other's with another hyper-parameter value (the same networks, input
# size and trainer): "+ Upd-Net" is Ours with equal task weights instead of beta. A dry run trains
# Ours (declared first) and only builds the data of these.
_DRY_RUN_SHARES = {"+ Upd-Net": "Ours"}
# Stage 1's graders, most confident first on ties (section 3.1 names ResNeXt-101 first).
PSEUDO_GRADERS = {"ResNeXt-101": "resnext101", "ResNeXt-50": "resnext50"}
EQUAL_WEIGHTS = 1.0  # beta of the ablation rows without "Weight": both tasks weighted [1, 1]
LABEL_MASKS = ("all", "allowed")  # choices of Method.label_mask (M of Eq. 4)
# Our VGG16-UNet (Ours, the ablation rows, MTUnet) in the input-scaling table
# (drkeras.models.input_scaling): keras.applications VGG16 layout and weights.
VGG16_ENCODER = "vgg16"
# The Method field naming the encoder of each segmenter row.
_SEGMENTER_BACKBONE = {
    "unet": "unet_backbone",
    "linknet": "linknet_backbone",
    "deeplabv3plus": "deeplab_backbone",
    "fpn": "fpn_backbone",
}

_DATASETS = {
    "idrid": {
        "number": 1,
        "pixel_name": "IDRiD-S",
        "grading_name": "IDRiD-D",
        "seg_splits": ("train", "test"),
        "beta": "beta_idrid",
    },
    "ddr": {
        "number": 2,
        "pixel_name": "DDR lesion segmentation",
        "grading_name": "DDR grading",
        "seg_splits": ("train", "val", "test"),
        "beta": "beta_ddr",
    },
}
_DIARETDB1_SPLITS = ("train", "test")
_TRAIN_SPLITS = ("train", "val")  # the official split: these train, "test" evaluates

# The paper's directional claims (drkeras.claims). Segmentation claims are checked in the
# "lesions" reading of mDice / mIoU (the mean over the four lesion classes): the paper does not
# define its aggregate, and the readings that include background or pool all pixels are
# dominated by background; checking all ten would multiply the comparisons fivefold.
CLAIM_SEG_COLUMNS = ("mDice lesions (%)", "mIoU lesions (%)")
SINGLE_TASK_GRADERS = ("NASNet", "DenseNet-201", "ResNeXt-50")
CLAIMS = (
    *(
        Claim("Table 1, section 4.3", "PLDMLT segments better than the single-task segmenters "
              "and MTUnet on IDRiD", "table1_segmentation", column, "Ours",
              (*SEGMENTER_ROWS, "MTUnet"))
        for column in CLAIM_SEG_COLUMNS
    ),
    *(
        Claim("Table 2, section 4.3", "PLDMLT segments better than the single-task segmenters "
              "on DDR (MTUnet only 'competitive')", "table2_segmentation", column, "Ours",
              tuple(SEGMENTER_ROWS))
        for column in CLAIM_SEG_COLUMNS
    ),
    *(
        Claim(f"Table {n}, section 4.3", "PLDMLT grades better than NASNet, DenseNet-201 and "
              "ResNeXt-50 (ResNeXt-101 ahead in the paper's own table)", f"table{n}_grading",
              ACCURACY, "Ours", SINGLE_TASK_GRADERS)
        for n in (1, 2)
    ),
    *(
        Claim(f"Table {n}, section 4.3", "MTUnet grades better than PLDMLT (conceded by the "
              "paper)", f"table{n}_grading", ACCURACY, "MTUnet", ("Ours",))
        for n in (1, 2)
    ),
    *(
        claim
        for column in CLAIM_SEG_COLUMNS
        for claim in (
            Claim("Table 3, section 4.4", "adding L_C alone lowers segmentation (gradient "
                  "imbalance)", "table3_ablation", column, "L_S", ("+ L_C",)),
            Claim("Table 3, section 4.4", "the label update network recovers segmentation "
                  "over + L_C", "table3_ablation", column, "+ Upd-Net", ("+ L_C",)),
            Claim("Table 3, section 4.4", "with the task weights, segmentation is above every "
                  "other ablation row", "table3_ablation", column, "+ Weight",
                  ("L_S", "+ L_C", "+ Upd-Net")),
        )
    ),
)  # fmt: skip


# ------------------------------------------------------------------------------ sources, folds


@dataclasses.dataclass(frozen=True)
class SegSource:
    """Pixel-level labelled images of one records folder and split.

    Attributes:
        records_dir: a converted dataset (``python -m data_prep``).
        split: the split inside it.
        ids: the example ids used, in the order the drkeras pipelines yield them (record order;
            ``segmentation_dataset(..., shuffle=False)`` keeps it), so per-image labels made
            here line up with pipeline elements.
    """

    records_dir: pathlib.Path
    split: str
    ids: Tuple[str, ...]


def segmentation_ids(records_dir, split: str, *, max_examples: int = 0) -> List[str]:
    """Ids of the images with lesion masks in a split, in pipeline order.

    Exactly the examples :func:`drkeras.data.pipeline.segmentation_dataset` keeps (at least one
    lesion type annotated), in the same order; ``max_examples`` keeps the first ones.

    Example::

        ids = segmentation_ids("records/idrid", "test")   # ['idrid-segmentation-test-...', ...]
    """
    labels = pipeline.read_labels(records_dir, split)
    keep = labels[keys.MASK_PRESENT].any(axis=1)
    ids = [str(i) for i in labels[keys.ID][keep]]
    return ids[:max_examples] if max_examples else ids


def split_sources(
    sources: Sequence[SegSource],
    *,
    folds: int,
    fold: int = 0,
    seed: int = 0,
    grades: Optional[Mapping[str, int]] = None,
) -> Tuple[List[SegSource], List[SegSource]]:
    """Training and test images of one fold (PLDMLT Fig. 2: five-fold cross-validation).

    ``folds <= 1`` keeps the official split: ``train``/``val`` sources train, ``test`` sources
    test. ``folds >= 2`` pools the images of every source and holds out fold ``fold`` of a
    deterministic k-fold split (:func:`drkeras.data.pipeline.kfold_split`), stratified by
    ``grades`` (e.g. the stage-1 pseudo grades) when given. Each returned source keeps its ids
    in pipeline order; sources left without images are dropped.

    Example::

        train, test = split_sources(sources, folds=5, fold=2, seed=0, grades=pseudo)
    """
    if folds <= 1:
        train = [s for s in sources if s.split in _TRAIN_SPLITS and s.ids]
        test = [s for s in sources if s.split not in _TRAIN_SPLITS and s.ids]
        return train, test
    every = [i for s in sources for i in s.ids]
    stratify = None if grades is None else [int(grades[i]) for i in every]
    train_ids, held_ids = pipeline.kfold_split(every, folds, fold, seed=seed, stratify=stratify)
    train_set, held_set = set(train_ids), set(held_ids)

    def subset(wanted):
        out = [dataclasses.replace(s, ids=tuple(i for i in s.ids if i in wanted)) for s in sources]
        return [s for s in out if s.ids]

    return subset(train_set), subset(held_set)


# ------------------------------------------------------------------------------ metrics


class FusedSegmentationScore:
    """Candidate readings of the paper's mDice / mIoU (Tables 1-3) on the fused lesion mask.

    Each image's record masks are fused (section 4.1, :func:`fuse_lesion_masks`) into the
    classes ``FUSED_CLASSES`` = background, MA, HE, EX, SE; the prediction is the argmax class.
    Dice (Eq. 5) and IoU come from :class:`drkeras.metrics.SegmentationCounter` counts, over the
    images where a class is annotated; a class with no pixel in either prediction or ground
    truth is left out of a mean. The paper does not say how its mDice / mIoU aggregate, so every
    candidate is computed (fractions in [0, 1]):

    - ``mdice``, ``miou``: mean over the 5 classes, background included, each class's counts
      pooled over the test images;
    - ``lesion_mdice``, ``lesion_miou``: the same mean over the 4 lesion classes;
    - ``binary_dice``, ``binary_iou``: one lesion class (any lesion) against background,
      counts pooled over the images;
    - ``image_mdice``, ``image_miou``: each class's Dice / IoU per image, averaged over the
      images (those where the class is annotated and not empty in both), then over the 5
      classes;
    - ``pixel_dice``, ``pixel_iou``: counts pooled over images and the 5 classes
      (:func:`drkeras.metrics.micro_dice_iou`): Dice = pixel accuracy;
    - ``dice``: per-class pooled Dice.

    Only the single-pair readings (binary lesion, all pixels) satisfy ``IoU = Dice / (2 -
    Dice)`` exactly; the means have ``mIoU`` above it (:func:`drkeras.metrics.iou_of_dice`).

    Example::

        score = FusedSegmentationScore()
        score.update(model(images)["seg_probs"], masks, mask_present)
        score.result()["mdice"]
    """

    def __init__(self, *, closing_size: int = 0):
        self.closing_size = int(closing_size)
        self._counter = metrics.SegmentationCounter(FUSED_CLASSES, empty_score=np.nan)
        self._binary = metrics.SegmentationCounter(("lesion",), empty_score=np.nan)

    def update(self, seg_probs, masks, mask_present=None) -> None:
        """Add a batch: ``seg_probs [B, H, W, 5]``, record masks ``[B, H, W, 5]``, flags [B, 5]."""
        seg_probs = np.asarray(seg_probs)
        if seg_probs.ndim != 4 or seg_probs.shape[-1] != NUM_FUSED_CLASSES:
            raise ValueError(
                f"seg_probs must be [B, H, W, {NUM_FUSED_CLASSES}] over {FUSED_CLASSES}, got "
                f"{seg_probs.shape}"
            )
        target = fuse_lesion_masks(masks, closing_size=self.closing_size, one_hot=True).numpy()
        if target.shape != seg_probs.shape:
            raise ValueError(f"masks {np.shape(masks)} do not match seg_probs {seg_probs.shape}")
        pred = np.eye(NUM_FUSED_CLASSES, dtype=bool)[seg_probs.argmax(axis=-1)]
        present = None
        if mask_present is not None:
            present = mtunet.classes_annotated(mask_present, FUSED_CLASS_SET).numpy()
        self._counter.update(pred, target, present=present)
        # lesion vs background: counted where every lesion type is annotated (a lesion left
        # unannotated would count as background)
        binary_present = None if present is None else present[:, 1:].all(axis=1, keepdims=True)
        self._binary.update(
            ~pred[..., :1], (target[..., :1] == 0).astype(np.uint8), present=binary_present
        )

    def result(self) -> Dict[str, object]:
        """The readings listed on the class, and ``"dice": {class: pooled Dice}``."""
        scores = self._counter.result()
        dice = np.array([scores["dice_pooled"][c] for c in FUSED_CLASSES])
        iou = np.array([scores["iou_pooled"][c] for c in FUSED_CLASSES])
        image_dice = np.array([scores["dice_per_image"][c] for c in FUSED_CLASSES])
        image_iou = np.array([scores["iou_per_image"][c] for c in FUSED_CLASSES])
        binary = self._binary.result()
        pixel = metrics.micro_dice_iou(self._counter)
        return {
            "mdice": _nanmean(dice),
            "miou": _nanmean(iou),
            "lesion_mdice": _nanmean(dice[1:]),
            "lesion_miou": _nanmean(iou[1:]),
            "binary_dice": float(binary["dice_pooled"]["lesion"]),
            "binary_iou": float(binary["iou_pooled"]["lesion"]),
            "image_mdice": _nanmean(image_dice),
            "image_miou": _nanmean(image_iou),
            "pixel_dice": pixel["dice"],
            "pixel_iou": pixel["iou"],
            "dice": dict(zip(FUSED_CLASSES, dice.tolist())),
        }


def _nanmean(values) -> float:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ------------------------------------------------------------------------------ synthetic truth


def synthetic_idrid_seg_truth(records_dir, data: DataConfig, seed: int) -> Dict[str, int]:
    """True ICDRS grades of the synthetic IDRiD-S images, by id (to score the pseudo grades).

    IDRiD-S has no grades, and neither do its records (grade -1); for the synthetic layout the
    grade of every drawn eye is known to the generator. The segmentation part of
    :func:`drkeras.data.synthetic.write_layout` is replayed with the run's seed and sizes and
    each replayed photograph is checked against the image stored in the records, so a change of
    the generator fails loudly instead of silently scoring against wrong grades.

    Raises:
        ValueError: a replayed image does not match the record of the same id.

    Example::

        truth = synthetic_idrid_seg_truth(ctx.records("idrid"), ctx.config.data, ctx.config.seed)
    """
    from drkeras.data import synthetic

    # The writer's seed schedule (drkeras.data.synthetic._write_idrid): segmentation images are
    # drawn first from the "idrid" stream, training then test, numbered IDRiD_01, IDRiD_02, ...
    counts = synthetic.scaled_counts("idrid", data.synthetic_scale)
    rng = np.random.default_rng(synthetic._image_seed(seed, "idrid"))
    replayed = {}
    number = 1
    for split in ("train", "test"):
        n = counts["seg_" + split]
        targets = synthetic._balanced(rng, n, synthetic._SEG_GRADES)
        for i in range(n):
            fundus = synthetic.generate(
                synthetic._image_seed(seed, "idrid-seg", number + i),
                size=data.synthetic_size,
                grade=int(targets[i]),
                camera="kowa",
                label_noise=data.synthetic_label_noise,
            )
            replayed[f"idrid-segmentation-{split}-IDRiD_{number + i:02d}"] = fundus
        number += n
    truth = {}
    for split in ("train", "test"):
        for example in records.records_dataset(records_dir, split):
            example_id = example[keys.ID].numpy().decode()
            if example_id not in replayed:
                continue
            stored = example[keys.IMAGE].numpy().astype(np.float32)
            drawn = replayed[example_id].image.astype(np.float32)
            if stored.shape != drawn.shape or np.abs(stored - drawn).mean() > 4.0:
                raise ValueError(
                    f"{records_dir}: record {example_id} is not the synthetic image the generator "
                    "draws for it (shape or pixels differ); the synthetic IDRiD writer changed, "
                    "update synthetic_idrid_seg_truth"
                )
            truth[example_id] = int(replayed[example_id].true_grade)
    return truth


# ------------------------------------------------------------------------------ the experiment


# The shuffle buffer of pipeline.grading_dataset (its default) for the graders' training split.
_PIPELINE_SHUFFLE_BUFFER = 256
# The pixel-level training stream shuffles augmented images, float32 (12 bytes per pixel) where
# the plan counts a buffered example as uint8 (3): the difference, declared as held memory.
_FLOAT_IMAGE_EXTRA_BYTES = 12 - 3


def _part_cache(cache, index: int):
    """The ``cache`` argument of the ``index``-th pipeline making up one declared dataset: a
    file cache gets one file per part (the runner deletes ``<file>*`` on release)."""
    return f"{cache}_{index}" if isinstance(cache, str) else cache


def _compact_masks(image, targets):
    """One pipeline example with its 0/1 masks as uint8 (exact), a quarter of their float32
    bytes while they wait in the shuffle buffer; :meth:`_Run._train_data` casts them back."""
    return image, {**targets, keys.MASKS: tf.cast(targets[keys.MASKS], tf.uint8)}


class _PseudoLabels:
    """Stage-1 output per image id: the refined pseudo grade and its allowed-grade mask M."""

    def __init__(self):
        self.grade: Dict[str, int] = {}
        self.initial: Dict[str, int] = {}
        self.allowed: Dict[str, np.ndarray] = {}

    def add(self, ids, stage1) -> None:
        for k, example_id in enumerate(ids):
            self.grade[example_id] = int(stage1["grades"][k])
            self.initial[example_id] = int(stage1["initial_grades"][k])
            self.allowed[example_id] = np.asarray(stage1["allowed"][k], np.float32)

    def arrays(self, ids) -> Tuple[np.ndarray, np.ndarray]:
        return (
            np.array([self.grade[i] for i in ids], np.int32),
            np.stack([self.allowed[i] for i in ids]).astype(np.float32),
        )


def _paper_cells(pair: Tuple[float, float]) -> Dict[str, float]:
    """The paper's (mDice, mIoU) beside every reading's columns."""
    return dict(zip(SEG_COLUMNS, pair * len(SEG_READINGS)))


def paper_pairs_note(pairs: Mapping[str, Tuple[float, float]], *, decimals: int) -> str:
    """Which readings each published (mDice, mIoU) pair is consistent with, as a sentence.

    :func:`drkeras.metrics.dice_iou_relation`: ``mIoU = mDice / (2 - mDice)`` within the
    rounding of the printed values fits one Dice/IoU pair (binary lesion, all pixels) or a mean
    of near-equal values; ``mIoU`` above it fits a mean of unequal values (5-class, lesions,
    per-image, or any reading averaged over the five folds); below it fits none.

    Example::

        paper_pairs_note(PAPER_SEGMENTATION["ddr"], decimals=3)
        # 'paper pairs with mIoU = mDice/(2 - mDice) (one Dice/IoU pair: ...): UNet, ...'
    """
    groups: Dict[str, List[str]] = {"single": [], "mean": [], "none": []}
    for row, (dice, iou) in pairs.items():
        groups[metrics.dice_iou_relation(dice, iou, decimals=decimals)].append(row)
    text = {
        "single": "with mIoU = mDice/(2 - mDice) (one Dice/IoU pair: binary lesion, all pixels; "
        "or a mean of near-equal values)",
        "mean": "with mIoU above mDice/(2 - mDice) (a mean of unequal values: over classes, "
        "images or the five folds)",
        "none": "with mIoU below mDice/(2 - mDice) (no reading: no mean lies there)",
    }
    parts = [f"{text[k]}: {', '.join(rows)}" for k, rows in groups.items() if rows]
    return "paper pairs " + "; ".join(parts)


class _Tables:
    """The paper's tables for one run, with the paper's numbers as data."""

    def __init__(self, config: Config, pixel_sets: Mapping[str, str]):
        method = config.method
        summary = run_config_summary(config)
        folds = config.train.folds
        evaluation = (
            f"{folds}-fold cross-validation (mean ± std over folds)"
            if folds > 1
            else "official train/test split"
        )
        note = READINGS_NOTE
        self.by_name: Dict[str, ResultsTable] = {}
        for dataset in method.datasets:
            spec = _DATASETS[dataset]
            number = spec["number"]
            beta = getattr(method, spec["beta"])
            weights = f"weights [L_S, L_C]: MTUnet [1, 1], Ours [1, {beta:g}]"
            self.by_name[f"table{number}_segmentation"] = ResultsTable(
                f"table{number}_segmentation",
                f"Table {number} (lesion segmentation): {pixel_sets[dataset]}, {evaluation}; "
                f"{note}; {paper_pairs_note(PAPER_SEGMENTATION[dataset], decimals=3)}; "
                f"{weights}; {summary}",
                SEG_COLUMNS,
                paper={
                    row: _paper_cells(pair) for row, pair in PAPER_SEGMENTATION[dataset].items()
                },
                digits=2,
            )
            self.by_name[f"table{number}_grading"] = ResultsTable(
                f"table{number}_grading",
                f"Table {number} (DR grading): accuracy on the {spec['grading_name']} test split; "
                f"graders trained on {spec['grading_name']}, MTUnet and Ours on "
                f"{pixel_sets[dataset]} with stage-1 pseudo grades; {weights}; {summary}",
                [ACCURACY],
                paper={row: {ACCURACY: v} for row, v in PAPER_ACCURACY[dataset].items()},
                digits=2,
            )
        if "idrid" in method.datasets:
            self.by_name["table3_ablation"] = ResultsTable(
                "table3_ablation",
                f"Table 3 (ablation, {pixel_sets['idrid']}): L_S alone; + L_C (fixed pseudo "
                f"grades, weights [1, 1]); + Upd-Net (bilevel label update, [1, 1]); + Weight "
                f"([1, {method.beta_idrid:g}], the Ours run of Table 1); {note}; "
                f"{paper_pairs_note(PAPER_ABLATION, decimals=2)}; {summary}",
                SEG_COLUMNS,
                paper={row: _paper_cells(pair) for row, pair in PAPER_ABLATION.items()},
                digits=2,
            )
        self.by_name["stage1_pseudo_grades"] = ResultsTable(
            "stage1_pseudo_grades",
            "Stage 1 pseudo grades of the pixel-level images (not in the paper): how many the "
            "Grad-CAM + lesion-mask refinement changed and, where true grades are known "
            "(synthetic IDRiD-S), their accuracy before and after refinement",
            STAGE1_COLUMNS,
            row_header="Images",
            digits=1,
        )

    def add_segmentation(self, table: str, row: str, scores: Mapping) -> None:
        values = [scores[key] for _, dice, iou in SEG_READINGS for key in (dice, iou)]
        for column, value in zip(SEG_COLUMNS, values):
            self.by_name[table].add(row, column, 100.0 * value)

    def add_accuracy(self, table: str, row: str, accuracy: float) -> None:
        self.by_name[table].add(row, ACCURACY, 100.0 * accuracy)

    def all(self) -> List[ResultsTable]:
        return list(self.by_name.values())


class _Run:
    """One execution of the experiment (``PLDMLT.prepare``): its declared stages
    (:meth:`stages`) and its report (:meth:`report`).

    The runner (:mod:`drkeras.experiment`) plans from :meth:`stages`, then runs them in order;
    every dataset comes from ``ctx.data(key)`` (cached and released by the runner), every
    network is built in the stage that trains or evaluates it, and what a later stage needs
    (the stage-1 graders, the pseudo grades) is a stage's output. The tables are filled by the
    stages that evaluate their rows; a stage a dry run skips leaves its cells empty.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config
        self.method: Method = ctx.config.method
        self.data = ctx.config.data
        self.size = int(self.data.image_size)
        self.shape = (self.size, self.size, 3)
        self.batch = int(self.data.batch_size)
        self.tables: Optional[_Tables] = None
        # Stage 1's pseudo grades by run tag, for the datasets of later folds (their k-fold
        # split is stratified by them; a dataset's build gets nothing but its cache).
        self._fold_grades: Dict[str, Dict[str, int]] = {}
        self._check_method()

    # -------------------------------------------------------------------------- set-up

    def _check_method(self) -> None:
        unknown = [d for d in self.method.datasets if d not in _DATASETS]
        if unknown or not self.method.datasets:
            raise ValueError(
                f"method.datasets={self.method.datasets}: choose among {sorted(_DATASETS)}"
            )
        if self.method.nasnet not in ("nasnet_large", "nasnet_mobile"):
            raise ValueError(
                f"method.nasnet={self.method.nasnet!r}: expected nasnet_large or nasnet_mobile"
            )
        if self.method.label_mask not in LABEL_MASKS:
            raise ValueError(
                f"method.label_mask={self.method.label_mask!r}: expected one of {LABEL_MASKS}"
            )
        if not 0.0 < self.method.label_smoothing < 1.0:
            raise ValueError(
                f"method.label_smoothing={self.method.label_smoothing}: expected a value in (0, 1)"
            )
        for field in _SEGMENTER_BACKBONE.values():
            try:
                self._scaling(getattr(self.method, field))
            except ValueError as err:
                raise ValueError(f"method.{field}: {err}") from None

    def _scaling(self, network: str) -> str:
        """The input scaling of ``network``: what its ImageNet weights were trained with when
        ``model.encoder_weights=imagenet``, ``data.normalization`` otherwise
        (:func:`drkeras.models.input_scaling.input_scaling`, shared with MTUnet)."""
        return input_scaling(
            network,
            encoder_weights=self.config.model.encoder_weights,
            default=self.data.normalization,
        )

    def _row_network(self, row: str) -> str:
        """The network (encoder) of a pixel-level row, as named in the input-scaling table."""
        if row in SEGMENTER_ROWS:
            return getattr(self.method, _SEGMENTER_BACKBONE[SEGMENTER_ROWS[row]])
        return VGG16_ENCODER

    def _preprocess(self, mode: str) -> dict:
        """Pipeline (and export) options of a network whose input scaling is ``mode``."""
        return {
            "fov_crop": self.data.fov_crop,
            "graham": self.data.graham,
            "normalization": mode,
        }

    def _steps(self, count: int) -> int:
        steps = self.config.train.steps_per_epoch
        return int(steps) if steps else max(1, math.ceil(count / self.batch))

    def _model(self, key: tuple, seed: int, build: Callable[[], keras.Model]) -> keras.Model:
        """A network built in the strategy scope, its initial weights drawn from ``seed``: an
        architecture's initial weights are a function of the seed, so every row of one seed
        (and the same grader on both datasets) starts from the same initialisation, and
        nothing outlives the stage that builds it. ``key`` names the architecture."""
        tf.keras.utils.set_random_seed(seed)
        with self.ctx.strategy.scope():
            return build()

    def _outputs(self, model: keras.Model, images) -> Dict[str, np.ndarray]:
        if self.method.run_eagerly:
            out = model(images, training=False)
        else:
            out = model.predict_on_batch(images)
        return {k: np.asarray(v) for k, v in out.items()}

    def _focal(self):
        return functools.partial(
            losses.categorical_focal_loss,
            alpha=self.method.focal_alpha,
            gamma=self.method.focal_gamma,
        )

    def _focal_loss(self):
        return losses.CategoricalFocalLoss(
            alpha=self.method.focal_alpha, gamma=self.method.focal_gamma
        )

    # -------------------------------------------------------------------------- data

    def _pixel_sources(self, dataset: str) -> Tuple[List[SegSource], str]:
        """Pixel-level sources of a dataset and the name used in table titles."""
        spec = _DATASETS[dataset]
        folders = [(self.ctx.records(dataset), spec["seg_splits"])]
        name = spec["pixel_name"]
        if dataset == "idrid" and self.method.use_diaretdb1:
            if self.data.source == "synthetic":
                name += " (DiaRetDB1 not used: it has no synthetic layout)"
            else:
                folders.append((self.ctx.records("diaretdb1"), _DIARETDB1_SPLITS))
                name += " + DiaRetDB1"
        sources = []
        for folder, splits in folders:
            for split in splits:
                try:
                    ids = segmentation_ids(folder, split, max_examples=self.data.max_examples)
                except FileNotFoundError:
                    log.info("%s has no %s split; skipped", folder, split)
                    continue
                if ids:
                    sources.append(SegSource(pathlib.Path(folder), split, tuple(ids)))
        if not sources:
            raise FileNotFoundError(
                f"no pixel-level labelled images (examples with lesion masks) in "
                f"{[str(f) for f, _ in folders]}"
            )
        return sources, name

    def _seg_eval_data(
        self, source: SegSource, batch_size: int = 0, *, mode: str, cache=True
    ) -> tf.data.Dataset:
        """Batches ``(image, {masks, mask_present})`` of a source in ``source.ids`` order, the
        images scaled by ``mode`` (``cache``: keep the decoded images in memory (True), in
        this file, or not at all (False))."""
        return pipeline.segmentation_dataset(
            source.records_dir,
            source.split,
            ids=list(source.ids),
            size=self.size,
            batch_size=batch_size or self.batch,
            shuffle=False,
            augment=False,
            cache=cache,
            seed=self.config.seed,
            **self._preprocess(mode),
        )

    def _seg_eval_stream(
        self, sources: Sequence[SegSource], *, mode: str, batch_size: int = 0, cache=True
    ) -> tf.data.Dataset:
        """Every source's :meth:`_seg_eval_data` one after the other (no batch spans two
        sources): the images of ``[i for s in sources for i in s.ids]`` in that order."""
        if not sources:
            raise ValueError("no pixel-level source to read (an empty list of SegSource)")
        parts = [
            self._seg_eval_data(source, batch_size, mode=mode, cache=_part_cache(cache, k))
            for k, source in enumerate(sources)
        ]
        return functools.reduce(lambda a, b: a.concatenate(b), parts)

    def _train_images(self, sources: Sequence[SegSource], seed: int, mode: str, cache=True):
        """Augmented, shuffled, repeating batches ``((image, targets), index)`` of the
        pixel-level training images, ``index`` the image's position in
        ``[i for s in sources for i in s.ids]`` (:meth:`_train_data` looks its pseudo grade up).

        The pipeline yields each source's images in ``source.ids`` order (no shuffling inside),
        zipped here with their positions, then the sources are mixed and shuffled together.
        The masks (0/1) wait in the shuffle buffer as uint8 (the float32 image cannot).
        """
        parts, weights, offset = [], [], 0
        for k, source in enumerate(sources):
            images = pipeline.segmentation_dataset(
                source.records_dir,
                source.split,
                ids=list(source.ids),
                size=self.size,
                batch_size=1,
                augment=self.data.augment,
                augment_params=PLDMLT_AUGMENT,
                shuffle=False,
                repeat=True,
                seed=seed,
                cache=_part_cache(cache, k),
                **self._preprocess(mode),
            ).unbatch()
            images = images.map(_compact_masks, num_parallel_calls=tf.data.AUTOTUNE)
            index = tf.data.Dataset.range(offset, offset + len(source.ids)).repeat()
            parts.append(tf.data.Dataset.zip((images, index)))
            weights.append(len(source.ids))
            offset += len(source.ids)
        count = int(sum(weights))
        if len(parts) == 1:
            ds = parts[0]
        else:
            ds = tf.data.Dataset.sample_from_datasets(
                parts, weights=[w / count for w in weights], seed=seed
            )
        return ds.shuffle(max(count, 1), seed=seed).batch(self.batch, drop_remainder=True)

    def _train_data(
        self,
        sources: Sequence[SegSource],
        labels: _PseudoLabels,
        kind: str,
        seed,
        mode: str,
        stream: Optional[tf.data.Dataset] = None,
    ):
        """The training stream of the pixel-level images shaped for one kind of model.

        ``kind``: ``segmentation`` (``(image, {seg_probs})``), ``mtunet`` (plus the integer
        pseudo grade), ``multitask`` (plus the one-hot pseudo grade) or ``bilevel``
        (:func:`make_training_pair`). ``stream``: :meth:`_train_images` of ``sources`` (the
        declared dataset; built here when not given). Returns ``(dataset, number of images)``.
        """
        if stream is None:
            stream = self._train_images(sources, seed, mode)
        ids = [i for s in sources for i in s.ids]
        grade_of, allowed_of = (tf.constant(a) for a in labels.arrays(ids))
        closing = self.method.closing_size
        num_grades = self.config.model.num_grades

        def element(pair, index):
            image, targets = pair
            grade, allowed = tf.gather(grade_of, index), tf.gather(allowed_of, index)
            masks = tf.cast(targets[keys.MASKS], tf.float32)
            if kind == "bilevel":
                # M of Eq. 4: every grade (None) or the stage-1 allowed grades (method.label_mask)
                grade_mask = allowed if self.method.label_mask == "allowed" else None
                return make_training_pair(
                    image, masks, grade, grade_mask, num_grades=num_grades, closing_size=closing
                )
            seg = fuse_lesion_masks(masks, closing_size=closing, one_hot=True)
            if kind == "segmentation":
                return image, {keys.SEG_PROBS: seg}
            if kind == "mtunet":
                return image, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: grade}
            one_hot = tf.one_hot(grade, num_grades)
            return image, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: one_hot}

        ds = stream.map(element, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline.distribution_options())
        return ds, len(ids)

    def _grading_count(self, records_dir, split: str) -> int:
        grades = pipeline.read_labels(records_dir, split)[keys.GRADE]
        count = int(np.sum((grades >= 0) & (grades < self.config.model.num_grades)))
        if self.data.max_examples:
            count = min(count, self.data.max_examples)
        if count == 0:
            raise ValueError(
                f"{records_dir} split {split!r} has no image with a DR grade in "
                f"[0, {self.config.model.num_grades}); the graders need graded images"
            )
        return count

    def _grading_data(
        self, records_dir, split: str, *, training: bool, mode: str, seed: int = 0, cache=True
    ):
        """Graded images scaled by ``mode``: augmented repeating ``(image, {grade_probs:
        grade})`` batches for training, or one pass of ``(image, grade)`` for testing."""
        ds = pipeline.grading_dataset(
            records_dir,
            split,
            size=self.size,
            batch_size=self.batch,
            num_classes=self.config.model.num_grades,
            augment=self.data.augment and training,
            augment_params=PLDMLT_AUGMENT,
            shuffle=training,
            repeat=training,
            seed=seed,
            cache=cache,
            max_examples=self.data.max_examples,
            **self._preprocess(mode),
        )
        if training:
            ds = ds.map(lambda image, grade: (image, {keys.GRADE_PROBS: grade}))
        return ds

    # -------------------------------------------------------------------------- evaluation

    def _evaluate_segmentation(
        self, model, sources: Sequence[SegSource], mode: str, data=None
    ) -> Dict[str, object]:
        """The readings of :class:`FusedSegmentationScore` on ``sources``, batch by batch
        (``data``: their declared :meth:`_seg_eval_stream`; built here when not given)."""
        if data is None:
            data = self._seg_eval_stream(sources, mode=mode)
        score = FusedSegmentationScore(closing_size=self.method.closing_size)
        for image, targets in data:
            probs = self._outputs(model, image)[keys.SEG_PROBS]
            score.update(probs, targets[keys.MASKS], targets[keys.MASK_PRESENT])
        return score.result()

    def _evaluate_grading(
        self, model, records_dir, mode: str, split: str = "test", data=None
    ) -> float:
        """Accuracy on a grading split (``data``: its declared :meth:`_grading_data`); only
        the grades and the predicted probabilities (5 per image) are kept."""
        if data is None:
            data = self._grading_data(records_dir, split, training=False, mode=mode)
        truth, probs = [], []
        for image, grade in data:
            probs.append(self._outputs(model, image)[keys.GRADE_PROBS])
            truth.append(grade.numpy())
        return metrics.accuracy(np.concatenate(truth), np.concatenate(probs))

    # -------------------------------------------------------------------------- models

    def _build_grader(self, arch: str) -> keras.Model:
        """A grader (Tables 1-2 grading rows, stage 1) at the run's input size."""
        model_cfg = self.config.model
        return build_grader(
            arch,
            input_shape=self.shape,
            num_grades=model_cfg.num_grades,
            encoder_weights=model_cfg.encoder_weights,
            dropout=model_cfg.dropout,
        )

    def _build_segmenter(self, name: str) -> keras.Model:
        """A segmentation baseline (``unet``, ``linknet``, ``fpn``, ``deeplabv3plus``)."""
        width = self.config.model.width
        method = self.method

        def scaled(filters):
            return scaled_filters(filters, width)

        # Decoders narrowed by model.width like our own network (segmentation-models' and
        # keras-cv's default filter counts times the width); encoders keep their topology.
        options = {
            "unet": dict(
                backbone=method.unet_backbone,
                decoder_filters=tuple(scaled(f) for f in (256, 128, 64, 32, 16)),
            ),
            "linknet": dict(backbone=method.linknet_backbone),
            "fpn": dict(backbone=method.fpn_backbone, pyramid_block_filters=scaled(256)),
            "deeplabv3plus": dict(
                backbone=method.deeplab_backbone,
                width=width,
                aspp_filters=scaled(256),
                projection_filters=scaled(48),
                head_filters=scaled(256),
            ),
        }[name]
        return build_segmenter(
            name,
            input_shape=self.shape,
            num_classes=NUM_FUSED_CLASSES,
            encoder_weights=self.config.model.encoder_weights,
            **options,
        )

    def _build_vgg16_unet(self, role: str) -> keras.Model:
        """``role``: "segmentation" (no grading head), "mtunet" (max pooling) or "multitask"
        (PLDMLT's average-pooled head, shared by Ours and the ablation rows)."""
        model_cfg = self.config.model
        return mtunet.build_vgg16_unet(
            input_shape=self.shape,
            num_seg_classes=NUM_FUSED_CLASSES,
            num_grades=None if role == "segmentation" else model_cfg.num_grades,
            grade_pooling="max" if role == "mtunet" else "avg",
            encoder_weights=model_cfg.encoder_weights,
            width=model_cfg.width,
            dropout=model_cfg.dropout,
            name=f"pldmlt_{role}" if role != "mtunet" else "mtunet",
        )

    def _build_label_net(self) -> keras.Model:
        return build_label_update_net(
            input_shape=self.shape,
            num_grades=self.config.model.num_grades,
            widths=self.method.label_widths,
            hidden=self.method.label_hidden,
            smoothing=self.method.label_smoothing,
        )

    def _grader(self, arch: str, seed: int) -> keras.Model:
        return self._model(("grader", arch), seed, lambda: self._build_grader(arch))

    def _segmenter(self, name: str, seed: int) -> keras.Model:
        return self._model(("segmenter", name), seed, lambda: self._build_segmenter(name))

    def _vgg16_unet(self, role: str, seed: int) -> keras.Model:
        return self._model(("vgg16_unet", role), seed, lambda: self._build_vgg16_unet(role))

    def _label_net(self, seed: int) -> keras.Model:
        return self._model(("label_update_net",), seed, self._build_label_net)

    # -------------------------------------------------------------------------- training

    def _fit(self, model, data, stage: str, count: int, epochs: Optional[int] = None):
        return self.ctx.fit(
            model, data, stage=stage, epochs=epochs, steps_per_epoch=self._steps(count)
        )

    def _grader_epochs(self) -> int:
        """Epochs of a grader stage: ``method.grader_epochs``, or ``train.epochs`` at 0."""
        return int(self.method.grader_epochs or self.config.train.epochs)

    def train_grader(self, arch: str, records_dir, stage: str, seed: int, data=None) -> keras.Model:
        """Train one grader on the grading set's training split (``data``: its declared
        :meth:`_grading_data`; built here when not given)."""
        model = self._grader(arch, seed)
        with self.ctx.strategy.scope():
            model.compile(
                optimizer=build_optimizer(self.config.optimizers["model"]),
                loss={keys.GRADE_PROBS: keras.losses.SparseCategoricalCrossentropy()},
                run_eagerly=self.method.run_eagerly,
            )
        if data is None:
            data = self._grading_data(
                records_dir, "train", training=True, mode=self._scaling(arch), seed=seed
            )
        count = self._grading_count(records_dir, "train")
        self._fit(model, data, stage, count, epochs=self._grader_epochs())
        return model

    def train_pixel_model(
        self, row: str, sources, labels, stage: str, seed: int, beta: float, stream=None
    ):
        """Train one row of the segmentation tables on the pixel-level training images.

        ``row``: a segmenter row of Tables 1-2 ("UNet", ...), "MTUnet", "L_S", "+ L_C",
        "+ Upd-Net" (both with equal task weights) or "Ours" (the bilevel PLDMLT with weight
        ``beta``). ``stream``: the declared :meth:`_train_images` of ``sources`` (built here
        when not given). Returns the network (functional, dict outputs) that is evaluated and
        exported.
        """
        eager = self.method.run_eagerly
        focal = self._focal_loss
        if row == "MTUnet":
            model, kind = self._vgg16_unet("mtunet", seed), "mtunet"
            with self.ctx.strategy.scope():
                mtunet.compile_mtunet(
                    model,
                    alpha=EQUAL_WEIGHTS,
                    optimizer=build_optimizer(self.config.optimizers["model"]),
                    run_eagerly=eager,
                )
            trained = model
        elif row in SEGMENTER_ROWS or row in ("L_S", "+ L_C"):
            if row in SEGMENTER_ROWS:
                model, kind = self._segmenter(SEGMENTER_ROWS[row], seed), "segmentation"
            elif row == "L_S":
                model, kind = self._vgg16_unet("segmentation", seed), "segmentation"
            else:
                model, kind = self._vgg16_unet("multitask", seed), "multitask"
            loss, weights = {keys.SEG_PROBS: focal()}, None
            if kind == "multitask":  # "+ L_C": fixed pseudo grades, equal task weights
                loss[keys.GRADE_PROBS] = focal()
                weights = {keys.SEG_PROBS: 1.0, keys.GRADE_PROBS: EQUAL_WEIGHTS}
            with self.ctx.strategy.scope():
                model.compile(
                    optimizer=build_optimizer(self.config.optimizers["model"]),
                    loss=loss,
                    loss_weights=weights,
                    run_eagerly=eager,
                )
            trained = model
        elif row in ("+ Upd-Net", "Ours"):
            network = self._vgg16_unet("multitask", seed)
            label_net = self._label_net(seed)
            kind = "bilevel"
            with self.ctx.strategy.scope():
                model = BilevelMultiTaskTrainer(network, label_net)
                model.compile(
                    model_optimizer=build_optimizer(self.config.optimizers["model"]),
                    label_optimizer=build_optimizer(self.config.optimizers["label"]),
                    seg_loss=self._focal(),
                    grade_loss=self._focal(),
                    beta=beta if row == "Ours" else EQUAL_WEIGHTS,
                    virtual_lr=self.method.virtual_lr or None,
                    meta_grade_weight=self.method.meta_grade_weight,
                    run_eagerly=eager,
                )
            trained = network
        else:
            raise ValueError(f"unknown table row {row!r}")
        mode = self._scaling(self._row_network(row))  # each network its own input scaling
        data, count = self._train_data(sources, labels, kind, seed, mode, stream)
        self._fit(model, data, stage, count)
        return trained

    # -------------------------------------------------------------------------- stage 1

    def _pixel_chunks(self, sources: Sequence[SegSource], mode: str, data=None):
        """``(ids, images, masks, mask_present)`` of every source, images scaled by ``mode``,
        ``method.stage1_chunk`` at a time (chunks span sources: each chunk costs fixed work in
        stage 1). ``data``: the declared :meth:`_seg_eval_stream` of ``sources`` at batch
        ``method.stage1_chunk``, not cached (built here when not given)."""
        chunk = self.method.stage1_chunk
        if data is None:
            data = self._seg_eval_stream(sources, mode=mode, batch_size=chunk, cache=False)
        ids = [i for source in sources for i in source.ids]
        where = [(str(s.records_dir), s.split) for s in sources]
        buffer, offset = [], 0
        for image, targets in data:
            count = int(image.shape[0])
            if offset + count > len(ids):
                raise RuntimeError(
                    f"{where}: the pipelines yielded more images than the {len(ids)} ids; ids "
                    "and images would not line up"
                )
            buffer.append(
                (
                    ids[offset : offset + count],
                    image.numpy(),
                    targets[keys.MASKS].numpy(),
                    targets[keys.MASK_PRESENT].numpy(),
                )
            )
            offset += count
            while sum(len(part[0]) for part in buffer) >= chunk:
                yield self._merge(buffer, chunk)
        if offset != len(ids):
            raise RuntimeError(
                f"{where}: the pipelines yielded {offset} images for {len(ids)} ids; ids and "
                "images would not line up"
            )
        if buffer:
            yield self._merge(buffer, sum(len(part[0]) for part in buffer))

    @staticmethod
    def _merge(buffer: list, count: int):
        """The first ``count`` images of ``buffer`` as one chunk; the rest stays buffered."""
        merged = [list(part) for part in zip(*buffer)]
        ids = [i for part in merged[0] for i in part]
        arrays = [np.concatenate(part) for part in merged[1:]]
        buffer.clear()
        if len(ids) > count:
            buffer.append((ids[count:],) + tuple(a[count:] for a in arrays))
        return (ids[:count],) + tuple(a[:count] for a in arrays)

    def _stage1_mode(self) -> str:
        """The input scaling both stage-1 graders share (they see the same image batch)."""
        modes = {self._scaling(arch) for arch in PSEUDO_GRADERS.values()}
        if len(modes) != 1:
            raise ValueError(
                f"the stage-1 graders {list(PSEUDO_GRADERS.values())} expect different input "
                f"scalings {sorted(modes)}; they must share one"
            )
        return modes.pop()

    def stage1(
        self, dataset: str, sources, graders, truth, figure: bool, data=None
    ) -> _PseudoLabels:
        """Pseudo grades for every pixel-level image (all splits): predict, select, refine.
        ``data``: the declared stream of :meth:`_pixel_chunks` (built there when not given)."""
        labels = _PseudoLabels()
        changed = 0
        shown = []  # the Fig. 6 candidates: dicts with the most lesion kinds first
        models = [graders[row] for row in PSEUDO_GRADERS]
        mode = self._stage1_mode()
        previous = tf.config.functions_run_eagerly()
        tf.config.run_functions_eagerly(self.method.run_eagerly)
        try:
            for ids, images, masks, present in self._pixel_chunks(sources, mode, data):
                result = generate_pseudo_grades(
                    models,
                    images,
                    masks,
                    present,
                    batch_size=self.method.stage1_batch,
                    min_pixels=self.method.min_lesion_pixels,
                    severe_min_kinds=self.method.severe_min_kinds,
                    cam_threshold=self.method.cam_threshold,
                    min_overlap=self.method.min_overlap,
                )
                labels.add(ids, result)
                changed += int(np.sum(~result["accepted"]))
                if figure:
                    kinds = lesion_presence(masks).sum(axis=1)
                    for k, example_id in enumerate(ids):
                        entry = {name: value[k] for name, value in result.items()}
                        entry.update(
                            id=example_id, kinds=int(kinds[k]), image=images[k], masks=masks[k]
                        )
                        shown.append(entry)
                    shown.sort(key=lambda entry: -entry["kinds"])
                    del shown[self.method.fig6_images :]
        finally:
            tf.config.run_functions_eagerly(previous)
        total = len(labels.grade)
        table = self.tables.by_name["stage1_pseudo_grades"]
        row = _DATASETS[dataset]["pixel_name"]
        table.add(row, STAGE1_COLUMNS[0], total)
        table.add(row, STAGE1_COLUMNS[1], changed)
        message = f"stage 1 ({dataset}): {total} pseudo grades, {changed} changed by refinement"
        if truth:
            known = [i for i in labels.grade if i in truth]
            before = float(np.mean([labels.initial[i] == truth[i] for i in known]))
            after = float(np.mean([labels.grade[i] == truth[i] for i in known]))
            table.add(row, STAGE1_COLUMNS[2], 100.0 * before)
            table.add(row, STAGE1_COLUMNS[3], 100.0 * after)
            message += (
                f"; accuracy against the true grades {100 * before:.1f}% before, "
                f"{100 * after:.1f}% after refinement"
            )
        log.info(message)
        if figure and shown:
            self._fig6(shown, truth, mode)
        return labels

    def _fig6(self, shown: Sequence[dict], truth, mode: str) -> None:
        notes, titles = [], []
        for entry in shown:
            notes.append(
                [
                    f"overlap {entry['overlap'][grade]:.2f}"
                    + (", allowed" if entry["allowed"][grade] else "")
                    for grade in range(len(entry["allowed"]))
                ]
            )
            title = (
                f"{entry['id'].rsplit('-', 1)[-1]}: predicted {int(entry['initial_grades'])}, "
                f"pseudo {int(entry['grades'])}"
            )
            if truth and entry["id"] in truth:
                title += f", true {truth[entry['id']]}"
            titles.append(title)
        images = np.stack([self._display(entry["image"], mode) for entry in shown])
        plot_class_cams(
            images,
            fuse_lesion_masks(np.stack([entry["masks"] for entry in shown])).numpy(),
            np.stack([entry["cams"] for entry in shown]),
            self.ctx.out_dir / "fig6_cams.png",
            label_names=FUSED_CLASSES,
            notes=notes,
            row_titles=titles,
        )

    def _display(self, image, mode: str) -> np.ndarray:
        """A network input scaled by ``mode`` back as uint8 RGB for figures."""
        shown = preprocess.denormalize(image, mode).numpy()
        return np.clip(shown, 0, 255).astype(np.uint8)

    # -------------------------------------------------------------------------- outputs

    def _export(self, network: keras.Model) -> pathlib.Path:
        """``export/pldmlt``: the multi-task network's serving signatures, reload-checked. The
        served input is the evaluation transform of ``_seg_eval_data`` / ``_grading_data``
        (the pipelines' uint8 rounding included: :func:`drkeras.export.pipeline_preprocess`)
        with the network's own input scaling."""
        mode = self._scaling(self._row_network("Ours"))
        path = export_model(
            network,
            self.ctx.export_dir / "pldmlt",
            image_size=self.size,
            preprocess=pipeline_preprocess(**self._preprocess(mode)),
            output_names=[keys.GRADE_PROBS, keys.SEG_PROBS],
            channels={keys.SEG_PROBS: mtunet.CLASS_SETS[FUSED_CLASS_SET]},
        )
        log.info("exported the PLDMLT multi-task network to %s", path)
        return path

    def _export_and_overlays(self, network: keras.Model, test_sources, data=None) -> None:
        """Export the network, then draw ``method.overlays`` test images (``data``: the
        declared :meth:`_seg_eval_stream` of ``test_sources``; built here when not given)."""
        mode = self._scaling(self._row_network("Ours"))
        self._export(network)
        if not test_sources or self.method.overlays <= 0:
            return
        if data is None:
            data = self._seg_eval_stream(test_sources, mode=mode)
        ids = [i for source in test_sources for i in source.ids]
        drawn = offset = 0
        for image, targets in data:
            probs = self._outputs(network, image)[keys.SEG_PROBS]
            target = fuse_lesion_masks(
                targets[keys.MASKS], closing_size=self.method.closing_size, one_hot=True
            ).numpy()
            present = mtunet.classes_annotated(targets[keys.MASK_PRESENT], FUSED_CLASS_SET)
            pred = np.eye(NUM_FUSED_CLASSES, dtype=bool)[probs.argmax(axis=-1)]
            for k in range(len(probs)):
                if drawn >= self.method.overlays:
                    return
                example_id = ids[offset + k]
                plot_mask_overlay(
                    self._display(image[k], mode),
                    pred[k, ..., 1:],
                    target[k, ..., 1:],
                    self.ctx.out_dir / f"overlay_{example_id.rsplit('-', 1)[-1]}.png",
                    names=FUSED_CLASSES[1:],
                    present=present.numpy()[k, 1:],
                    title=f"{example_id}: PLDMLT (ours) vs ground truth",
                )
                drawn += 1
            offset += len(probs)

    # -------------------------------------------------------------------------- the run

    def stages(self) -> List[Stage]:
        """Every stage of the run, in order, declared before any of them runs (nothing is built
        or trained here: the records' labels are read for the counts).

        Per run (``train.runs``, seed ``seed + run``) and dataset (``method.datasets``):
        ``<tag>_resnext101`` and ``<tag>_resnext50`` (the stage-1 graders: trained and tested,
        their trained networks handed to stage 1), ``<tag>_stage1`` (pseudo grades and Fig. 6;
        evaluates, trains nothing), ``<tag>_<method.nasnet>`` and ``<tag>_densenet201``, then
        per fold every pixel-level row, ``<tag>[_fold<k>]_<row>`` (Tables 1-3), each consuming
        stage 1's pseudo grades. ``<tag>`` is the dataset, ``<dataset>_run<r>`` with several
        runs. Stages that differ only by dataset, run or fold share the group ``<stage>`` (the
        same networks, input size and code on other records: a dry run trains IDRiD's and
        builds DDR's data); so do Ours and "+ Upd-Net", which differ by the value of beta.
        """
        train_cfg = self.config.train
        sources_of, pixel_sets = {}, {}
        for dataset in self.method.datasets:
            sources_of[dataset], pixel_sets[dataset] = self._pixel_sources(dataset)
        self.tables = _Tables(self.config, pixel_sets)
        declared: List[Stage] = []
        for repeat in range(train_cfg.runs):
            for dataset in self.method.datasets:
                declared += self._dataset_stages(
                    dataset,
                    sources_of[dataset],
                    seed=self.config.seed + repeat,
                    tag=f"{dataset}_run{repeat}" if train_cfg.runs > 1 else dataset,
                    first=repeat == 0,
                )
        return declared

    def report(self) -> List[ResultsTable]:
        """The paper's tables, filled by the stages that evaluated their rows (a stage a dry run
        skipped leaves its cells empty), and the training curves. Fig. 6, the overlays and
        the export were written by the stages that held those networks."""
        if self.tables is None:
            raise RuntimeError("report() before stages(): the runner declares the stages first")
        if self.ctx.history_path.exists():
            plot_history(self.ctx.history_path, self.ctx.out_dir / "training_curves.png")
        return self.tables.all()

    def _dataset_stages(self, dataset: str, sources, *, seed: int, tag: str, first: bool):
        """The stages of one dataset in one run: graders, stage 1, every fold's rows."""
        grading_table = f"table{_DATASETS[dataset]['number']}_grading"
        graders = [
            self._grader_stage(dataset, row, arch, seed=seed, tag=tag, table=grading_table)
            for row, arch in PSEUDO_GRADERS.items()
        ]
        stage1 = self._stage1_stage(dataset, sources, tag=tag, first=first)
        others = [
            self._grader_stage(
                dataset, row, arch, seed=seed, tag=tag, table=grading_table, handed_on=False
            )
            for row, arch in (("NASNet", self.method.nasnet), ("DenseNet-201", "densenet201"))
        ]
        rows = list(SEGMENTER_ROWS) + ["MTUnet", "Ours"]
        if dataset == "idrid":
            rows += ["L_S", "+ L_C", "+ Upd-Net"]
        exports = first and dataset == self.method.datasets[0]
        pixel = [
            self._row_stage(
                dataset,
                row,
                sources,
                fold=fold,
                seed=seed,
                tag=tag,
                stage1=stage1.name,
                export=exports and fold == 0 and row == "Ours",
            )
            for fold in range(max(1, self.config.train.folds))
            for row in rows
        ]
        return graders + [stage1] + others + pixel

    def _grader_stage(
        self, dataset: str, row: str, arch: str, *, seed, tag, table, handed_on=True
    ) -> Stage:
        """Train one grader on the grading set, test it (its row of ``table``); its output
        is the trained network when stage 1 uses it (``handed_on``), else nothing."""
        name = f"{tag}_{arch}"
        records_dir = self.ctx.records(dataset)
        mode = self._scaling(arch)
        train = self._grading_spec(dataset, "train", mode=mode, seed=seed)
        test = self._grading_spec(dataset, "test", mode=mode)

        def run(inputs):
            model = self.train_grader(arch, records_dir, name, seed, data=self.ctx.data(train.key))
            data = self.ctx.data(test.key)
            self.tables.add_accuracy(
                table, row, self._evaluate_grading(model, records_dir, mode, data=data)
            )
            return model if handed_on else None

        return Stage(
            name,
            run=run,
            nets=[self._grader_net(arch)],
            data=[train, test],
            steps=self._steps(train.examples),
            epochs=self._grader_epochs(),
            batch=self.batch,
            group=arch,
        )

    def _stage1_stage(self, dataset: str, sources, *, tag: str, first: bool) -> Stage:
        """Stage 1 (sections 3.1, 4.2): the trained ResNeXts grade every pixel-level image,
        Grad-CAM and the lesion masks refine the grades; its output is the pseudo labels."""
        name = f"{tag}_stage1"
        graders = {row: f"{tag}_{arch}" for row, arch in PSEUDO_GRADERS.items()}
        mode = self._stage1_mode()
        chunk = self.method.stage1_chunk
        count = sum(len(s.ids) for s in sources)
        images = min(chunk, count)
        pixels = Data(
            f"{dataset}_pixels_{mode}_chunk{chunk}",
            build=lambda cache: self._seg_eval_stream(
                sources, mode=mode, batch_size=chunk, cache=cache
            ),
            examples=count,
            size=self.size,
            masks=len(keys.LESIONS),
            batch=chunk,
            cached=False,
            # a chunk of images and masks as float32 arrays, and its merged copy
            held_bytes=2 * images * self.size**2 * (3 + len(keys.LESIONS)) * 4,
        )
        figure = first and dataset == self.method.datasets[0]

        def run(inputs):
            truth = None
            if first and dataset == "idrid" and self.data.source == "synthetic":
                truth = synthetic_idrid_seg_truth(
                    self.ctx.records("idrid"), self.data, self.config.seed
                )
            models = {row: inputs[stage] for row, stage in graders.items()}
            data = self.ctx.data(pixels.key)
            labels = self.stage1(dataset, sources, models, truth, figure, data=data)
            self._fold_grades[tag] = dict(labels.grade)
            return labels

        return Stage(
            name,
            run=run,
            nets=[self._grader_net(arch, trainable=False) for arch in PSEUDO_GRADERS.values()],
            data=[pixels],
            batch=self.method.stage1_batch,
            consumes=tuple(graders.values()),
            group="stage1",
        )

    def _row_stage(
        self, dataset: str, row: str, sources, *, fold, seed, tag, stage1, export
    ) -> Stage:
        """Train one pixel-level row of Tables 1-3 on one fold and evaluate it (segmentation;
        grading for MTUnet and Ours); the first Ours is exported with its overlays."""
        folds = self.config.train.folds
        fold_tag = f"{tag}_fold{fold}" if folds > 1 else tag
        name = f"{fold_tag}_{STAGE_NAMES[row]}"
        spec = _DATASETS[dataset]
        number = spec["number"]
        beta = getattr(self.method, spec["beta"])
        records_dir = self.ctx.records(dataset)
        mode = self._scaling(self._row_network(row))
        # the fold's sizes do not depend on the pseudo grades that stratify it
        counted = self._fold_sources(dataset, sources, fold, seed, None)
        train_count, test_count = (sum(len(s.ids) for s in part) for part in counted)
        # The official split is the same in every run; k-fold splits depend on run and labels.
        where = dataset if folds <= 1 else f"{dataset}_fold{fold}"
        test_key = f"{where}_test_{mode}" + ("" if folds <= 1 else f"_seed{seed}")

        def fold_sources():
            return self._fold_sources(dataset, sources, fold, seed, self._split_grades(tag))

        train = Data(
            f"{where}_train_{mode}_seed{seed}",
            build=lambda cache: self._train_images(fold_sources()[0], seed, mode, cache),
            examples=train_count,
            size=self.size,
            masks=len(keys.LESIONS),
            shuffle_buffer=max(train_count, 1),
            batch=self.batch,
            train=True,
            held_bytes=train_count * self.size**2 * _FLOAT_IMAGE_EXTRA_BYTES,
        )
        test = Data(
            test_key,
            build=lambda cache: self._seg_eval_stream(fold_sources()[1], mode=mode, cache=cache),
            examples=test_count,
            size=self.size,
            masks=len(keys.LESIONS),
            batch=self.batch,
        )
        graded = row in ("MTUnet", "Ours")
        grading = self._grading_spec(dataset, "test", mode=mode)

        def run(inputs):
            labels = inputs[stage1]
            train_sources, test_sources = self._fold_sources(
                dataset, sources, fold, seed, labels.grade
            )
            stream = self.ctx.data(train.key)
            network = self.train_pixel_model(
                row, train_sources, labels, name, seed, beta, stream=stream
            )
            test_data = self.ctx.data(test.key)
            scores = self._evaluate_segmentation(network, test_sources, mode, data=test_data)
            if row in PAPER_SEGMENTATION[dataset]:
                self.tables.add_segmentation(f"table{number}_segmentation", row, scores)
            if row in PAPER_ABLATION:
                self.tables.add_segmentation("table3_ablation", row, scores)
            if row == "Ours" and dataset == "idrid":
                self.tables.add_segmentation("table3_ablation", "+ Weight", scores)
            if graded:
                data = self.ctx.data(grading.key)
                accuracy = self._evaluate_grading(network, records_dir, mode, data=data)
                self.tables.add_accuracy(f"table{number}_grading", row, accuracy)
            if export and self.ctx.is_chief:
                self._export_and_overlays(network, test_sources, data=test_data)

        return Stage(
            name,
            run=run,
            nets=self._row_nets(row),
            data=[train, test] + ([grading] if graded else []),
            steps=self._steps(train_count),
            epochs=self.config.train.epochs,
            batch=self.batch,
            consumes=(stage1,),
            group=STAGE_NAMES[_DRY_RUN_SHARES.get(row, row)],
        )

    def _fold_sources(self, dataset: str, sources, fold: int, seed: int, grades):
        """Training and test sources of one fold (:func:`split_sources`), never empty."""
        train, test = split_sources(
            sources, folds=self.config.train.folds, fold=fold, seed=seed, grades=grades
        )
        if not train or not test:
            raise ValueError(
                f"{dataset}: no training or no test images with lesion masks for fold {fold} "
                f"(train {[(s.split, len(s.ids)) for s in train]}, test "
                f"{[(s.split, len(s.ids)) for s in test]})"
            )
        return train, test

    def _split_grades(self, tag: str) -> Optional[Dict[str, int]]:
        """The pseudo grades stratifying the k-fold split of run ``tag`` (None: official
        split). Only a dry run can ask before its stage 1 ran (a skipped run): its folds are
        then built unstratified, for their data only (nothing of them trains or reports)."""
        if self.config.train.folds <= 1:
            return None
        grades = self._fold_grades.get(tag)
        if grades is None:
            if not getattr(self.ctx, "dry_run", 0):
                raise RuntimeError(
                    f"stage {tag}_stage1 has not run: the folds of {tag} are stratified by its "
                    "pseudo grades"
                )
            log.info(
                "dry run: stage %s_stage1 was skipped, so the folds of %s are built "
                "unstratified (their data only)",
                tag,
                tag,
            )
        return grades

    def _grading_spec(self, dataset: str, split: str, *, mode: str, seed: int = 0) -> Data:
        """The declared grading split ``split`` of ``dataset`` scaled by ``mode`` (training:
        augmented, shuffled, repeating, per seed)."""
        records_dir = self.ctx.records(dataset)
        training = split == "train"
        seed = seed if training else 0
        return Data(
            f"{dataset}_grading_{split}_{mode}" + (f"_seed{seed}" if training else ""),
            build=lambda cache: self._grading_data(
                records_dir, split, training=training, mode=mode, seed=seed, cache=cache
            ),
            examples=self._grading_count(records_dir, split),
            size=self.size,
            shuffle_buffer=_PIPELINE_SHUFFLE_BUFFER if training else 0,
            batch=self.batch,
            train=training,
        )

    def _grader_net(self, arch: str, *, trainable: bool = True) -> Net:
        optimizer = self.config.optimizers["model"].name if trainable else "none"
        return Net(arch, lambda: self._build_grader(arch), trainable, optimizer)

    def _row_nets(self, row: str) -> List[Net]:
        """The networks a pixel-level row trains (the bilevel rows: network + label net)."""
        optimizer = self.config.optimizers["model"].name
        if row in SEGMENTER_ROWS:
            name = SEGMENTER_ROWS[row]
            backbone = getattr(self.method, _SEGMENTER_BACKBONE[name])
            return [Net(f"{name}_{backbone}", lambda: self._build_segmenter(name), True, optimizer)]
        role = {"MTUnet": "mtunet", "L_S": "segmentation"}.get(row, "multitask")
        nets = [Net(f"vgg16_unet_{role}", lambda: self._build_vgg16_unet(role), True, optimizer)]
        if row in ("+ Upd-Net", "Ours"):
            label = self.config.optimizers["label"].name
            nets.append(Net("label_update_net", self._build_label_net, True, label))
        return nets


class PLDMLT(Experiment):
    """The PLDMLT experiment: Tables 1-3 and Fig. 6 (see the module docstring).

    Example::

        from experiments.pldmlt import PLDMLT, main
        main(PLDMLT(), ["--preset", "smoke", "--set", "method.datasets=idrid", "--out", "runs/x"])
    """

    name = "pldmlt"
    title = "PLDMLT: pixel-level labelled images for multi-task DR grading and segmentation"
    presets = {"smoke": SMOKE, "mini": MINI, "paper": PAPER}

    def pretrained_weights(self, config: Config) -> list:
        """The ImageNet files of ``config`` (``model.encoder_weights``): the stage-1 ResNeXts,
        the NASNet and DenseNet-201 graders, the four segmenters' encoders and the VGG16-UNets
        (Ours, the ablation rows, MTUnet); see :mod:`drkeras.weights`."""
        from drkeras import weights

        w, m = config.model.encoder_weights, config.method
        graders = [*PSEUDO_GRADERS.values(), m.nasnet, "densenet201"]
        return weights.collect(
            *(weights.grader(arch, w) for arch in graders),
            *(
                weights.segmenter(name, getattr(m, _SEGMENTER_BACKBONE[name]), w,
                                  width=config.model.width)
                for name in SEGMENTER_ROWS.values()
            ),
            weights.vgg16_encoder(w, network="VGG16-UNet (Ours, ablations, MTUnet)"),
        )  # fmt: skip

    def prepare(self, ctx: RunContext) -> "_Run":
        return _Run(ctx)


if __name__ == "__main__":
    raise SystemExit(main(PLDMLT()))
