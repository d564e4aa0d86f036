"""Collaborative semi-supervised lesion segmentation and DR grading (Zhou et al., CVPR 2019).

Reproduces Zhou, He, Huang, Liu, Zhu, Cui, Shao, "Collaborative Learning of Semi-Supervised
Segmentation and Classification for Medical Images": Tables 1-3, Fig. 4 and Fig. 5.

Command::

    python experiments/collaborative.py                       # --data synthetic --preset smoke
    python experiments/collaborative.py --data RECORDS --preset paper
    # RECORDS/{idrid,eyepacs,messidor} as written by python -m data_prep

Expected runtime: smoke, about 3-4 minutes on 2 CPU cores (measured 191 s wall, 163 s of CPU,
on a machine shared with other jobs: synthetic IDRiD, EyePACS and Messidor layouts generated and
converted, ten training stages at 64 px and eighth width, 32 / 24 / 16 steps per stage, run
eagerly, two exports); paper, GPU days (640 x 640 inputs, 60 + 30 pre-training epochs and 50
fine-tuning epochs per image-level dataset; not run here).

Mini preset (``--preset mini``): the paper preset scaled to learn the synthetic benchmark on a
CPU; every key it changes, with its kind and why, is in ``MINI_CHANGES`` (128 px, quarter width,
the published IDRiD segmentation counts, 150 generator / 80 grader pre-training steps and 50
steps per stage-2 row, batch norm momentum 0.9, Adam 1e-3). Not yet measured end to end (from
per-step timings, about 15 minutes on 2 quiet CPU cores).

Expected result: smoke, every row of Tables 1-3 filled beside the paper's numbers,
``fig4_comparison.png``, ``fig5_roc_pr.png``, ``training_curves.png``, and
``export/collaborative_generator`` and ``export/collaborative_grader`` (reload-checked). Smoke
numbers come from a few steps on synthetic images and show the pipeline, not the paper's
effects: grading at chance (accuracy 0.1-0.3 on 10-20 test images, kappa near 0), Messidor AUCs
0.3-0.9, lesion AUC-ROC 0.06-0.74 (far from converged; some below 0.5), AUC-PR below 0.03
(lesions are a few pixels at 64 px). The paper preset on the real data should approach the
paper (Table 1, Semi+Adv: IDRiD accuracy 0.913 / kappa 0.905).

What runs (section 3.4, section 4.2):

1. Stage 1, generator: the Xception U-Net ``G`` (``CE2``) and its plain-convolution variant
   (``CE1``) learn the lesion masks (MA, HE, EX, SE) of IDRiD's segmentation training images
   with ``L_CE`` (:class:`drkeras.training.adversarial.GeneratorPretrainer`; batch
   ``method.pretrain_seg_batch``, ``method.pretrain_seg_epochs`` epochs). Table 3 rows CE1 and
   CE2.
2. For each image-level dataset (IDRiD's grading set; EyePACS, with the generator pre-trained on
   IDRiD as the paper says: "we adopt the fully-supervised model pre-trained on the IDRID
   dataset"):

   a. "Ori": the base grading CNN alone, focal loss (stage 1 of the grader).
   b. "Lesion(Pretrained)": ``G`` frozen; its masks weight the grader's low-level features
      directly (no attention model), grader fine-tuned from (a).
   c. "Lesion(Semi)": stage 2 without the discriminator: ``G`` fine-tuned with
      ``lambda L_CE`` on the ground truth of IDRiD's pixel-level images and on the attention
      maps (pseudo masks) of the image-level images, the lesion attentive grader with
      ``L_Cls``; from (1) and (a).
   d. "Lesion(Semi+Adv)": stage 2 with the discriminator: ``L_Seg = L_Adv + lambda L_CE``, each
      expectation of ``L_Adv`` a mean over its own kind of image (weight 1 whatever the mix).

   Each batch mixes pixel-level and image-level images (``method.pixel_fraction``; the paper
   does not give the mix). Table 1: accuracy and quadratic weighted kappa on the dataset's test
   set: IDRiD's grading test split, EyePACS' Public and Private test images together
   (``method.eyepacs_test_split=val+test``, the paper's 53,576). Table 2: the EyePACS models on
   Messidor (every image), referable (grade >= 2) and normal (grade 0) AUC and accuracy
   (:func:`drkeras.metrics.screening_scores`). Table 3: the generators of (c) and (d) trained
   with IDRiD's grading set: CE2+Semi, CE2+Semi+Adv.

Segmentation metrics (Table 3, Fig. 5): pixel-level ROC and PR curves pooled over IDRiD's
segmentation test images per lesion (:class:`drkeras.metrics.PerLesionCurves`), at the model's
input resolution, AUC-PR as average precision. Fig. 4: pre-trained (CE2) vs semi-supervised
(CE2+Semi+Adv) masks vs ground truth on IDRiD test images (TP green, FN red, FP blue).

Input (section 4.1): field-of-view crop and resize, then the local-average colour subtraction of
van Grinsven et al. 2016 ("based on [43]"; ``data.graham``) in training, evaluation and the
exports; training augmentation by flips and rotations only (:data:`COLLABORATIVE_AUGMENT`).

Fidelity table (every equation, stage, setting and table row against the code):
``docs/papers/collaborative.md``. Reading choices where the paper is silent are documented on
:class:`Method`, :mod:`drkeras.models.collaborative` (grading backbone) and
:class:`drkeras.training.adversarial.CollaborativeTrainer` (adversarial term).
"""

import dataclasses
import logging
import math
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses, metrics
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
from drkeras.data import pipeline, preprocess
from drkeras.experiment import Experiment, RunContext, main, run_config_summary
from drkeras.export import export_model, pipeline_preprocess
from drkeras.models import collaborative as nets
from drkeras.plots import (
    error_overlay,
    new_figure,
    plot_history,
    plot_roc_pr_comparison,
    save_figure,
)
from drkeras.results import ResultsTable
from drkeras.stages import Data, Net, Stage
from drkeras.training.adversarial import CollaborativeTrainer, GeneratorPretrainer
from drkeras.training.optim import build_optimizer

__all__ = [
    "COLLABORATIVE_AUGMENT",
    "PAPER_MESSIDOR",
    "PAPER_SEGMENTATION",
    "PAPER_TABLE1",
    "Collaborative",
    "Method",
]

log = logging.getLogger("drkeras.collaborative")


@dataclasses.dataclass(frozen=True)
class Method:
    """Zhou et al. 2019's hyper-parameters (``--set method.<field>=...``).

    Attributes:
        lesions: lesion types segmented (section 4.1: MA, HE, EX, SE).
        datasets: image-level datasets of Table 1, ``idrid`` and/or ``eyepacs`` (Table 2 needs
            ``eyepacs``, Table 3's semi-supervised rows ``idrid``).
        messidor: evaluate the EyePACS models on Messidor (Table 2).
        lambda_ce: ``lambda`` of Eq. 3 (10, section 3.4).
        focal_alpha, focal_gamma: ``L_Cls``, the focal loss; the paper cites Lin et al. 2017
            without values, we take theirs (0.25, 2).
        generator_widths, discriminator_widths: the five tuple widths (Fig. 2).
        grader_low_channels, grader_widths, fusion_units: the grading model (Fig. 3: 32-channel
            context vector, 1024-d pooled features, 4096 -> 1024 fusion).
        pretrain_seg_epochs, pretrain_seg_batch: stage 1 of the generator (60 epochs, batch 32).
        pretrain_grade_epochs, pretrain_grade_batch: stage 1 of the grader (30 epochs, batch
            128). Stage 2 uses ``train.epochs`` (50) and ``data.batch_size`` (16); so does the
            "Lesion(Pretrained)" grader, fine-tuned like a stage-2 model.
        pixel_fraction: share of pixel-level images in a stage-2 batch (not given by the paper;
            0.5 gives the discriminator as many real as fake examples).
        bn_momentum: momentum of every batch norm's moving statistics, used at evaluation (not
            given by the paper: Keras' 0.99; the smoke preset's few steps need 0.9, otherwise
            the evaluated networks normalise with statistics still near their initial values).
        run_eagerly: train and predict eagerly (faster for a few steps on a CPU, where tracing
            the stage-2 graph costs more than the steps).
        fig4_images: IDRiD segmentation test images shown in Fig. 4.
        eyepacs_test_split: the EyePACS split(s) of Table 1, ``+`` joining splits
            (:func:`drkeras.data.pipeline.split_names`): ``val+test`` is Kaggle's Public and
            Private test images together, the paper's 53,576 (section 4.1).
    """

    lesions: Tuple[str, ...] = nets.LESIONS
    datasets: Tuple[str, ...] = ("idrid", "eyepacs")
    messidor: bool = True
    lambda_ce: float = 10.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    generator_widths: Tuple[int, ...] = nets.GENERATOR_WIDTHS
    discriminator_widths: Tuple[int, ...] = nets.DISCRIMINATOR_WIDTHS
    grader_low_channels: int = nets.GRADER_LOW_CHANNELS
    grader_widths: Tuple[int, ...] = nets.GRADER_WIDTHS
    fusion_units: int = 1024
    pretrain_seg_epochs: int = 60
    pretrain_seg_batch: int = 32
    pretrain_grade_epochs: int = 30
    pretrain_grade_batch: int = 128
    pixel_fraction: float = 0.5
    bn_momentum: float = 0.99
    run_eagerly: bool = False
    fig4_images: int = 2
    eyepacs_test_split: str = "val+test"


# Section 3.4: "The ADAM optimizer is adopted with the learning rate of 0.0002 and momentum of
# 0.5" (beta_1), for every network; fine-tuning batch 16 over 50 epochs. The input size is
# Fig. 2's 640 x 640. No network of the paper is ImageNet-initialised.
# Section 4.1 pre-processes "based on [43]" (van Grinsven et al., IEEE TMI 2016: I_c = 4 (I -
# G(sigma) * I) + 128, a local average colour subtracted), the form of Graham's preprocessing:
# data.graham, after the field-of-view crop and resize. Its blur sigma is Graham's FOV radius / 30,
# half of [43]'s FOV diameter / 30 (no data setting passes another; docs/papers/collaborative.md).
_ADAM = OptimizerConfig(name="adam", learning_rate=2e-4, beta_1=0.5)
PAPER = Config(
    method=Method(),
    data=DataConfig(image_size=640, batch_size=16, augment=True, graham=True),
    model=ModelConfig(encoder_weights=None, width=1.0),
    optimizers={"generator": _ADAM, "discriminator": _ADAM, "grader": _ADAM},
    train=TrainConfig(epochs=50, verbose=2),
)

# Minutes on 2 CPU cores: 64 px, eighth-width networks, a few steps per stage, larger rates.
_SMOKE_ADAM = OptimizerConfig(name="adam", learning_rate=2e-3, beta_1=0.5)
SMOKE = Config(
    method=Method(
        pretrain_seg_epochs=4,
        pretrain_seg_batch=4,
        pretrain_grade_epochs=3,
        pretrain_grade_batch=8,
        bn_momentum=0.9,
        run_eagerly=True,
    ),
    data=DataConfig(image_size=64, batch_size=4, synthetic_size=128, augment=True, graham=True),
    model=ModelConfig(encoder_weights=None, width=0.125),
    optimizers={"generator": _SMOKE_ADAM, "discriminator": _SMOKE_ADAM, "grader": _SMOKE_ADAM},
    train=TrainConfig(epochs=2, steps_per_epoch=8, verbose=2, keep_checkpoints="none"),
)

# Learns the synthetic benchmark on 2 CPU cores: the paper's networks, stages, losses, batches
# and optimizers at 128 px and quarter width, with fewer steps and larger rates.
MINI_CHANGES = {
    "data.image_size": PresetChange("resolution", "128", "640 px -> 128 px"),
    "model.width": PresetChange("width", "0.25", "quarter-width G, D and graders"),
    "data.synthetic_scale": PresetChange(
        "data", "6.75", "the published IDRiD segmentation counts, 54 train / 27 test"
    ),
    "train.steps_per_epoch": PresetChange(
        "steps", "10", "10-step epochs: the same steps for IDRiD and EyePACS"
    ),
    "method.pretrain_seg_epochs": PresetChange("steps", "15", "CE1, CE2: 150 steps of batch 32"),
    "method.pretrain_grade_epochs": PresetChange("steps", "8", "Ori: 80 steps of batch 128"),
    "train.epochs": PresetChange("steps", "5", "Lesion rows (stage 2): 50 steps of batch 16"),
    "method.bn_momentum": PresetChange(
        "rate", "0.9", "0.99 would keep 22-60% of the initial statistics after 150-50 steps"
    ),
    "optimizers.generator.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 2e-4: 200 steps, not thousands"
    ),
    "optimizers.discriminator.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 2e-4, as G"
    ),
    "optimizers.grader.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 2e-4: 130 steps, not thousands"
    ),
}
MINI = derive_preset(PAPER, MINI_CHANGES)

# Section 4.1: "horizontal flips, vertical flips and rotations" and nothing else (Fig. 2: "flip
# and rotation"). The rotation range is not given: a multiple of 90 degrees plus a uniform
# +-45 degrees, i.e. any angle, uniformly (the field of view is a disc; the corners the rotation
# brings in are black, as outside the disc, and Graham's step sets them to mid-grey).
COLLABORATIVE_AUGMENT = dataclasses.replace(
    aug.NO_AUGMENT, flip_horizontal=True, flip_vertical=True, rotate90=True, rotation_deg=45.0
)

# ------------------------------------------------------------------------------ paper numbers

GRADING_ROWS = ("Ori", "Lesion(Pretrained)", "Lesion(Semi)", "Lesion(Semi+Adv)")
SEG_ROWS = ("CE1(Conv)", "CE2(Xception)", "CE2+Semi", "CE2+Semi+Adv")
DATASET_NAMES = {"idrid": "IDRiD", "eyepacs": "EyePACS"}

# Table 1: (accuracy, kappa) per dataset.
PAPER_TABLE1: Dict[str, Dict[str, Tuple[float, float]]] = {
    "idrid": {
        "Ori": (0.8458, 0.7926),
        "Lesion(Pretrained)": (0.8725, 0.8306),
        "Lesion(Semi)": (0.9016, 0.8892),
        "Lesion(Semi+Adv)": (0.9134, 0.9047),
    },
    "eyepacs": {
        "Ori": (0.8541, 0.8351),
        "Lesion(Pretrained)": (0.8598, 0.8445),
        "Lesion(Semi)": (0.8792, 0.8617),
        "Lesion(Semi+Adv)": (0.8912, 0.8720),
    },
}
# Table 2: Messidor (referral AUC, referral accuracy, normal AUC, normal accuracy).
PAPER_MESSIDOR: Dict[str, Tuple[float, float, float, float]] = {
    "Ori": (0.934, 0.902, 0.889, 0.878),
    "Lesion(Pretrained)": (0.953, 0.909, 0.919, 0.901),
    "Lesion(Semi)": (0.971, 0.930, 0.937, 0.918),
    "Lesion(Semi+Adv)": (0.976, 0.939, 0.943, 0.922),
}
MESSIDOR_COLUMNS = ("Referral AUC", "Referral Acc.", "Normal AUC", "Normal Acc.")
# Table 3: per lesion (AUC ROC, AUC PR), lesions in the order MA, HE, EX, SE.
PAPER_SEGMENTATION: Dict[str, Tuple[Tuple[float, float], ...]] = {
    "CE1(Conv)": ((0.9503, 0.4625), (0.9438, 0.6456), (0.9615, 0.8263), (0.9443, 0.6817)),
    "CE2(Xception)": ((0.9653, 0.4733), (0.9540, 0.6579), (0.9675, 0.8455), (0.9537, 0.7161)),
    "CE2+Semi": ((0.9776, 0.4886), (0.9699, 0.6812), (0.9886, 0.8757), (0.9713, 0.7337)),
    "CE2+Semi+Adv": ((0.9828, 0.4960), (0.9779, 0.6936), (0.9935, 0.8872), (0.9936, 0.7407)),
}
PAPER_LESION_ORDER = ("MA", "HE", "EX", "SE")
STAGES = {
    "Ori": "ori",
    "Lesion(Pretrained)": "lesion_pretrained",
    "Lesion(Semi)": "semi",
    "Lesion(Semi+Adv)": "semi_adv",
}


def _seg_columns(lesion: str) -> Tuple[str, str]:
    name = keys.LESION_NAMES.get(lesion, lesion)
    return f"{name} AUC ROC", f"{name} AUC PR"


# The paper's directional claims (drkeras.claims; section 4.2). Table 1 and Table 3 are
# ablations: each row adds a component to the row before it.
TABLE1_COLUMNS = tuple(f"{name} {metric}" for name in DATASET_NAMES.values()
                       for metric in ("Acc.", "Kappa"))  # fmt: skip
TABLE3_COLUMNS = tuple(c for lesion in PAPER_LESION_ORDER for c in _seg_columns(lesion))
_GRADING_STEPS = (
    "lesion masks of the pre-trained generator help grading",
    "semi-supervised lesion attention improves grading further",
    "the adversarial loss adds a further gain in grading",
)
_SEGMENTATION_STEPS = (
    "Xception modules (CE2) segment better than plain convolutions (CE1)",
    "semi-supervised training on pseudo masks improves segmentation",
    "the adversarial loss improves segmentation slightly further",
)
CLAIMS = (
    *(
        Claim("Table 1, section 4.2.2", text, "table1", column, better, (worse,))
        for text, better, worse in zip(_GRADING_STEPS, GRADING_ROWS[1:], GRADING_ROWS[:-1])
        for column in TABLE1_COLUMNS
    ),
    *(
        Claim("Table 2, section 4.2.2", "on Messidor the full model (Semi+Adv) scores highest "
              "of all rows", "table2", column, GRADING_ROWS[-1], GRADING_ROWS[:-1])
        for column in MESSIDOR_COLUMNS
    ),
    *(
        Claim("Table 2, section 4.2.2", "on Messidor even the pre-trained lesion masks gain "
              "over the holistic grader", "table2", column, GRADING_ROWS[1], GRADING_ROWS[:1])
        for column in MESSIDOR_COLUMNS
    ),
    *(
        Claim("Table 3, section 4.2.3", text, "table3", column, better, (worse,))
        for text, better, worse in zip(_SEGMENTATION_STEPS, SEG_ROWS[1:], SEG_ROWS[:-1])
        for column in TABLE3_COLUMNS
    ),
)  # fmt: skip


def _tables(config: Config) -> Dict[str, ResultsTable]:
    method = config.method
    summary = run_config_summary(config)
    columns1 = [
        f"{DATASET_NAMES[d]} {metric}" for d in method.datasets for metric in ("Acc.", "Kappa")
    ]
    paper1 = {
        row: {f"{DATASET_NAMES[d]} Acc.": PAPER_TABLE1[d][row][0] for d in method.datasets}
        | {f"{DATASET_NAMES[d]} Kappa": PAPER_TABLE1[d][row][1] for d in method.datasets}
        for row in GRADING_ROWS
    }
    tables = {
        "table1": ResultsTable(
            "table1",
            "Table 1: lesion attentive grading, accuracy and quadratic weighted kappa on each "
            f"dataset's test set (IDRiD test, EyePACS {method.eyepacs_test_split}; generator "
            "pre-trained on IDRiD's pixel-level images); " + summary,
            columns1,
            paper=paper1,
            digits=4,
        )
    }
    if method.messidor and "eyepacs" in method.datasets:
        tables["table2"] = ResultsTable(
            "table2",
            "Table 2: Messidor (every image), models trained on EyePACS; referable = grade >= 2, "
            "normal = grade 0, AUC of the summed grade probabilities, accuracy at 0.5; " + summary,
            MESSIDOR_COLUMNS,
            paper={r: dict(zip(MESSIDOR_COLUMNS, v)) for r, v in PAPER_MESSIDOR.items()},
            digits=3,
        )
    paper3 = {}
    columns3 = [c for lesion in method.lesions for c in _seg_columns(lesion)]
    for row, values in PAPER_SEGMENTATION.items():
        paper3[row] = {}
        for lesion, (roc, pr) in zip(PAPER_LESION_ORDER, values):
            if lesion in method.lesions:
                roc_col, pr_col = _seg_columns(lesion)
                paper3[row][roc_col], paper3[row][pr_col] = roc, pr
    rows3 = SEG_ROWS if "idrid" in method.datasets else SEG_ROWS[:2]
    tables["table3"] = ResultsTable(
        "table3",
        "Table 3: lesion segmentation on IDRiD's segmentation test set, pixel AUC-ROC and "
        "AUC-PR (average precision) pooled over the images at the model resolution; CE1 plain "
        "convolutions, CE2 Xception modules, Semi/Adv: stage 2 with IDRiD's grading images; "
        + summary,
        columns3,
        paper={row: paper3[row] for row in rows3},
        digits=4,
    )
    return tables


# ------------------------------------------------------------------------------ the run

# Examples each training stream's shuffle buffer holds (the pipelines' default; the mixed stream
# shuffles its pixel-level and its image-level stream, each with a buffer of this size).
SHUFFLE_BUFFER = 256


class _Run:
    """One execution of :class:`Collaborative`: its declared stages and its report.

    :meth:`stages` declares, before anything is built, every stage of the run (the networks it
    trains or evaluates, the datasets it reads through ``ctx.data``, its steps, epochs and batch,
    the earlier outputs it consumes); :meth:`report` fills what is left after them (Table 3,
    Fig. 4, Fig. 5, the export and the training curves). In order:

    - ``pretrain_ce1``, ``pretrain_ce2``: the generators of stage 1, each evaluated on IDRiD's
      segmentation test set (Table 3 rows CE1, CE2); ``pretrain_ce2`` returns ``G``'s weights.
    - per image-level dataset ``D`` of ``method.datasets``: ``D_ori`` (returns the base
      grader's weights), ``D_lesion_pretrained``, ``D_semi``, ``D_semi_adv``, each consuming
      ``pretrain_ce2`` and ``D_ori`` (not the first), each grading ``D``'s test set (and
      Messidor for EyePACS) for its Table 1 (and Table 2) row; IDRiD's semi-supervised stages
      also evaluate their generator (Table 3 rows CE2+Semi, CE2+Semi+Adv).

    What outlives a stage for the report is small: the per-lesion pixel curves (fixed-size
    histograms), the ``method.fig4_images`` Fig. 4 images with their masks and predictions, and
    the weights of the exported Semi+Adv model (IDRiD's, or the first dataset's without IDRiD).
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config
        self.method: Method = ctx.config.method
        self.data = ctx.config.data
        self.size = int(self.data.image_size)
        self.shape = (self.size, self.size, 3)
        self.lesions = tuple(self.method.lesions)
        self.width = float(self.config.model.width)
        self._check()
        self.tables = _tables(self.config)
        # The Semi+Adv model exported (and shown in Fig. 4): IDRiD's, as today's paper figure.
        self.final_dataset = "idrid" if "idrid" in self.method.datasets else self.method.datasets[0]
        self._counts: Dict[tuple, int] = {}
        # For the report: Table 3's curves per row, Fig. 4's images and predictions, and the
        # weights (generator, attentive grader) of the exported model.
        self._curves: Dict[str, metrics.PerLesionCurves] = {}
        self._fig4: Dict[str, np.ndarray] = {}
        self._final: Optional[Tuple[list, list]] = None

    def _check(self) -> None:
        method = self.method
        unknown = [d for d in method.datasets if d not in DATASET_NAMES]
        if unknown or not method.datasets:
            raise ValueError(f"method.datasets={method.datasets}: choose among idrid, eyepacs")
        bad = [lesion for lesion in method.lesions if lesion not in keys.LESIONS]
        if bad or not method.lesions:
            raise ValueError(f"method.lesions={method.lesions}: choose among {keys.LESIONS}")
        if self.config.model.encoder_weights is not None:
            raise ValueError(
                f"model.encoder_weights={self.config.model.encoder_weights!r}: the networks of "
                "Zhou et al. 2019 have no pretrained weights; set model.encoder_weights=none"
            )
        for name in ("generator", "discriminator", "grader"):
            if name not in self.config.optimizers:
                raise ValueError(f"optimizers.{name} is missing (one optimizer per network)")

    # -------------------------------------------------------------------------- helpers

    def _preprocess(self) -> dict:
        return {
            "fov_crop": self.data.fov_crop,
            "graham": self.data.graham,
            "normalization": self.data.normalization,
        }

    def _optimizer(self, name: str):
        return build_optimizer(self.config.optimizers[name])

    def _slots(self, name: str) -> str:
        """The optimizer kind of network ``name`` for the plan (its slots per weight)."""
        kind = self.config.optimizers[name].name
        return kind if kind in ("adam", "sgd", "rmsprop") else "adam"

    def _steps(self, count: int, batch: int) -> int:
        steps = self.config.train.steps_per_epoch
        return int(steps) if steps else max(1, math.ceil(count / batch))

    def _count(self, dataset: str, split: str, *, pixel: bool, required: bool = True) -> int:
        """Examples of ``split`` (``+``-joined splits summed) with masks of ``self.lesions``
        (``pixel``) or with a grade the models know, read from the records' labels; each split
        capped at ``data.max_examples`` as the pipelines cap it. ``required``: none is an error
        naming the records and the split."""
        key = (dataset, split, pixel)
        if key not in self._counts:
            records_dir = self.ctx.records(dataset)
            total = 0
            for name in pipeline.split_names(split):
                labels = pipeline.read_labels(records_dir, name)
                if pixel:
                    index = [keys.LESIONS.index(lesion) for lesion in self.lesions]
                    n = int(labels[keys.MASK_PRESENT][:, index].any(axis=1).sum())
                else:
                    grades = labels[keys.GRADE]
                    n = int(((grades >= 0) & (grades < self.config.model.num_grades)).sum())
                if self.data.max_examples:
                    n = min(n, self.data.max_examples)
                total += n
            self._counts[key] = total
        n = self._counts[key]
        if required and n == 0:
            kind = "lesion masks" if pixel else "DR grades"
            raise ValueError(
                f"{self.ctx.records(dataset)} split {split!r} has no image with {kind}"
            )
        return n

    def _outputs(self, model: keras.Model, images) -> Dict[str, np.ndarray]:
        out = (
            model(images, training=False)
            if self.method.run_eagerly
            else model.predict_on_batch(images)
        )
        return {k: np.asarray(v) for k, v in out.items()}

    def _focal(self):
        return losses.CategoricalFocalLoss(
            alpha=self.method.focal_alpha, gamma=self.method.focal_gamma
        )

    # -------------------------------------------------------------------------- data

    def _train_options(self, cache) -> dict:
        """What every training stream shares: augmentation, shuffling, repetition, cache and
        preprocessing."""
        return dict(
            augment=self.data.augment,
            augment_params=COLLABORATIVE_AUGMENT,
            shuffle_buffer=SHUFFLE_BUFFER,
            repeat=True,
            seed=self.config.seed,
            cache=cache,
            max_examples=self.data.max_examples,
            **self._preprocess(),
        )

    def _seg_train(self, batch: int, cache=False) -> tf.data.Dataset:
        return pipeline.segmentation_dataset(
            self.ctx.records("idrid"),
            "train",
            size=self.size,
            batch_size=batch,
            lesions=self.lesions,
            **self._train_options(cache),
        )

    def _seg_test(self, cache=False) -> tf.data.Dataset:
        return pipeline.segmentation_dataset(
            self.ctx.records("idrid"),
            "test",
            size=self.size,
            batch_size=self.data.batch_size,
            lesions=self.lesions,
            shuffle=False,
            cache=cache,
            max_examples=self.data.max_examples,
            **self._preprocess(),
        )

    def _grade_train(self, dataset: str, batch: int, cache=False) -> tf.data.Dataset:
        num_grades = self.config.model.num_grades
        ds = pipeline.grading_dataset(
            self.ctx.records(dataset),
            "train",
            size=self.size,
            batch_size=batch,
            num_classes=num_grades,
            **self._train_options(cache),
        )
        return ds.map(
            lambda image, grade: (image, {keys.GRADE_PROBS: tf.one_hot(grade, num_grades)})
        )

    def test_split(self, dataset: str) -> str:
        """The split(s) a dataset is tested on: EyePACS' Public + Private test images (section
        4.1's 53,576) by default, the ``test`` split of IDRiD's grading set and of Messidor."""
        return self.method.eyepacs_test_split if dataset == "eyepacs" else "test"

    def _grade_test(self, dataset: str, split: str, cache=False) -> tf.data.Dataset:
        """The test images of ``dataset`` in ``split`` order."""
        kwargs = dict(
            size=self.size,
            batch_size=self.data.batch_size,
            num_classes=self.config.model.num_grades,
            shuffle=False,
            max_examples=self.data.max_examples,
            **self._preprocess(),
        )
        return pipeline.evaluation_dataset(
            pipeline.grading_dataset, self.ctx.records(dataset), split, cache=cache, **kwargs
        )

    def _mixed_train(self, dataset: str, cache=False) -> tf.data.Dataset:
        """Pixel-level IDRiD images and the image-level images of ``dataset`` in each batch."""
        idrid = self.ctx.records("idrid")
        options = {}
        if dataset != "idrid":
            # Only the other dataset's images are image-level: drop IDRiD's grading images.
            labels = pipeline.read_labels(idrid, "train")
            index = [keys.LESIONS.index(lesion) for lesion in self.lesions]
            no_masks = ~labels[keys.MASK_PRESENT][:, index].any(axis=1)
            options = {
                "image_level_dir": self.ctx.records(dataset),
                "exclude_ids": [str(i) for i in labels[keys.ID][no_masks]],
            }
        return pipeline.mixed_dataset(
            idrid,
            "train",
            pixel_fraction=self.method.pixel_fraction,
            size=self.size,
            batch_size=self.data.batch_size,
            lesions=self.lesions,
            **self._train_options(cache),
            **options,
        )

    # The datasets as the stages declare them (same key, same sizes in every stage using one).

    def _seg_train_data(self) -> Data:
        batch = self.method.pretrain_seg_batch
        return Data(
            f"idrid_seg_train_b{batch}",
            build=lambda cache: self._seg_train(batch, cache),
            examples=self._count("idrid", "train", pixel=True),
            size=self.size,
            masks=len(self.lesions),
            shuffle_buffer=SHUFFLE_BUFFER,
            batch=batch,
            train=True,
        )

    def _seg_test_data(self) -> Data:
        # Held besides the pipeline: Fig. 4's images (float32), masks and two predictions.
        fig4 = self.method.fig4_images * self.size**2 * 4 * (3 + 3 * len(self.lesions))
        return Data(
            "idrid_seg_test",
            build=lambda cache: self._seg_test(cache),
            examples=self._count("idrid", "test", pixel=True, required=False),
            size=self.size,
            masks=len(self.lesions),
            batch=self.data.batch_size,
            held_bytes=fig4,
        )

    def _grade_train_data(self, dataset: str, batch: int) -> Data:
        return Data(
            f"{dataset}_grade_train_b{batch}",
            build=lambda cache: self._grade_train(dataset, batch, cache),
            examples=self._count(dataset, "train", pixel=False),
            size=self.size,
            shuffle_buffer=SHUFFLE_BUFFER,
            batch=batch,
            train=True,
        )

    def _grade_test_data(self, dataset: str) -> Data:
        split = self.test_split(dataset)
        examples = self._count(dataset, split, pixel=False, required=False)
        return Data(
            f"{dataset}_grade_test",
            build=lambda cache: self._grade_test(dataset, split, cache),
            examples=examples,
            size=self.size,
            batch=self.data.batch_size,
            # Held while a row is scored: its grade probabilities (float32) and grades (int64).
            held_bytes=examples * (4 * self.config.model.num_grades + 8),
        )

    def _mixed_data(self, dataset: str) -> Data:
        # As the steps count them: IDRiD's pixel-level training images, and the image-level
        # ones (IDRiD's graded training images, or those of the other dataset); every cached
        # example carries its mask channels (zero for image-level examples).
        examples = self._count("idrid", "train", pixel=True) + self._count(
            dataset, "train", pixel=False
        )
        return Data(
            f"{dataset}_mixed",
            build=lambda cache: self._mixed_train(dataset, cache),
            examples=examples,
            size=self.size,
            masks=len(self.lesions),
            shuffle_buffer=2 * SHUFFLE_BUFFER,
            batch=self.data.batch_size,
            train=True,
        )

    # -------------------------------------------------------------------------- models

    def _seeded(self, key: str, build: Callable[[], keras.Model]) -> keras.Model:
        """Build a network in the strategy scope from a seed of its own (the run's seed and
        ``key``): every stage builds what it trains, and every row starting from a network of
        the same key starts from the same initialisation."""
        tf.keras.utils.set_random_seed(zlib.crc32(f"{self.config.seed}:{key}".encode()) % 2**31)
        with self.ctx.strategy.scope():
            model = build()
        return model

    def _common(self) -> dict:
        # Synchronised batch norm only when there are several replicas (see conv_tuple).
        return {
            "width": self.width,
            "sync_batchnorm": self.ctx.strategy.num_replicas_in_sync > 1,
            "bn_momentum": self.method.bn_momentum,
        }

    def _build_generator(self, separable: bool) -> keras.Model:
        return nets.build_xception_unet(
            input_shape=self.shape,
            num_lesions=len(self.lesions),
            widths=self.method.generator_widths,
            separable=separable,
            name="generator_ce2" if separable else "generator_ce1",
            **self._common(),
        )

    def _build_base_grader(self) -> keras.Model:
        return nets.build_base_grader(
            input_shape=self.shape,
            num_grades=self.config.model.num_grades,
            low_channels=self.method.grader_low_channels,
            widths=self.method.grader_widths,
            dropout=self.config.model.dropout,
            **self._common(),
        )

    def _build_attentive(self, base: keras.Model, attention: bool) -> keras.Model:
        return nets.build_lesion_attentive_grader(
            base,
            num_lesions=len(self.lesions),
            attention=attention,
            fusion_units=self.method.fusion_units,
            width=self.width,
            dropout=self.config.model.dropout,
        )

    def _build_discriminator(self) -> keras.Model:
        return nets.build_discriminator(
            input_shape=self.shape,
            num_lesions=len(self.lesions),
            widths=self.method.discriminator_widths,
            **self._common(),
        )

    def _generator(self, separable: bool = True, weights=None) -> keras.Model:
        generator = self._seeded(f"generator_{separable}", lambda: self._build_generator(separable))
        if weights is not None:
            generator.set_weights(weights)
        return generator

    def _base_grader(self) -> keras.Model:
        return self._seeded("base", self._build_base_grader)

    def _attentive(self, attention: bool, base_weights=None) -> keras.Model:
        """The lesion attentive grader (or the mask-weighted one) on a base grader holding
        ``base_weights`` (the pre-trained "Ori" base)."""
        base = self._base_grader()
        grader = self._seeded(
            f"attentive_{attention}", lambda: self._build_attentive(base, attention)
        )
        if base_weights is not None:
            base.set_weights(base_weights)
        return grader

    def _discriminator(self) -> keras.Model:
        return self._seeded("discriminator", self._build_discriminator)

    def _inference(self, generator: keras.Model, grader: keras.Model) -> keras.Model:
        """``image -> G -> C`` (no weights of its own)."""
        with self.ctx.strategy.scope():
            return nets.build_collaborative_model(generator, grader)

    # The networks as the stages declare them (for the plan: built once each, random weights).

    def _generator_net(self, separable: bool, trainable: bool = True) -> Net:
        return Net(
            "generator_ce2" if separable else "generator_ce1",
            build=lambda: self._build_generator(separable),
            trainable=trainable,
            optimizer=self._slots("generator"),
        )

    def _base_net(self) -> Net:
        return Net("base_grader", build=self._build_base_grader, optimizer=self._slots("grader"))

    def _grader_net(self, attention: bool) -> Net:
        # The whole grader: the base's shared layers and the (attention) head.
        return Net(
            "grader_attentive" if attention else "grader_mask_weighted",
            build=lambda: self._build_attentive(self._build_base_grader(), attention),
            optimizer=self._slots("grader"),
        )

    def _discriminator_net(self) -> Net:
        return Net(
            "discriminator",
            build=self._build_discriminator,
            optimizer=self._slots("discriminator"),
        )

    # -------------------------------------------------------------------------- training

    def pretrain_generator(self, separable: bool, data: Data) -> keras.Model:
        """Stage 1 of ``G``: ``L_CE`` on IDRiD's pixel-level training images."""
        generator = self._generator(separable)
        with self.ctx.strategy.scope():
            trainer = GeneratorPretrainer(generator)
            trainer.compile(
                g_optimizer=self._optimizer("generator"), run_eagerly=self.method.run_eagerly
            )
        self.ctx.fit(
            trainer,
            self.ctx.data(data.key),
            epochs=self.method.pretrain_seg_epochs,
            steps_per_epoch=self._steps(data.examples, data.batch),
        )
        return generator

    def pretrain_grader(self, dataset: str, data: Data) -> keras.Model:
        """Stage 1 of ``C`` ("Ori"): the base grading CNN with ``L_Cls`` on ``dataset``."""
        base = self._base_grader()
        with self.ctx.strategy.scope():
            base.compile(
                optimizer=self._optimizer("grader"),
                loss={keys.GRADE_PROBS: self._focal()},
                run_eagerly=self.method.run_eagerly,
            )
        self.ctx.fit(
            base,
            self.ctx.data(data.key),
            epochs=self.method.pretrain_grade_epochs,
            steps_per_epoch=self._steps(data.examples, data.batch),
        )
        return base

    def train_mask_weighted(self, data: Data, generator_weights, base_weights) -> keras.Model:
        """ "Lesion(Pretrained)": frozen ``G``'s masks weight ``f_low``; only ``C`` trains."""
        generator = self._generator(True, generator_weights)
        grader = self._attentive(False, base_weights)
        model = self._inference(generator, grader)
        generator.trainable = False
        with self.ctx.strategy.scope():
            model.compile(
                optimizer=self._optimizer("grader"),
                loss={keys.GRADE_PROBS: self._focal()},
                run_eagerly=self.method.run_eagerly,
            )
        self.ctx.fit(
            model,
            self.ctx.data(data.key),
            epochs=self.config.train.epochs,
            steps_per_epoch=self._steps(data.examples, data.batch),
        )
        return model

    def train_collaborative(
        self, data: Data, generator_weights, base_weights, *, adversarial: bool
    ) -> Tuple[keras.Model, keras.Model, keras.Model]:
        """Stage 2 ("Lesion(Semi)" / "Lesion(Semi+Adv)") on the mixed stream ``data``;
        returns (generator, attentive grader, inference model)."""
        generator = self._generator(True, generator_weights)
        grader = self._attentive(True, base_weights)
        discriminator = self._discriminator() if adversarial else None
        with self.ctx.strategy.scope():
            trainer = CollaborativeTrainer(generator, grader, discriminator)
            trainer.compile(
                g_optimizer=self._optimizer("generator"),
                c_optimizer=self._optimizer("grader"),
                d_optimizer=self._optimizer("discriminator") if adversarial else None,
                lambda_ce=self.method.lambda_ce,
                focal_alpha=self.method.focal_alpha,
                focal_gamma=self.method.focal_gamma,
                run_eagerly=self.method.run_eagerly,
            )
        self.ctx.fit(
            trainer,
            self.ctx.data(data.key),
            epochs=self.config.train.epochs,
            steps_per_epoch=self._steps(data.examples, data.batch),
        )
        return generator, grader, self._inference(generator, grader)

    # -------------------------------------------------------------------------- stages

    def stages(self) -> List[Stage]:
        """Every stage of the run, in order (see the class docstring); reads labels only."""
        declared = [self._pretrain_stage(False), self._pretrain_stage(True)]
        for dataset in self.method.datasets:
            declared += self._dataset_stages(dataset)
        return declared

    def _pretrain_stage(self, separable: bool) -> Stage:
        name = "pretrain_ce2" if separable else "pretrain_ce1"
        row = "CE2(Xception)" if separable else "CE1(Conv)"
        train = self._seg_train_data()

        def run(inputs):
            generator = self.pretrain_generator(separable, train)
            self._curves[row] = self.segmentation_curves(generator)
            if not separable:
                return None
            self._fig4_images()
            self._fig4["before"] = self._fig4_predictions(generator)
            return generator.get_weights()

        return Stage(
            name,
            run=run,
            nets=[self._generator_net(separable)],
            data=[train, self._seg_test_data()],
            steps=self._steps(train.examples, train.batch),
            epochs=self.method.pretrain_seg_epochs,
            batch=train.batch,
        )

    def _dataset_stages(self, dataset: str) -> List[Stage]:
        """The four Table 1 rows of ``dataset``, each trained and graded in its own stage."""
        ori, pretrained, semi, semi_adv = (f"{dataset}_{STAGES[row]}" for row in GRADING_ROWS)
        evaluation = [self._grade_test_data(dataset)]
        if dataset == "eyepacs" and "table2" in self.tables:
            evaluation.append(self._grade_test_data("messidor"))
        grade_ori = self._grade_train_data(dataset, self.method.pretrain_grade_batch)
        grade_tune = self._grade_train_data(dataset, self.data.batch_size)
        mixed = self._mixed_data(dataset)
        seg_test = [self._seg_test_data()] if dataset == "idrid" else []
        consumes = ("pretrain_ce2", ori)
        epochs = self.config.train.epochs

        def run_ori(inputs):
            base = self.pretrain_grader(dataset, grade_ori)
            self.add_grading("Ori", dataset, base)
            return base.get_weights()

        def run_pretrained(inputs):
            model = self.train_mask_weighted(grade_tune, inputs["pretrain_ce2"], inputs[ori])
            self.add_grading("Lesion(Pretrained)", dataset, model)

        def run_semi(inputs, adversarial):
            generator, grader, model = self.train_collaborative(
                mixed, inputs["pretrain_ce2"], inputs[ori], adversarial=adversarial
            )
            row = "Lesion(Semi+Adv)" if adversarial else "Lesion(Semi)"
            self.add_grading(row, dataset, model)
            if dataset == "idrid":
                seg_row = "CE2+Semi+Adv" if adversarial else "CE2+Semi"
                self._curves[seg_row] = self.segmentation_curves(generator)
            if adversarial and dataset == self.final_dataset:
                self._final = (generator.get_weights(), grader.get_weights())
                self._fig4["after"] = self._fig4_predictions(generator)

        generator = self._generator_net(True)
        return [
            Stage(
                ori,
                run=run_ori,
                nets=[self._base_net()],
                data=[grade_ori, *evaluation],
                steps=self._steps(grade_ori.examples, grade_ori.batch),
                epochs=self.method.pretrain_grade_epochs,
                batch=grade_ori.batch,
            ),
            Stage(
                pretrained,
                run=run_pretrained,
                nets=[self._generator_net(True, trainable=False), self._grader_net(False)],
                data=[grade_tune, *evaluation],
                steps=self._steps(grade_tune.examples, grade_tune.batch),
                epochs=epochs,
                batch=grade_tune.batch,
                consumes=consumes,
            ),
            Stage(
                semi,
                run=lambda inputs: run_semi(inputs, False),
                nets=[generator, self._grader_net(True)],
                data=[mixed, *evaluation, *seg_test],
                steps=self._steps(mixed.examples, mixed.batch),
                epochs=epochs,
                batch=mixed.batch,
                consumes=consumes,
            ),
            Stage(
                semi_adv,
                run=lambda inputs: run_semi(inputs, True),
                nets=[generator, self._grader_net(True), self._discriminator_net()],
                data=[mixed, *evaluation, *seg_test],
                steps=self._steps(mixed.examples, mixed.batch),
                epochs=epochs,
                batch=mixed.batch,
                consumes=consumes,
            ),
        ]

    # -------------------------------------------------------------------------- evaluation

    def grading_predictions(self, model, dataset: str):
        """Grade probabilities and true grades of ``dataset``'s test set (streamed batch by
        batch from the stage's dataset; only the ``[N, grades]`` probabilities are kept)."""
        probs, grades = [], []
        for image, grade in self.ctx.data(f"{dataset}_grade_test"):
            probs.append(self._outputs(model, image)[keys.GRADE_PROBS])
            grades.append(grade.numpy())
        if not probs:
            return np.zeros((0, self.config.model.num_grades), np.float32), np.zeros(0, np.int64)
        return np.concatenate(probs), np.concatenate(grades)

    def add_grading(self, row: str, dataset: str, model) -> None:
        probs, grades = self.grading_predictions(model, dataset)
        scores = metrics.grading_scores(probs, grades)
        name = DATASET_NAMES[dataset]
        self.tables["table1"].add(row, f"{name} Acc.", scores["accuracy"])
        self.tables["table1"].add(row, f"{name} Kappa", scores["kappa"])
        log.info(
            "%s %s: accuracy %.3f, kappa %.3f", dataset, row, scores["accuracy"], scores["kappa"]
        )
        if dataset == "eyepacs" and "table2" in self.tables:
            probs, grades = self.grading_predictions(model, "messidor")
            screening = metrics.screening_scores(probs, grades, scale="messidor")
            values = (
                screening["referable_auc"],
                screening["referable_accuracy"],
                screening["normal_auc"],
                screening["normal_accuracy"],
            )
            for column, value in zip(MESSIDOR_COLUMNS, values):
                self.tables["table2"].add(row, column, value)

    def segmentation_curves(self, generator) -> metrics.PerLesionCurves:
        curves = metrics.PerLesionCurves(self.lesions)
        for image, targets in self.ctx.data("idrid_seg_test"):
            probs = self._outputs(generator, image)[keys.LESION_PROBS]
            curves.update(probs, targets[keys.MASKS].numpy(), targets[keys.MASK_PRESENT].numpy())
        return curves

    def add_segmentation(self, row: str, curves: metrics.PerLesionCurves) -> None:
        roc, pr = curves.roc_auc(), curves.pr_auc("ap")
        for lesion in self.lesions:
            roc_col, pr_col = _seg_columns(lesion)
            self.tables["table3"].add(row, roc_col, roc[lesion])
            self.tables["table3"].add(row, pr_col, pr[lesion])

    # -------------------------------------------------------------------------- figures, export

    def _display(self, image) -> np.ndarray:
        shown = preprocess.denormalize(image, self.data.normalization).numpy()
        return np.clip(shown, 0, 255).astype(np.uint8)

    def _fig4_images(self) -> None:
        """Keep Fig. 4's first ``method.fig4_images`` IDRiD segmentation test images and their
        masks (the stages after this one predict on them)."""
        images, truths = [], []
        for image, targets in self.ctx.data("idrid_seg_test"):
            images.append(np.asarray(image))
            truths.append(targets[keys.MASKS].numpy())
            if sum(len(i) for i in images) >= self.method.fig4_images:
                break
        if images:
            count = self.method.fig4_images
            self._fig4["images"] = np.concatenate(images)[:count]
            self._fig4["truths"] = np.concatenate(truths)[:count]

    def _fig4_predictions(self, generator: keras.Model) -> Optional[np.ndarray]:
        images = self._fig4.get("images")
        if images is None:
            return None
        return self._outputs(generator, tf.constant(images))[keys.LESION_PROBS]

    def fig4(self):
        """Fig. 4: per lesion, the pre-trained (CE2) and the semi-supervised (CE2+Semi+Adv)
        masks beside the truth, on the images :meth:`_fig4_images` kept (``None`` when a
        part is missing, e.g. no test image)."""
        parts = [self._fig4.get(k) for k in ("images", "before", "after", "truths")]
        if any(part is None for part in parts):
            return None
        shown = list(zip(*parts))
        columns = ("pre-trained (CE2)", "semi-supervised (CE2+Semi+Adv)", "ground truth")
        fig = new_figure((3.0 * len(columns) * len(shown), 3.0 * len(self.lesions)))
        for i, (image, before, after, truth) in enumerate(shown):
            picture = self._display(image)
            for row, lesion in enumerate(self.lesions):
                target = truth[..., row].astype(bool)
                panels = (
                    error_overlay(picture, before[..., row] >= 0.5, target),
                    error_overlay(picture, after[..., row] >= 0.5, target),
                    error_overlay(picture, target, target),
                )
                for col, panel in enumerate(panels):
                    ax = fig.add_subplot(
                        len(self.lesions),
                        len(columns) * len(shown),
                        row * len(columns) * len(shown) + i * len(columns) + col + 1,
                    )
                    ax.imshow(panel)
                    ax.axis("off")
                    if row == 0:
                        ax.set_title(f"image {i + 1}: {columns[col]}", fontsize=7)
                    if col == 0 and i == 0:
                        ax.text(
                            -0.05,
                            0.5,
                            keys.LESION_NAMES.get(lesion, lesion),
                            rotation=90,
                            va="center",
                            ha="right",
                            transform=ax.transAxes,
                            fontsize=8,
                        )
        fig.suptitle(
            "Fig. 4-style comparison on IDRiD test (TP green, FN red, FP blue; threshold 0.5)",
            fontsize=9,
        )
        return save_figure(fig, self.ctx.out_dir / "fig4_comparison.png")

    def export(self, generator: keras.Model, model: keras.Model) -> None:
        """``export/collaborative_generator`` and ``export/collaborative_grader``, reload-checked;
        the served input is the evaluation transform of ``_seg_test`` / ``_grade_test`` (the
        pipelines' uint8 rounding before Graham included:
        :func:`drkeras.export.pipeline_preprocess`)."""
        channels = [(lesion, [lesion]) for lesion in self.lesions]
        preprocess = pipeline_preprocess(**self._preprocess())
        export_model(
            generator,
            self.ctx.export_dir / "collaborative_generator",
            image_size=self.size,
            preprocess=preprocess,
            output_names=[keys.LESION_PROBS],
            channels={keys.LESION_PROBS: channels},
        )
        export_model(
            model,
            self.ctx.export_dir / "collaborative_grader",
            image_size=self.size,
            preprocess=preprocess,
            output_names=[keys.GRADE_PROBS, keys.ATTENTION, keys.LESION_PROBS],
            channels={keys.ATTENTION: channels, keys.LESION_PROBS: channels},
        )

    # -------------------------------------------------------------------------- the report

    def report(self) -> List[ResultsTable]:
        """After the stages: Table 3 and Fig. 5 from the stages' curves, Fig. 4, the export
        and the training curves. A stage that did not run (e.g. skipped by a dry run) leaves
        its cells empty, its curves out of Fig. 5, and Fig. 4 or the export undone."""
        curves = {row: self._curves[row] for row in SEG_ROWS if row in self._curves}
        for row, row_curves in curves.items():
            self.add_segmentation(row, row_curves)
        if curves:
            plot_roc_pr_comparison(
                curves,
                self.ctx.out_dir / "fig5_roc_pr.png",
                title="Fig. 5: ROC and PR curves on IDRiD test, pooled pixels",
            )
        self.fig4()
        if self.ctx.is_chief and self._final is not None:
            generator = self._generator(True, self._final[0])
            grader = self._attentive(True)
            grader.set_weights(self._final[1])
            self.export(generator, self._inference(generator, grader))
        if self.ctx.history_path.exists():
            plot_history(self.ctx.history_path, self.ctx.out_dir / "training_curves.png")
        return list(self.tables.values())


class Collaborative(Experiment):
    """Zhou et al. 2019: Tables 1-3, Fig. 4 and Fig. 5 (see the module docstring).

    Example::

        from experiments.collaborative import Collaborative, main
        main(Collaborative(), ["--preset", "smoke", "--out", "runs/collab"])
    """

    name = "collaborative"
    title = "Collaborative semi-supervised lesion segmentation and DR grading (Zhou et al. 2019)"
    presets = {"smoke": SMOKE, "mini": MINI, "paper": PAPER}

    def pretrained_weights(self, config: Config) -> list:
        """None: Zhou et al.'s networks train from scratch (``model.encoder_weights`` other than
        none is refused before anything is built)."""
        return []

    def prepare(self, ctx: RunContext) -> "_Run":
        """The run's declared stages and report (checks the config; builds nothing)."""
        return _Run(ctx)


if __name__ == "__main__":
    raise SystemExit(main(Collaborative()))
