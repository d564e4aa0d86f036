"""Patch-based semi-supervised GAN for DR abnormality classification (Lecouat et al. 2018).

Reproduces "Semi-Supervised Deep Learning for Abnormality Classification in Retinal Images":
Tables 1 (patch-level AUC) and 2 (image-level AUC) for label fractions 10-149 of 149 training
images, Table 7 (direct image-level ResNet50 with and without pretraining), the Fig. 2 overlays
of patch scores and the localisation AUC of Sec. 4.

Command::

    python experiments/ssl_gan.py                                # --data synthetic --preset smoke
    python experiments/ssl_gan.py --data RECORDS --preset paper  # RECORDS/idrid (data_prep)

Expected runtime: smoke, 4-7 minutes on 2 CPU cores (measured from a fresh clone: 3 min 52 s wall, 3
min 34 s of CPU; 6 min 53 s beside other jobs; the synthetic IDRiD layout generated and converted, a
cohort of 26 images at 256 px split 16 / 5 / 5; 2 label columns x 2 samplings x 5 networks of a few
eager steps each, plus the exports). Paper: GPU days (5 columns x 5 samplings of 1200 SSL-GAN epochs
of ~95 steps of 100 patches, plus the baselines with early stopping; not run here).

Mini preset (``--preset mini``): the paper preset scaled to learn the synthetic cohort on a CPU;
every key it changes, with its kind and why, is in ``MINI_CHANGES`` (256 px images, i.e. the
paper's 32 px patches, 81 DR + 35 healthy synthetic images, eighth-width SSL-GAN and ConvNet,
one sampling of each of the 5 label columns, 6 SSL-GAN epochs at Adam 1e-3 with a 0.99 weight
average, 3 baseline epochs at Adam 1e-3, Table 7 at 128 px without ImageNet weights): 26
stages. Runtime not yet measured end to end (per-step timings suggest about 15 minutes on 2
quiet cores).

Expected result: smoke, every cell of Tables 1, 2 and 7 filled (mean ± std over 2 samplings)
beside the paper's numbers, the localisation and threshold tables, ``fig2_patch_scores_*.png``,
``training_curves.png``, ``export/ssl_gan`` (image-level scoring of photographs) and
``export/ssl_gan_patches`` (the patch classifier). The numbers are those of a dozen training
steps on synthetic images and 5 test images: patch AUCs near chance (50-56 % in the measured
run), image AUCs of 0 or 100 % per sampling (a 5-image test cohort), so "50 ± 71"; they check
that every row is computed, not the paper's accuracy. The smoke "Pretrained" row of Table 7 has
no ImageNet weights (no download here) and equals the "ResNet50" row; its title says so. Paper
preset on real IDRiD (not run here): the paper reports SSL-GAN patch AUCs of 76-85 % and image
AUCs of 85-99 %, above ConvNet and ResNet34 at the small label fractions.

What runs
---------
Cohort (Sec. 3): the IDRiD images with lesion masks (DR, 81) and the IDRiD grading images of
grade 0 (healthy, 168; they carry no masks and, having no DR, all their patches are healthy),
249 in all, split at random into training / validation / test cohorts of 149 / 50 / 50
(``method.cohort_split``; another cohort size is split in the same proportions). The split and
the labeled subsets are stratified by image label (DR / healthy) so that the smoke preset's small
subsets hold both classes; the paper only says "randomly".

Each image (:mod:`drkeras.data.patches`): field-of-view crop, square resize to
``data.image_size`` (1024), normalised by its maximum, an 8 x 8 grid of patches area-downsampled
to 32 x 32, a patch diseased when any lesion pixel (MA, HE, EX, SE) falls inside it.

For each label column ``n/149`` of Tables 1-2 and each of ``method.samplings`` samplings,
``round(n/149 * N_train)`` training images are labeled (:func:`drkeras.data.pipeline.
fraction_split`, seeded by the sampling), and:

1. SSL-GAN (:class:`drkeras.training.ssl_gan.PatchSSLGANTrainer`): labeled patches of the
   labeled images, unlabeled patches of the WHOLE training cohort (Sec. 2: ``x ~ I = I_L u
   I_U``; at 149/149 there are no other images), random crops and flips (Supplement 1), Adam
   3e-4 / beta_1 0.5, batch 100, learning rate linear to zero from epoch 1000 to 1200, an epoch
   being a pass over the training cohort's patches; the EMA (0.999) discriminator is evaluated.
2. ConvNet: the discriminator's architecture (Table 3, weight norm initialised on data)
   trained supervised on the same labeled patches; ResNet34 (image-classifiers) likewise. Both
   with Table 5's recipe (the paper gives it for ResNet34; the issue applies it to both):
   balanced class weights on binary cross-entropy, Adam 1e-5 (beta_1 0.9), batch 32, early
   stopping on the validation cohort's loss (patience 20, best weights restored),
   learning-rate reduction to 10 % (patience 10). Augmentation as the paper names it
   (:func:`supervised_augmentation`): the ConvNet gets the SSL-GAN's random cropping and
   flipping (Supplement A: "the same" for the associated CNN), ResNet34 (and Table 7's ResNet50)
   Table 5's rotations of up to 180 degrees, left-right and up-down flips and shifts of up to
   30 %.
3. Table 7: ResNet50 (keras.applications) classifying whole images directly, trained on the
   image labels of the same labeled images, with ImageNet weights ("Pretrained") and without,
   the same recipe. The image it sees is the one the patch classifiers see, the max-normalised
   photograph at 256 x 256 (the 64 patches side by side). The pretrained weights are set by
   ``method.pretrained_weights`` (``method.resnet34_weights`` for ResNet34; this experiment does
   not read ``model.encoder_weights``) and fetched by the runner before the first stage
   (:func:`drkeras.weights.ensure_available`): offline, the run stops at once naming that key.

Evaluation on the test cohort: patch-level ROC AUC over all its patches (Table 1) and the
image-level ROC AUC of ``score_i = sum_j sigmoid(l_ij)`` (Table 2); the image threshold is the
one of best balanced accuracy on the validation cohort, and the test accuracy at it is
reported; the localisation AUC (Sec. 4) is the pixel ROC AUC of the Gaussian-blurred patch
score map (Fig. 2) against the union of the lesion masks, pooled over the DR test images.

Stages (declared for the shared runner, :mod:`drkeras.stages`): ``cohort`` reads the patch
grids of the three cohorts and the test lesion masks (float32 grids, about 196 MB for the
paper's 249 images at 1024 px; held in host memory until the last network stage, declared as
``held_bytes``); then, per label column and sampling, ``<n>of149_s<k>_`` + ``ssl_gan``,
``convnet``, ``resnet34``, ``resnet50_pretrained`` and ``resnet50_resnet50``, each training one
network, evaluating it and filling its cells (group ``<n>of149_<network>``: a dry run trains
sampling 0 of each column and network). The SSL-GAN's patch streams are cached per stage (the
runner's ``data.cache`` choice) and released with it; Table 7's whole images are assembled from
the held grids within each ResNet50 stage.
"""

import dataclasses
import json
import logging
import math
import pathlib
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

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
from drkeras.data import patches as patch_ops
from drkeras.data import pipeline
from drkeras.experiment import Experiment, RunContext, main, run_config_summary
from drkeras.export import PATCH_EXPORT_FILE, export_model
from drkeras.models import ssl_gan as nets
from drkeras.plots import plot_history, plot_patch_scores
from drkeras.results import ResultsTable
from drkeras.stages import Data, Net, Stage
from drkeras.training.optim import build_optimizer
from drkeras.training.ssl_gan import (
    LABELED,
    UNLABELED,
    PatchSSLGANTrainer,
    choose_threshold,
    localisation_map,
    predict_patch_logits,
)

__all__ = [
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "PAPER_TABLE7",
    "PRETRAINED_WEIGHTS",
    "RESNET34_WEIGHTS",
    "CohortImage",
    "Method",
    "SSLGAN",
    "SUPERVISED_AUGMENTATION",
    "export_patch_classifier",
    "read_cohort",
    "split_cohort",
    "supervised_augmentation",
]

log = logging.getLogger("drkeras.ssl_gan")


@dataclasses.dataclass(frozen=True)
class Method:
    """The paper's own hyper-parameters (``--set method.<field>=...``).

    Attributes:
        cohort_split: training / validation / test images (149 / 50 / 50); a cohort of another
            size is split in these proportions.
        label_columns: the label columns ``n/149`` of Tables 1, 2 and 7 to run; each labels
            ``round(n/149 * N_train)`` training images (at least one).
        samplings: random labeled subsets (and baseline seeds) per column (5).
        grid, patch_size: the 8 x 8 grid and the 32 x 32 patches.
        latent_dim, gen_start_size: generator noise (100) and first feature map (6, Table 4).
        fm_norm: feature matching ``l1`` (Sec. 2) or ``l2`` (Salimans et al. 2016).
        ema_decay: weight average decay (0.999).
        lr_decay_start_epoch: the GAN learning rates decay linearly to zero from this epoch to
            ``train.epochs`` (1000 of 1200).
        init_batch: patches of the data-dependent weight-norm initialisation (500, as in
            Salimans et al.'s code).
        baseline_batch: batch of the supervised baselines (32, Table 5).
        baseline_epochs: most epochs of a baseline (early stopping ends it sooner; the paper
            gives no maximum).
        baseline_steps_per_epoch: steps per baseline epoch (0: one pass over the labeled data).
        patience_stop, patience_lr, lr_factor: Table 5's early stopping and reduction.
        resnet34_weights: weights of the ResNet34 patch baseline (the paper does not pretrain
            it: ``none``).
        pretrained_weights: weights of Table 7's "Pretrained" ResNet50 (``imagenet``; the smoke
            preset cannot download and uses ``none``, which the table title says).
        localisation_size: resolution of the localisation maps and masks.
        blur: Gaussian blur of the patch-score maps in patch widths (Fig. 2).
        figure_column, figure_images: the column (``20/149`` in Fig. 2) and number of test
            images drawn.
        export_column: the column whose first SSL-GAN is exported.
        direct_image_size: side of the whole images of Table 7's ResNet50 (0: the patch grid's
            own ``grid * patch_size`` = 256; smaller images are area-averaged from it).
        run_eagerly: train and predict eagerly. For a few steps on a CPU this is faster than
            tracing each new network's graph (the smoke preset trains 20 networks).
    """

    cohort_split: Tuple[int, ...] = (149, 50, 50)
    label_columns: Tuple[str, ...] = ("10/149", "20/149", "40/149", "80/149", "149/149")
    samplings: int = 5
    grid: int = 8
    patch_size: int = 32
    latent_dim: int = nets.LATENT_DIM
    gen_start_size: int = 6
    fm_norm: str = "l1"
    ema_decay: float = 0.999
    lr_decay_start_epoch: int = 1000
    init_batch: int = 500
    baseline_batch: int = 32
    baseline_epochs: int = 300
    baseline_steps_per_epoch: int = 0
    patience_stop: int = 20
    patience_lr: int = 10
    lr_factor: float = 0.1
    resnet34_weights: Optional[str] = None
    pretrained_weights: Optional[str] = "imagenet"
    localisation_size: int = 256
    blur: float = 0.5
    figure_column: str = "20/149"
    figure_images: int = 4
    export_column: str = "20/149"
    direct_image_size: int = 0
    run_eagerly: bool = False


_GAN_ADAM = OptimizerConfig(name="adam", learning_rate=3e-4, beta_1=0.5, schedule="linear_to_zero")

# Supplement Tables 5-6; data as in Sec. 3.
PAPER = Config(
    method=Method(),
    data=DataConfig(
        image_size=1024, batch_size=100, normalization="max", augment=True, fov_crop=True
    ),
    model=ModelConfig(encoder_weights=None, width=1.0),
    optimizers={
        "discriminator": _GAN_ADAM,
        "generator": _GAN_ADAM,
        "baseline": OptimizerConfig(name="adam", learning_rate=1e-5, beta_1=0.9),
    },
    train=TrainConfig(epochs=1200, steps_per_epoch=0, verbose=2),
)

# Minutes on 2 CPU cores: 26 synthetic images at 256 px (8 x 8 patches of 32 px), narrow
# networks, 2 label columns x 2 samplings, a few steps per model.
SMOKE = Config(
    method=Method(
        label_columns=("40/149", "149/149"),
        samplings=2,
        init_batch=128,
        baseline_epochs=2,
        baseline_steps_per_epoch=3,
        patience_stop=1,
        patience_lr=1,
        pretrained_weights=None,
        localisation_size=128,
        figure_column="40/149",
        figure_images=2,
        export_column="40/149",
        lr_decay_start_epoch=1,
        direct_image_size=64,
        run_eagerly=True,
    ),
    data=DataConfig(
        image_size=256,
        batch_size=32,
        normalization="max",
        augment=True,
        synthetic_size=256,
        synthetic_scale=1.5,
    ),
    model=ModelConfig(encoder_weights=None, width=0.125),
    optimizers={
        "discriminator": dataclasses.replace(_GAN_ADAM, learning_rate=1e-3),
        "generator": dataclasses.replace(_GAN_ADAM, learning_rate=1e-3),
        "baseline": OptimizerConfig(name="adam", learning_rate=1e-3, beta_1=0.9),
    },
    train=TrainConfig(
        epochs=2, steps_per_epoch=6, verbose=2, checkpoint_steps=0, keep_checkpoints="none"
    ),
)

# The paper's networks, losses, update rules and batch sizes, scaled to learn the synthetic
# cohort on 2 CPU cores: one sampling of every cell of Tables 1, 2 and 7.
MINI_CHANGES = {
    "data.image_size": PresetChange(
        "resolution", "256", "1024 -> 256 px: 32 px cells, the paper's 32 px patches unchanged"
    ),
    "data.synthetic_size": PresetChange(
        "resolution", "256", "synthetic photographs drawn at the working size (default 128)"
    ),
    "data.synthetic_scale": PresetChange(
        "data", "6.75", "81 DR (the published IDRiD count) + 35 healthy: cohorts 70 / 23 / 23"
    ),
    "model.width": PresetChange(
        "width", "0.125", "eighth-width discriminator, ConvNet and generator"
    ),
    "method.samplings": PresetChange("steps", "1", "one sampling per label column"),
    "method.direct_image_size": PresetChange(
        "resolution", "128", "Table 7's whole images at 128 px (256 in the paper)"
    ),
    "method.pretrained_weights": PresetChange(
        "offline", "none", "no ImageNet ResNet50 file can be downloaded here; the title says so"
    ),
    "train.epochs": PresetChange("steps", "6", "SSL-GAN: 6 epochs of 45 steps (1200 of ~95)"),
    "method.lr_decay_start_epoch": PresetChange(
        "rate", "5", "linear decay over the last sixth, as 1000 of 1200"
    ),
    "method.ema_decay": PresetChange(
        "rate", "0.99", "a 100-step average: at 0.999 the weights of 270 steps are 76 % init"
    ),
    "optimizers.discriminator.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 3e-4: 270 steps instead of ~114,000"
    ),
    "optimizers.generator.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 3e-4, as the discriminator"
    ),
    "method.baseline_epochs": PresetChange("steps", "3", "baselines: 3 passes over the labels"),
    "optimizers.baseline.learning_rate": PresetChange(
        "rate", "0.001", "Adam 1e-3 for 1e-5: tens to hundreds of steps from random weights"
    ),
}
MINI = derive_preset(PAPER, MINI_CHANGES)

# ------------------------------------------------------------------------------ paper numbers

COLUMNS = ("10/149", "20/149", "40/149", "80/149", "149/149")


def _row(values) -> Dict[str, float]:
    return dict(zip(COLUMNS, values))


PAPER_TABLE1 = {
    "SSL-GAN": _row([75.8, 79.4, 81.7, 83.3, 84.5]),
    "ConvNet": _row([68.3, 72.8, 77.3, 79.5, 79.6]),
    "ResNet34": _row([52.2, 61.5, 73.9, 81.2, 85.1]),
}
PAPER_TABLE2 = {
    "SSL-GAN": _row([84.5, 89.0, 94.7, 98.5, 99.1]),
    "ConvNet": _row([71.1, 81.4, 87.4, 94.5, 97.8]),
    "ResNet34": _row([71.3, 79.4, 80.5, 84.2, 98.9]),
}
PAPER_TABLE7 = {
    "Pretrained": _row([85.8, 98.2, 98.8, 99.2, 98.8]),
    "ResNet50": _row([56.8, 65.0, 67.8, 76.4, 82.2]),
}
# Sec. 4: "the SSL-GAN had an AUC gain of 16.30% over the CNN baselines" (localisation).
PAPER_LOCALISATION_GAIN = 16.30
PATCH_ROWS = ("SSL-GAN", "ConvNet", "ResNet34")
LOCALISATION_COLUMNS = ("localisation AUC (%)", "gain of SSL-GAN (points)")
ACCURACY_COLUMNS = ("threshold", "image accuracy (%)")

# The paper's directional claims (drkeras.claims), by ResultsTable name (_Run._tables). At
# 149/149 the paper's own Table 1 has ResNet34 ahead of SSL-GAN (85.1 vs 84.5): left out there.
CLAIMS = (
    *(
        Claim("Table 1, Sec. 4", "patch level: SSL-GAN above the supervised baselines",
              "table1_patch_auc", column, "SSL-GAN",
              PATCH_ROWS[1:] if column != "149/149" else ("ConvNet",))
        for column in COLUMNS
    ),
    *(
        Claim("Table 2, Sec. 4, abstract", "image level: SSL-GAN above the supervised "
              "baselines, by up to 15 points under 30 % labeled", "table2_image_auc", column,
              "SSL-GAN", PATCH_ROWS[1:])
        for column in COLUMNS
    ),
    *(
        Claim("Table 7, Supplement B", "direct image-level ResNet50: ImageNet pre-training "
              "beats random initialisation, even with few labels", "table7_direct_image_auc",
              column, "Pretrained", ("ResNet50",))
        for column in COLUMNS
    ),
    Claim("Sec. 4, interpretation", "SSL-GAN's patch-score maps localise lesions better than "
          "the CNN baselines'", "localisation_auc", LOCALISATION_COLUMNS[0], "SSL-GAN",
          PATCH_ROWS[1:]),
)  # fmt: skip


# ------------------------------------------------------------------------------ the cohort


@dataclasses.dataclass(frozen=True)
class CohortImage:
    """One cohort image: record split, id, image label (1 = DR with lesion masks, 0 = healthy)."""

    split: str
    id: str
    label: int


def read_cohort(records_dir) -> List[CohortImage]:
    """The paper's cohort from converted IDRiD records (Sec. 3), without decoding images.

    DR: images with every abnormality mask type (MA, HE, EX, SE) annotated; healthy: images of
    grade 0 without masks. Images of other grades without masks are not part of it.

    Example::

        cohort = read_cohort("records/idrid")   # 81 DR + 168 healthy on IDRiD
    """
    wanted = [keys.LESIONS.index(name) for name in patch_ops.ABNORMAL_LESIONS]
    cohort = []
    for split in keys.SPLITS:
        try:
            labels = pipeline.read_labels(records_dir, split)
        except (FileNotFoundError, ValueError):
            continue
        for i, example_id in enumerate(labels[keys.ID]):
            present = labels[keys.MASK_PRESENT][i]
            if present[wanted].all():
                cohort.append(CohortImage(split, str(example_id), 1))
            elif not present.any() and labels[keys.GRADE][i] == 0:
                cohort.append(CohortImage(split, str(example_id), 0))
    return cohort


def split_cohort(
    cohort: Sequence[CohortImage], sizes: Sequence[int], *, seed: int
) -> Dict[str, List[CohortImage]]:
    """Random training / validation / test cohorts, stratified by image label, of ``sizes``
    (scaled to the cohort's size when it differs from their sum).

    Example::

        parts = split_cohort(read_cohort(records), (149, 50, 50), seed=0)
        len(parts["train"]), len(parts["val"]), len(parts["test"])   # 149 50 50
    """
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"cohort_split must be 3 positive counts (train, val, test), got {sizes}")
    by_id = {c.id: c for c in cohort}
    ids = sorted(by_id)
    n = len(ids)
    total = sum(sizes)
    n_test = max(1, round(n * sizes[2] / total))
    n_val = max(1, round(n * sizes[1] / total))
    if n - n_test - n_val < 2:
        raise ValueError(f"a cohort of {n} images is too small for a {tuple(sizes)} split")
    labels = [by_id[i].label for i in ids]
    test, rest = pipeline.fraction_split(ids, n_test / n, seed=seed, stratify=labels)
    rest_labels = [by_id[i].label for i in rest]
    val, train = pipeline.fraction_split(
        rest, n_val / len(rest), seed=seed + 1, stratify=rest_labels
    )
    return {name: [by_id[i] for i in part] for name, part in
            (("train", train), ("val", val), ("test", test))}  # fmt: skip


def column_fraction(column: str) -> float:
    """``"20/149"`` -> 20/149, with a clear error for anything else."""
    try:
        num, den = (int(part) for part in column.split("/"))
    except ValueError:
        raise ValueError(f"label column {column!r} is not of the form n/N") from None
    if not 0 < num <= den:
        raise ValueError(f"label column {column!r} needs 0 < n <= N")
    return num / den


# ------------------------------------------------------------------------------ export


class _PatchServing(tf.Module):
    def __init__(self, model: keras.Model, patch_size: int, meta_json: str):
        super().__init__(name="drkeras_patch_export")
        # the variables, not the Keras model: saving a Keras model also traces every layer's
        # call for Keras' own metadata, which this signature does not need
        self.weights = list(model.weights)
        self.drkeras_meta = tf.Variable(meta_json, trainable=False, name="drkeras_meta")

        def serve(patches):
            logits = model(patches, training=False)[keys.PATCH_LOGITS]
            return {keys.PATCH_LOGITS: logits, nets.PATCH_PROBS: tf.sigmoid(logits)}

        spec = tf.TensorSpec([None, patch_size, patch_size, 3], tf.float32, name="patches")
        self.serve = tf.function(serve, input_signature=[spec])


def export_patch_classifier(model: keras.Model, out_dir, *, normalization: str, sample) -> Dict:
    """Export the patch classifier: signature ``serving_default(patches float32 [N, P, P, 3])``
    -> ``{"patch_logits": [N], "patch_probs": [N]}``, then reload and compare.

    ``drkeras.export.export_model`` serves photographs (uint8 images and encoded bytes); patches
    are not photographs: they are normalised by the maximum of the WHOLE image they were cut
    from, so the caller prepares them (``drkeras.data.patches.patch_example``) and this second
    SavedModel takes them as they are. The metadata records that. Returns the check report
    (also written to ``assets.extra/export_check.json``); a mismatch raises ``RuntimeError``.
    """
    out = pathlib.Path(out_dir)
    patch_size = int(model.inputs[0].shape[1])
    meta = {
        "format": "drkeras-patch-export/1",
        "model_name": model.name,
        "patch_size": patch_size,
        "input": "float32 patches [N, P, P, 3] from drkeras.data.patches.patch_example "
        f"(image normalisation {normalization!r} before patching)",
        "outputs": [keys.PATCH_LOGITS, nets.PATCH_PROBS],
    }
    module = _PatchServing(model, patch_size, json.dumps(meta))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(
        module, str(tmp), signatures={"serving_default": module.serve.get_concrete_function()}
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    sample = tf.constant(np.asarray(sample, np.float32))
    loaded = tf.saved_model.load(str(out)).signatures["serving_default"]
    got = loaded(patches=sample)[keys.PATCH_LOGITS].numpy()
    want = model(sample, training=False)[keys.PATCH_LOGITS].numpy()
    diff = float(np.max(np.abs(got - want)))
    report = {"ok": diff < 1e-4, "max_abs_diff": diff, "sample_shape": list(sample.shape)}
    (out / "assets.extra").mkdir(exist_ok=True)
    (out / "assets.extra" / "export_check.json").write_text(json.dumps(report, indent=2))
    # readable without loading the model: drkeras.leaderboard leaves patch exports out
    (out / PATCH_EXPORT_FILE).write_text(json.dumps(meta, indent=2))
    if not report["ok"]:
        raise RuntimeError(f"reloaded patch classifier {out} differs by {diff:.3g}")
    return report


# ------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class _Grids:
    """Patch grids of a set of cohort images, in cohort order."""

    images: List[CohortImage]
    patches: np.ndarray  # [N, G*G, P, P, 3]
    patch_labels: np.ndarray  # [N, G*G]
    image_labels: np.ndarray  # [N]


# The config keys of the pretrained weights this experiment loads (``model.encoder_weights`` is
# not read here); a failed download names them (``pretrained_download_guard``).
RESNET34_WEIGHTS = "method.resnet34_weights"
PRETRAINED_WEIGHTS = "method.pretrained_weights"


def _pretrained_files(method: Method) -> list:
    """The files of :meth:`SSLGAN.pretrained_weights`: image-classifiers' ResNet34 (the patch
    baseline, :func:`drkeras.models.ssl_gan.build_resnet_patch_classifier`) and
    keras.applications' ResNet50 (Table 7, ``build_resnet_image_classifier``)."""
    from drkeras import weights

    return weights.collect(
        weights.image_classifier(
            "resnet34",
            method.resnet34_weights,
            key=RESNET34_WEIGHTS,
            network="ResNet34 patch baseline",
        ),
        weights.keras_application(
            "ResNet50",
            method.pretrained_weights,
            key=PRETRAINED_WEIGHTS,
            network="ResNet50 (Table 7 'Pretrained')",
        ),
    )


# Augmentation of the supervised networks. Supplement A: the associated CNN (the ConvNet, the
# discriminator's architecture) gets the SSL-GAN's random cropping and flipping; Table 5 gives
# ResNet34's recipe, which Table 7's ResNet50 (same recipe, "kept across experiments") shares.
SUPERVISED_AUGMENTATION = {"ConvNet": "crop_flip", "ResNet34": "table5", "ResNet50": "table5"}


class ReflectPadRandomCrop(tf.keras.__internal__.layers.BaseRandomLayer):
    """Reflect-pad ``pad`` pixels, then crop back to the input size at a random offset drawn per
    example (training only; the identity at inference). Keras' ``RandomCrop`` draws one offset
    per batch and resizes at inference, so it is not used.

    Example::

        ReflectPadRandomCrop(4)(patches, training=True)   # [B, 32, 32, 3] -> [B, 32, 32, 3]
    """

    def __init__(self, pad: int, seed: Optional[int] = None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.pad = int(pad)
        self.seed = seed

    def call(self, inputs, training=None):
        if not training:
            return inputs
        p = self.pad
        padded = tf.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT")
        rows, cols = tf.shape(inputs)[1], tf.shape(inputs)[2]
        offsets = self._random_generator.random_uniform(
            tf.stack([tf.shape(inputs)[0], 2]), 0, 2 * p + 1, dtype=tf.int32
        )
        y = offsets[:, :1] + tf.range(rows)[None]
        x = offsets[:, 1:] + tf.range(cols)[None]
        out = tf.gather(padded, y, axis=1, batch_dims=1)
        return tf.gather(out, x, axis=2, batch_dims=1)

    def get_config(self):
        return {**super().get_config(), "pad": self.pad, "seed": self.seed}


def supervised_augmentation(recipe: str, size: int) -> keras.Sequential:
    """The in-model training augmentation of a supervised baseline (inactive at inference).

    Args:
        recipe: ``"table5"``: Table 5, rotations of 0-180 degrees (uniform in +-180), left-right
            and up-down flips, shifts of 0-30 % of the side, reflected borders. ``"crop_flip"``:
            Supplement A's random cropping and flipping, exactly as the SSL-GAN's patch stream
            (:func:`drkeras.data.pipeline.patch_dataset`): reflect-pad ``size // 8`` pixels (4
            for 32 px patches), a random ``size`` crop, random left-right and up-down flips.
        size: the input side (the patch size).

    Example::

        aug = supervised_augmentation("crop_flip", 32)
        aug(patches, training=True)   # cropped and flipped; aug(patches) returns patches
    """
    if recipe == "table5":
        return keras.Sequential(
            [
                keras.layers.RandomRotation(0.5, fill_mode="reflect", name="aug_rotate"),
                keras.layers.RandomFlip("horizontal_and_vertical", name="aug_flip"),
                keras.layers.RandomTranslation(0.3, 0.3, fill_mode="reflect", name="aug_shift"),
            ],
            name="table5_augmentation",
        )
    if recipe == "crop_flip":
        return keras.Sequential(
            [
                ReflectPadRandomCrop(max(1, int(size) // 8), name="aug_crop"),
                keras.layers.RandomFlip("horizontal_and_vertical", name="aug_flip"),
            ],
            name="crop_flip_augmentation",
        )
    raise ValueError(f"augmentation recipe must be 'table5' or 'crop_flip', got {recipe!r}")


@dataclasses.dataclass(frozen=True)
class _Sampling:
    """One labeled subset of the training cohort: a label column and sampling (one cell of each
    table), the positions of its labeled images in the training cohort, and its seed."""

    column: str
    sampling: int
    seed: int
    index: Tuple[int, ...]
    tag: str


@dataclasses.dataclass
class _Cohort:
    """What the ``cohort`` stage reads and every network stage consumes: the patch grids of the
    training, validation and test cohorts and the test DR images' lesion masks. Held in host
    memory (declared as ``held_bytes``) until the last network stage has ended."""

    train: _Grids
    val: _Grids
    test: _Grids
    masks: np.ndarray


# Patches the shuffle buffer of each pipeline of a GAN patch stream holds.
PATCH_SHUFFLE = 2048
# Images per batch of the evaluation grids (patch_dataset, mode="images").
GRID_BATCH = 16
MASK_BATCH = 8


def _cache_part(cache, part: str):
    """The ``cache`` argument of one of the several pipelines behind one declared dataset: a file
    cache gets a file of its own per pipeline (``<path>.<part>``; the runner deletes
    ``<path>*`` with the dataset)."""
    if isinstance(cache, str):
        pathlib.Path(cache).parent.mkdir(parents=True, exist_ok=True)
        return f"{cache}.{part}"
    return cache


class _Run:
    """The run's declared stages (:meth:`stages`) and its tables (:meth:`report`).

    Stages, in order: ``cohort`` (reads the patch grids of the three cohorts and the test lesion
    masks, held until the last network stage), then for each label column and sampling
    ``<column>_s<sampling>_`` + ``ssl_gan``, ``convnet``, ``resnet34``, ``resnet50_pretrained``,
    ``resnet50_resnet50``, each training its network, evaluating it and filling its table cells.
    The samplings of one column and network form one group (a dry run trains the first).
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config
        self.method: Method = ctx.config.method
        self.data = ctx.config.data
        m = self.method
        if self.config.model.encoder_weights is not None:
            raise ValueError(
                f"model.encoder_weights={self.config.model.encoder_weights!r} is not read by this "
                f"experiment; its pretrained weights are set by {PRETRAINED_WEIGHTS} (Table 7's "
                f"ResNet50) and {RESNET34_WEIGHTS} (the ResNet34 patch baseline)"
            )
        for column in m.label_columns:
            if column not in COLUMNS:
                raise ValueError(f"method.label_columns: {column!r} is not one of {COLUMNS}")
        if m.fm_norm not in ("l1", "l2"):
            raise ValueError(f"method.fm_norm must be 'l1' or 'l2', got {m.fm_norm!r}")
        if self.data.image_size % m.grid:
            raise ValueError(
                f"data.image_size={self.data.image_size} must be divisible by method.grid={m.grid}"
            )
        self.tables = self._tables()
        self.seed = self.config.seed
        self.records = ctx.records("idrid")
        # Localisation AUC per network row and sampling tag (the gain pairs them in report()).
        self._local: Dict[str, Dict[str, float]] = {row: {} for row in PATCH_ROWS}

    # ----------------------------------------------------------------------------- tables

    def _tables(self) -> Dict[str, ResultsTable]:
        cols = list(self.method.label_columns)
        summary = run_config_summary(self.config)

        def paper(rows):
            return {r: {c: v for c, v in cells.items() if c in cols} for r, cells in rows.items()}

        pretrained = self.method.pretrained_weights
        note = (
            ""
            if pretrained
            else " ('Pretrained' ran WITHOUT pretrained weights: method.pretrained_weights=none)"
        )
        return {
            "table1": ResultsTable(
                "table1_patch_auc",
                f"Table 1: patch-level AUC (%), labeled/total training images ({summary})",
                cols,
                paper=paper(PAPER_TABLE1),
                digits=1,
            ),
            "table2": ResultsTable(
                "table2_image_auc",
                f"Table 2: image-level AUC (%) of sum_j sigmoid(l_ij) ({summary})",
                cols,
                paper=paper(PAPER_TABLE2),
                digits=1,
            ),
            "table7": ResultsTable(
                "table7_direct_image_auc",
                f"Table 7: AUC (%) of direct image-level ResNet50{note} ({summary})",
                cols,
                paper=paper(PAPER_TABLE7),
                digits=1,
            ),
            "localisation": ResultsTable(
                "localisation_auc",
                "Sec. 4: pixel AUC (%) of the blurred patch-score maps against the lesion masks "
                f"(DR test images), all columns and samplings ({summary})",
                list(LOCALISATION_COLUMNS),
                paper={"SSL-GAN": {LOCALISATION_COLUMNS[1]: PAPER_LOCALISATION_GAIN}},
                digits=1,
            ),
            "accuracy": ResultsTable(
                "image_threshold_accuracy",
                "Image-level decision: threshold on the score chosen on the validation cohort, "
                f"test accuracy (%), all columns and samplings ({summary})",
                list(ACCURACY_COLUMNS),
                digits=1,
            ),
        }

    # ------------------------------------------------------------------------------ data

    def _groups(self, images: Sequence[CohortImage]):
        groups: Dict[Tuple[str, int], List[str]] = {}
        for image in images:
            groups.setdefault((image.split, image.label), []).append(image.id)
        return sorted(groups.items())

    def _patch_args(self) -> dict:
        m = self.method
        return dict(
            image_size=self.data.image_size,
            grid=m.grid,
            patch_size=m.patch_size,
            normalization=self.data.normalization,
            fov_crop=self.data.fov_crop,
        )

    def grid_order(self, images: Sequence[CohortImage]) -> List[str]:
        """The ids of ``images`` in the order :meth:`grid_dataset` yields them."""
        return [
            i for (split, _), ids in self._groups(images) for i in self._record_order(split, ids)
        ]

    def grid_dataset(self, images: Sequence[CohortImage], *, cache=False) -> tf.data.Dataset:
        """The patch grids of ``images`` (``patch_dataset``, mode ``images``), in batches of
        ``GRID_BATCH`` images, in :meth:`grid_order`; healthy images' patch labels are -1 here
        (:meth:`grids` makes them 0)."""
        parts = [
            pipeline.patch_dataset(
                self.records,
                split,
                mode="images",
                labeled=bool(label),
                ids=ids,
                shuffle=False,
                batch_size=GRID_BATCH,
                cache=_cache_part(cache, str(i)),
                **self._patch_args(),
            )
            for i, ((split, label), ids) in enumerate(self._groups(images))
        ]
        if not parts:
            raise ValueError("grid_dataset: no cohort images")
        data = parts[0]
        for part in parts[1:]:
            data = data.concatenate(part)
        return data

    def grids(self, images: Sequence[CohortImage], dataset=None) -> _Grids:
        """Patch grids and labels of ``images`` (healthy images: every patch 0), read from
        ``dataset`` (their :meth:`grid_dataset`; built here when not given)."""
        order = {c.id: i for i, c in enumerate(images)}
        label_of = {c.id: c.label for c in images}
        n = len(images)
        g2, p = self.method.grid**2, self.method.patch_size
        patches = np.zeros((n, g2, p, p, 3), np.float32)
        patch_labels = np.zeros((n, g2), np.int32)
        found = np.zeros(n, bool)
        rows = self.grid_order(images)
        dataset = self.grid_dataset(images) if dataset is None else dataset
        k = 0
        for grid, targets in dataset.as_numpy_iterator():
            for j in range(len(grid)):
                row = order[rows[k]]
                patches[row] = grid[j]
                if label_of[rows[k]]:
                    patch_labels[row] = targets[pipeline.PATCH_LABELS][j]
                found[row] = True
                k += 1
        if not found.all():
            missing = [images[i].id for i in np.flatnonzero(~found)][:5]
            raise ValueError(f"no records (with masks) found for cohort images {missing}")
        image_labels = np.array([c.label for c in images], np.int32)
        return _Grids(list(images), patches, patch_labels, image_labels)

    def _record_order(self, split: str, ids: Sequence[str]) -> List[str]:
        wanted = set(ids)
        all_ids = pipeline.read_labels(self.records, split)[keys.ID]
        return [i for i in all_ids if i in wanted]

    def patch_stream(
        self, images, *, labeled: bool, augment: bool, seed: int, cache=True
    ) -> tf.data.Dataset:
        """An endless shuffled stream of single ``(patch, label)`` of ``images``; label -1 for
        DR images when not ``labeled``, 0 for healthy images. ``cache``: of every pipeline
        (one per records split and image label)."""
        parts, weights = [], []
        for i, ((split, label), ids) in enumerate(self._groups(images)):
            ds = pipeline.patch_dataset(
                self.records,
                split,
                mode="patches",
                labeled=bool(label) and labeled,
                ids=ids,
                batch_size=64,
                augment=augment,
                shuffle=True,
                shuffle_buffer=PATCH_SHUFFLE,
                seed=seed,
                repeat=True,
                cache=_cache_part(cache, str(i)),
                **self._patch_args(),
            ).unbatch()
            if not label:
                ds = ds.map(lambda x, y: (x, tf.zeros_like(y)))
            parts.append(ds)
            weights.append(float(len(ids)))
        if len(parts) == 1:
            return parts[0]
        total = sum(weights)
        return tf.data.Dataset.sample_from_datasets(
            parts, weights=[w / total for w in weights], seed=seed
        )

    def gan_stream(self, labeled, train_images, seed: int, cache=True) -> tf.data.Dataset:
        """The SSL-GAN's batches ``({LABELED, UNLABELED}, labels)``: ``data.batch_size``
        labeled patches of ``labeled`` and as many unlabeled patches of ``train_images``."""
        batch = self.data.batch_size
        lab = self.patch_stream(
            labeled,
            labeled=True,
            augment=self.data.augment,
            seed=seed,
            cache=_cache_part(cache, "labeled"),
        )
        unl = self.patch_stream(
            train_images,
            labeled=False,
            augment=self.data.augment,
            seed=seed + 7,
            cache=_cache_part(cache, "unlabeled"),
        )
        data = tf.data.Dataset.zip(
            (lab.batch(batch, drop_remainder=True), unl.batch(batch, drop_remainder=True))
        ).map(lambda a, b: ({LABELED: a[0], UNLABELED: b[0]}, a[1]))
        return data.prefetch(tf.data.AUTOTUNE)

    def mask_dataset(self, dr_test: Sequence[CohortImage], *, cache=False) -> tf.data.Dataset:
        """Union lesion masks of ``dr_test`` at ``method.localisation_size``, in
        :meth:`grid_order`."""
        parts = [
            pipeline.segmentation_dataset(
                self.records,
                split,
                size=self.method.localisation_size,
                batch_size=MASK_BATCH,
                lesions=patch_ops.ABNORMAL_LESIONS,
                merge_lesions=True,
                fov_crop=self.data.fov_crop,
                shuffle=False,
                cache=_cache_part(cache, str(i)),
                ids=ids,
            )
            for i, ((split, _), ids) in enumerate(self._groups(dr_test))
        ]
        data = parts[0]
        for part in parts[1:]:
            data = data.concatenate(part)
        return data

    def _lesion_masks(self, test: _Grids, dataset=None) -> np.ndarray:
        """Union lesion masks ``[N_dr, S, S]`` of the DR test images, in their cohort order."""
        dr = [c for c in test.images if c.label == 1]
        size = self.method.localisation_size
        if not dr:
            return np.zeros((0, size, size), bool)
        order = self.grid_order(dr)
        dataset = self.mask_dataset(dr) if dataset is None else dataset
        masks, k = {}, 0
        for _, targets in dataset.as_numpy_iterator():
            for mask in targets[keys.MASKS]:
                masks[order[k]] = mask[..., 0] > 0
                k += 1
        return np.stack([masks[c.id] for c in dr])

    # ------------------------------------------------------------------------ the stages

    def cohort_parts(self) -> Dict[str, List[CohortImage]]:
        """The training / validation / test cohorts (from the records' labels only)."""
        m = self.method
        cohort = read_cohort(self.records)
        n_dr = sum(c.label for c in cohort)
        if n_dr == 0 or n_dr == len(cohort):
            raise ValueError(
                f"{self.records}: the cohort needs DR images with MA/HE/EX/SE masks and healthy "
                f"(grade 0) images; found {n_dr} DR and {len(cohort) - n_dr} healthy"
            )
        parts = split_cohort(cohort, m.cohort_split, seed=self.seed)
        log.info(
            "cohort: %d DR + %d healthy -> train %d, val %d, test %d",
            n_dr,
            len(cohort) - n_dr,
            *(len(parts[k]) for k in ("train", "val", "test")),
        )
        return parts

    def samplings(self, train: Sequence[CohortImage]) -> List[_Sampling]:
        """Every labeled subset, column by column: ``round(n/149 * N_train)`` training images,
        stratified, seeded by the sampling."""
        m = self.method
        train_ids = [c.id for c in train]
        train_labels = [c.label for c in train]
        out = []
        for column in m.label_columns:
            for sampling in range(m.samplings):
                chosen, _ = pipeline.fraction_split(
                    train_ids, column_fraction(column), seed=self.seed + sampling,
                    stratify=train_labels,
                )  # fmt: skip
                out.append(
                    _Sampling(
                        column=column,
                        sampling=sampling,
                        seed=self.seed + 1000 * sampling + COLUMNS.index(column),
                        index=tuple(train_ids.index(i) for i in chosen),
                        tag=f"{column.replace('/', 'of')}_s{sampling}",
                    )
                )
        return out

    def _grid_bytes(self, images: int) -> int:
        """Host bytes of the float32 patch grids and int32 patch labels of ``images``."""
        m = self.method
        return images * m.grid**2 * (m.patch_size**2 * 3 * 4 + 4)

    def _cohort_data(self, parts: Dict[str, List[CohortImage]]) -> List[Data]:
        """The datasets the ``cohort`` stage reads; what it holds of them is ``held_bytes``."""
        grid_side = self.method.grid * self.method.patch_size
        out = [
            Data(
                f"grids_{name}",
                build=lambda cache, images=parts[name]: self.grid_dataset(images, cache=cache),
                examples=len(parts[name]),
                size=grid_side,  # float32 grids: the prefetched batches' bytes at this side
                batch=GRID_BATCH,
                cached=False,  # read once into arrays
                held_bytes=self._grid_bytes(len(parts[name])),
            )
            for name in ("train", "val", "test")
        ]
        dr_test = [c for c in parts["test"] if c.label == 1]
        if dr_test:
            size = self.method.localisation_size
            out.append(
                Data(
                    "test_lesion_masks",
                    build=lambda cache: self.mask_dataset(dr_test, cache=cache),
                    examples=len(dr_test),
                    size=size,
                    masks=1,
                    batch=MASK_BATCH,
                    cached=False,
                    held_bytes=len(dr_test) * size * size,  # bool masks
                )
            )
        return out

    def read_cohort_stage(self, parts: Dict[str, List[CohortImage]]) -> _Cohort:
        train, val, test = (
            self.grids(parts[k], self.ctx.data(f"grids_{k}")) for k in ("train", "val", "test")
        )
        dr = any(c.label == 1 for c in test.images)
        masks = self._lesion_masks(test, self.ctx.data("test_lesion_masks") if dr else None)
        return _Cohort(train, val, test, masks)

    def _nets(self) -> Dict[str, Net]:
        """Every network of the run at the preset's width and input size (random weights)."""
        m, width = self.method, self.config.model.width
        patch = (m.patch_size, m.patch_size, 3)
        direct = self._direct_size()

        def discriminator(name):
            return lambda: nets.build_discriminator(input_shape=patch, width=width, name=name)

        return {
            "discriminator": Net("ssl_gan_discriminator", discriminator("ssl_gan_discriminator")),
            "ema": Net(
                "ssl_gan_discriminator_ema",
                discriminator("ssl_gan_discriminator_ema"),
                trainable=False,
                optimizer="none",
            ),
            "generator": Net("ssl_gan_generator", self._generator),
            "convnet": Net("convnet", discriminator("convnet")),
            "resnet34": Net(
                "resnet34",
                lambda: nets.build_resnet_patch_classifier(input_shape=patch, encoder_weights=None),
            ),
            "resnet50": Net(
                "resnet50",
                lambda: nets.build_resnet_image_classifier(
                    input_shape=(direct, direct, 3), encoder_weights=None
                ),
            ),
        }

    def stages(self) -> List[Stage]:
        m, g2 = self.method, self.method.grid**2
        parts = self.cohort_parts()
        train = parts["train"]
        declared = self._nets()
        cohort_data = self._cohort_data(parts)
        out = [Stage("cohort", run=lambda inputs: self.read_cohort_stage(parts), data=cohort_data)]
        batch = self.data.batch_size
        gan_steps = self.config.train.steps_per_epoch or math.ceil(len(train) * g2 / batch)
        for s in self.samplings(train):
            labeled = [train[i] for i in s.index]
            column = s.column.replace("/", "of")
            pipelines = len(self._groups(labeled)) + len(self._groups(train))
            gan_data = Data(
                f"{s.tag}_gan_patches",
                build=lambda cache, s=s, labeled=labeled: self.gan_stream(
                    labeled, train, s.seed, cache
                ),
                # the pipelines cache float32 patches (4 bytes a value): the bytes of uint8
                # images of side 2 * patch_size, one example per patch
                examples=(len(labeled) + len(train)) * g2,
                size=2 * m.patch_size,
                shuffle_buffer=PATCH_SHUFFLE * pipelines,
                batch=2 * batch,  # labeled + unlabeled patches per element
                train=True,
            )
            out.append(
                Stage(
                    f"{s.tag}_ssl_gan",
                    run=lambda inputs, s=s, steps=gan_steps: self.run_ssl_gan(
                        inputs["cohort"], s, steps
                    ),
                    nets=[declared["discriminator"], declared["ema"], declared["generator"]],
                    data=[gan_data],
                    steps=gan_steps,
                    epochs=self.config.train.epochs,
                    batch=batch,
                    consumes=("cohort",),
                    group=f"{column}_ssl_gan",
                )
            )
            patches = len(s.index) * g2
            for kind, row in (("convnet", "ConvNet"), ("resnet34", "ResNet34")):
                out.append(
                    Stage(
                        f"{s.tag}_{kind}",
                        run=lambda inputs, s=s, row=row: self.run_patch_baseline(
                            inputs["cohort"], s, row
                        ),
                        nets=[declared[kind]],
                        steps=self._baseline_steps(patches),
                        epochs=m.baseline_epochs,
                        batch=min(m.baseline_batch, patches),
                        consumes=("cohort",),
                        group=f"{column}_{kind}",
                    )
                )
            for row in ("Pretrained", "ResNet50"):
                kind = f"resnet50_{row.lower()}"
                out.append(
                    Stage(
                        f"{s.tag}_{kind}",
                        run=lambda inputs, s=s, row=row: self.run_direct(inputs["cohort"], s, row),
                        nets=[declared["resnet50"]],
                        steps=self._baseline_steps(len(s.index)),
                        epochs=m.baseline_epochs,
                        batch=min(m.baseline_batch, len(s.index)),
                        consumes=("cohort",),
                        group=f"{column}_{kind}",
                    )
                )
        if len(out) > 1:
            # The cohort's arrays stay in memory until the last network stage: declaring its
            # datasets there too keeps them (and their held_bytes) alive in the plan until then.
            out[-1].data = list(out[-1].data) + cohort_data
        return out

    def report(self) -> List[ResultsTable]:
        local = self._local
        tags = [t for t in local["SSL-GAN"] if all(t in local[row] for row in PATCH_ROWS)]
        if tags:
            ssl = np.array([local["SSL-GAN"][t] for t in tags])
            cnn = 0.5 * np.array([local["ConvNet"][t] + local["ResNet34"][t] for t in tags])
            log.info("localisation AUC: SSL-GAN %.1f vs CNN baselines %.1f", ssl.mean(),
                     cnn.mean())  # fmt: skip
            self.tables["localisation"].add("SSL-GAN", LOCALISATION_COLUMNS[1], ssl - cnn)
        if self.ctx.history_path.exists():
            plot_history(self.ctx.history_path, self.ctx.out_dir / "training_curves.png")
        return list(self.tables.values())

    # ---------------------------------------------------------------------------- training

    def _baseline_steps(self, examples: int) -> int:
        m = self.method
        return m.baseline_steps_per_epoch or max(1, examples // min(m.baseline_batch, examples))

    def _optimizer(self, name: str, steps_per_epoch: int):
        cfg = self.config.optimizers[name]
        if cfg.schedule == "linear_to_zero" and cfg.decay_steps == 0:
            epochs = self.config.train.epochs
            hold = min(self.method.lr_decay_start_epoch, epochs - 1)
            cfg = dataclasses.replace(
                cfg, hold_steps=hold * steps_per_epoch, decay_steps=epochs * steps_per_epoch
            )
        return build_optimizer(cfg)

    def _discriminator(self, name: str) -> keras.Model:
        m = self.method
        return nets.build_discriminator(
            input_shape=(m.patch_size, m.patch_size, 3), width=self.config.model.width, name=name
        )

    def _generator(self) -> keras.Model:
        m = self.method
        return nets.build_generator(
            latent_dim=m.latent_dim,
            start_size=m.gen_start_size,
            width=self.config.model.width,
            output_size=m.patch_size,
        )

    def train_ssl_gan(self, data, train: _Grids, seed: int, steps: int):
        """The SSL-GAN of the declared stage on ``data`` (:meth:`gan_stream`); returns its EMA
        discriminator."""
        m = self.method
        tf.keras.utils.set_random_seed(seed)
        with self.ctx.strategy.scope():
            trainer = PatchSSLGANTrainer(
                self._discriminator("ssl_gan_discriminator"),
                self._generator(),
                ema_discriminator=self._discriminator("ssl_gan_discriminator_ema"),
                noise_seed=seed,
            )
            trainer.compile(
                d_optimizer=self._optimizer("discriminator", steps),
                g_optimizer=self._optimizer("generator", steps),
                ema_decay=m.ema_decay,
                fm_norm=m.fm_norm,
                run_eagerly=m.run_eagerly,
            )
            trainer.initialize(self._init_patches(train, seed))
        self.ctx.fit(trainer, data, steps_per_epoch=steps)
        return trainer.ema_discriminator

    def run_ssl_gan(self, cohort: _Cohort, s: _Sampling, steps: int) -> None:
        log.info("column %s sampling %d: %d labeled images", s.column, s.sampling, len(s.index))
        net = self.train_ssl_gan(self.ctx.data(f"{s.tag}_gan_patches"), cohort.train, s.seed, steps)
        result = self._evaluate_row("SSL-GAN", net, cohort, s)
        if s.sampling == 0 and s.column == self._figure_column():
            self.figure(result, cohort.test, self._assemble(cohort.test))
        if s.sampling == 0 and s.column == self._export_column() and self.ctx.is_chief:
            self.export(net, cohort.test)

    def run_patch_baseline(self, cohort: _Cohort, s: _Sampling, row: str) -> None:
        m, train, val = self.method, cohort.train, cohort.val
        index = list(s.index)
        x_lab = train.patches[index].reshape((-1,) + train.patches.shape[2:])
        y_lab = train.patch_labels[index].ravel()
        val_x = val.patches.reshape((-1,) + val.patches.shape[2:])
        val_y = val.patch_labels.ravel()
        if row == "ConvNet":
            build, init = (lambda: self._discriminator("convnet")), True
        else:
            build = lambda: nets.build_resnet_patch_classifier(  # noqa: E731
                input_shape=(m.patch_size, m.patch_size, 3),
                encoder_weights=m.resnet34_weights,
                weights_option=RESNET34_WEIGHTS,
            )
            init = False
        net = self.train_supervised(
            build, x_lab, y_lab, val_x, val_y, s.seed, init=init,
            augmentation=SUPERVISED_AUGMENTATION[row],
        )  # fmt: skip
        self._evaluate_row(row, net, cohort, s)

    def run_direct(self, cohort: _Cohort, s: _Sampling, row: str) -> None:
        """Table 7: ResNet50 on whole images (``Pretrained``: ``method.pretrained_weights``)."""
        index = list(s.index)
        weights = self.method.pretrained_weights if row == "Pretrained" else None
        x_train = self._direct_images(cohort.train.patches[index])
        x_val = self._direct_images(cohort.val.patches)
        shape = x_train.shape[1:]
        net = self.train_supervised(
            lambda: nets.build_resnet_image_classifier(
                input_shape=shape, encoder_weights=weights,
                weights_option=PRETRAINED_WEIGHTS,
            ),
            x_train, cohort.train.image_labels[index].astype(np.float32), x_val,
            cohort.val.image_labels.astype(np.float32), s.seed,
            augmentation=SUPERVISED_AUGMENTATION["ResNet50"],
        )  # fmt: skip
        del x_train, x_val
        logits = self._predict(net, self._direct_images(cohort.test.patches)[:, None])[:, 0]
        self.tables["table7"].add(
            row, s.column, 100 * metrics.roc_auc(cohort.test.image_labels, logits)
        )

    def _evaluate_row(self, row: str, net, cohort: _Cohort, s: _Sampling) -> dict:
        result = self.evaluate_patches(net, cohort.val, cohort.test, cohort.masks)
        self.tables["table1"].add(row, s.column, result["patch_auc"])
        self.tables["table2"].add(row, s.column, result["image_auc"])
        self.tables["accuracy"].add(row, ACCURACY_COLUMNS[0], result["threshold"])
        self.tables["accuracy"].add(row, ACCURACY_COLUMNS[1], result["accuracy"])
        self.tables["localisation"].add(row, LOCALISATION_COLUMNS[0], result["localisation_auc"])
        self._local[row][s.tag] = result["localisation_auc"]
        return result

    def _init_patches(self, train: _Grids, seed: int) -> np.ndarray:
        flat = train.patches.reshape((-1,) + train.patches.shape[2:])
        rng = np.random.default_rng(seed)
        take = rng.choice(len(flat), min(self.method.init_batch, len(flat)), replace=False)
        return flat[np.sort(take)]

    def _class_weight(self, labels: np.ndarray) -> Dict[int, float]:
        counts = np.bincount(np.asarray(labels).astype(np.int64).ravel(), minlength=2).astype(float)
        present = counts > 0
        weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
        return {0: float(weights[0]), 1: float(weights[1])}

    def train_supervised(
        self,
        build,
        x_train,
        y_train,
        x_val,
        y_val,
        seed: int,
        init: bool = False,
        augmentation: str = "table5",
    ) -> keras.Model:
        """Table 5's recipe for a classifier with output ``patch_logits``, trained in the
        declared stage on the in-memory arrays (slices of the cohort's held grids); returns it.

        ``augmentation``: a recipe of :func:`supervised_augmentation` (``SUPERVISED_AUGMENTATION``
        says which network gets which)."""
        m = self.method
        tf.keras.utils.set_random_seed(seed)
        with self.ctx.strategy.scope():
            classifier = build()
            if init:
                initialize = x_train[: m.init_batch]
                nets.initialize_weight_norm(classifier, initialize)
            inputs = keras.Input(classifier.input_shape[1:], name="train_input")
            augmented = supervised_augmentation(augmentation, classifier.input_shape[1])(inputs)
            logit = classifier(augmented)[keys.PATCH_LOGITS]
            logit = keras.layers.Reshape((1,), name="logit")(logit)
            model = keras.Model(inputs, logit, name=f"{classifier.name}_training")
            model.compile(
                optimizer=build_optimizer(self.config.optimizers["baseline"]),
                loss=keras.losses.BinaryCrossentropy(from_logits=True),
                run_eagerly=m.run_eagerly,
            )
        batch = min(m.baseline_batch, len(x_train))
        train = (
            tf.data.Dataset.from_tensor_slices((x_train, y_train[:, None].astype(np.float32)))
            .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
            .repeat()
            .batch(batch, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        val = tf.data.Dataset.from_tensor_slices((x_val, y_val[:, None].astype(np.float32))).batch(
            256
        )
        steps = m.baseline_steps_per_epoch or max(1, len(x_train) // batch)
        callbacks = [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=m.patience_stop, restore_best_weights=True
            ),
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=m.lr_factor, patience=m.patience_lr
            ),
        ]
        self.ctx.fit(
            model,
            train,
            epochs=m.baseline_epochs,
            steps_per_epoch=steps,
            callbacks=callbacks,
            validation_data=val,
            class_weight=self._class_weight(y_train),
        )
        return classifier

    # -------------------------------------------------------------------------- evaluation

    def _assemble(self, grids: _Grids) -> np.ndarray:
        """Patch grids back to whole images ``[N, G*P, G*P, 3]`` (row-major grid)."""
        return self._assemble_patches(grids.patches)

    def _assemble_patches(self, patches: np.ndarray) -> np.ndarray:
        g, p = self.method.grid, self.method.patch_size
        x = patches.reshape(-1, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, g * p, g * p, 3)

    def evaluate_patches(self, model, val: _Grids, test: _Grids, masks: np.ndarray) -> dict:
        logits = self._predict(model, test.patches)
        threshold = choose_threshold(
            metrics.image_scores_from_patches(self._predict(model, val.patches)),
            val.image_labels,
        )
        scores = metrics.image_scores_from_patches(logits)
        g = self.method.grid
        dr = test.image_labels == 1
        probs = 1.0 / (1.0 + np.exp(-logits[dr].reshape(-1, g, g)))
        maps = localisation_map(probs, self.method.localisation_size, blur=self.method.blur)
        return {
            "patch_auc": 100 * metrics.patch_auc(logits, test.patch_labels),
            "image_auc": 100 * metrics.image_auc(logits, test.image_labels),
            "threshold": threshold,
            "accuracy": 100 * float(np.mean((scores > threshold) == (test.image_labels == 1))),
            "localisation_auc": 100 * metrics.roc_auc(masks.ravel(), maps.ravel()),
            "logits": logits,
            "scores": scores,
        }

    def figure(self, result: dict, test: _Grids, images: np.ndarray) -> None:
        g = self.method.grid
        order = np.argsort(-test.image_labels, kind="stable")  # DR images first, then healthy
        shown = list(order[: self.method.figure_images])
        if self.method.figure_images > 1 and (test.image_labels == 0).any():
            shown[-1] = int(np.flatnonzero(test.image_labels == 0)[0])
        for i in shown:
            score, label = float(result["scores"][i]), int(test.image_labels[i])
            predicted = int(score > result["threshold"])
            verdict = "correct" if predicted == label else "wrong"
            probs = 1.0 / (1.0 + np.exp(-result["logits"][i].reshape(g, g)))
            plot_patch_scores(
                images[i],
                probs,
                self.ctx.out_dir / f"fig2_patch_scores_{test.images[i].id.rsplit('-', 1)[-1]}.png",
                blur=self.method.blur,
                title=(
                    f"{test.images[i].id} ({'DR' if label else 'healthy'}): score {score:.1f} vs "
                    f"threshold {result['threshold']:.1f} -> {'DR' if predicted else 'healthy'} "
                    f"({verdict})"
                ),
            )

    def export(self, discriminator: keras.Model, test: _Grids) -> None:
        """``export/ssl_gan`` (photograph -> patch grid -> scores) and ``export/ssl_gan_patches``
        (prepared patches), reload-checked. The photograph export serves the evaluation
        transform of ``grids`` (:func:`drkeras.data.patches.patch_example`: field of view
        resized, no uint8 rounding, whole-image ``data.normalization``), hence ``quantize``
        off and no Graham."""
        scorer = nets.build_image_scorer(
            discriminator, image_size=self.data.image_size, grid=self.method.grid
        )
        path = export_model(
            scorer,
            self.ctx.export_dir / "ssl_gan",
            image_size=self.data.image_size,
            preprocess={
                "fov_crop": self.data.fov_crop,
                "graham": False,
                "normalization": self.data.normalization,
                "quantize": False,  # patch_example keeps the resized image in float
            },
            output_names=[keys.PATCH_LOGITS, nets.PATCH_PROBS, keys.IMAGE_SCORE],
        )
        log.info("exported the SSL-GAN image scorer to %s", path)
        report = export_patch_classifier(
            discriminator,
            self.ctx.export_dir / "ssl_gan_patches",
            normalization=self.data.normalization,
            sample=test.patches[0],
        )
        log.info("exported the SSL-GAN patch classifier (check %s)", report)

    def _predict(self, model, patches) -> np.ndarray:
        return predict_patch_logits(model, patches, eager=self.method.run_eagerly)

    def _direct_size(self) -> int:
        m = self.method
        return m.direct_image_size or m.grid * m.patch_size

    def _direct_images(self, patches: np.ndarray) -> np.ndarray:
        """Table 7's whole images of patch grids ``[N, G*G, P, P, 3]`` (the grid put back
        together, area-averaged to ``method.direct_image_size``)."""
        images = self._assemble_patches(patches)
        size = self.method.direct_image_size
        if size and size != images.shape[1]:
            images = tf.image.resize(images, [size, size], method="area").numpy()
        return images

    def _figure_column(self) -> str:
        m = self.method
        return m.figure_column if m.figure_column in m.label_columns else m.label_columns[0]

    def _export_column(self) -> str:
        m = self.method
        return m.export_column if m.export_column in m.label_columns else m.label_columns[0]


class SSLGAN(Experiment):
    """The patch SSL-GAN experiment: Tables 1, 2 and 7, Fig. 2 (see the module docstring).

    Example::

        from experiments.ssl_gan import SSLGAN, main
        main(SSLGAN(), ["--preset", "smoke", "--set", "method.samplings=1", "--out", "runs/x"])
    """

    name = "ssl_gan"
    title = "Patch-based semi-supervised GAN for DR abnormality classification (Lecouat 2018)"
    presets = {"smoke": SMOKE, "mini": MINI, "paper": PAPER}

    def pretrained_weights(self, config: Config) -> list:
        """The pretrained files ``config`` loads (the ResNet34 patch baseline's and Table 7's
        ResNet50's); see :mod:`drkeras.weights`."""
        return _pretrained_files(config.method)

    def prepare(self, ctx: RunContext) -> _Run:
        return _Run(ctx)


if __name__ == "__main__":
    raise SystemExit(main(SSLGAN()))
