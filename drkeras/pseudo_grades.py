"""Stage 1 of PLDMLT: DR-grade pseudo labels for pixel-level-labelled images (sections 3.1, 4.2).

The segmentation datasets (IDRiD-S, DiaRetDB1, DDR lesion masks) have lesion masks but no grades.
PLDMLT gives them grades in three steps:

1. **Predict.** Two graders pre-trained on IDRiD-D (ResNeXt-101 and ResNeXt-50 in the paper; built
   by ``drkeras.models.baselines.build_grader`` and passed in as models here) predict grade
   probabilities for every image (:func:`predict_grade_probs`).
2. **Select.** For each image, the prediction of the more confident grader (higher top
   probability) is the initial pseudo grade (:func:`select_confident`).
3. **Refine.** Grad-CAM maps of every grade (:mod:`drkeras.explain.gradcam`) are compared with the
   image's lesion masks and the grading rules of section 3.1 accept or change the pseudo grade
   (:func:`refine_pseudo_grades`; the rule is written out there).

:func:`generate_pseudo_grades` runs the three steps. The refined grades are the initial labels
``y_hat`` of stage 2 and the allowed-grade sets are the binary mask ``M`` of its mask softmax
(Eq. 4, :func:`drkeras.models.pldmlt.masked_softmax`).
"""

from __future__ import annotations

import itertools
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from drkeras import keys
from drkeras.explain.gradcam import GradCAM

__all__ = [
    "SEVERITY_LESIONS",
    "cam_lesion_overlap",
    "generate_pseudo_grades",
    "lesion_consistent_grades",
    "lesion_presence",
    "predict_grade_probs",
    "refine_pseudo_grades",
    "select_confident",
]

# Lesions that grade DR severity; the optic disc (keys.LESIONS[-1]) is anatomy, not a DR sign.
SEVERITY_LESIONS = ("MA", "HE", "EX", "SE")
_SEVERITY_CHANNELS = [keys.LESIONS.index(name) for name in SEVERITY_LESIONS]


def predict_grade_probs(
    model: tf.keras.Model, images, *, output: Optional[str] = None, batch_size: int = 8
) -> np.ndarray:
    """Grade probabilities ``[N, num_grades]`` of a grader (or a multi-task network).

    Args:
        model: a Keras model whose output (or dict output ``output``, default
            ``drkeras.keys.GRADE_PROBS`` for dict-output models) holds grade probabilities.
        images: ``[N, H, W, 3]`` inputs as the model consumes them.
        output: the dict key to read; ``None`` picks ``GRADE_PROBS`` for dict outputs.
        batch_size: images per forward pass.

    Example::

        probs = predict_grade_probs(resnext50_grader, images)   # PLDMLT section 3.1, step 1
    """
    chunks = []
    for start in range(0, int(images.shape[0]), batch_size):
        out = model(images[start : start + batch_size], training=False)
        if isinstance(out, dict):
            key = output or keys.GRADE_PROBS
            if key not in out:
                raise ValueError(
                    f"model {model.name!r} has outputs {sorted(out)}, not {key!r}; pass output="
                )
            out = out[key]
        chunks.append(np.asarray(out, np.float32))
    probs = np.concatenate(chunks, axis=0)
    if probs.ndim != 2:
        raise ValueError(
            f"model {model.name!r} must output grade probabilities [N, grades], got {probs.shape}"
        )
    return probs


def select_confident(probs_per_model: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """Per image, keep the prediction of the most confident model (highest top probability).

    PLDMLT section 3.1: "the pseudo label with the highest confidence in the pseudo label
    predicted by the two models is selected". Ties go to the earlier model.

    Args:
        probs_per_model: one ``[N, C]`` probability array per model.

    Returns:
        dict with ``grades`` [N] int, ``probs`` [N, C] of the chosen model, ``confidence`` [N]
        (its top probability) and ``source`` [N] (index of the chosen model).

    Example::

        >>> out = select_confident([np.array([[0.6, 0.4]]), np.array([[0.1, 0.9]])])
        >>> int(out["grades"][0]), int(out["source"][0])
        (1, 1)
    """
    stacked = np.stack([np.asarray(p, np.float32) for p in probs_per_model])
    if stacked.ndim != 3:
        raise ValueError(f"expected a list of [N, C] arrays, got shape {stacked.shape}")
    confidence = stacked.max(axis=-1)
    source = np.argmax(confidence, axis=0)
    rows = np.arange(stacked.shape[1])
    probs = stacked[source, rows]
    return {
        "grades": np.argmax(probs, axis=-1).astype(np.int32),
        "probs": probs,
        "confidence": confidence[source, rows],
        "source": source.astype(np.int32),
    }


def _check_masks(masks) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 4 or masks.shape[-1] != keys.NUM_LESIONS:
        raise ValueError(
            f"lesion masks must be [N, H, W, {keys.NUM_LESIONS}] in the record order "
            f"{keys.LESIONS}; got shape {masks.shape}"
        )
    return masks


def lesion_presence(masks, *, min_pixels: int = 1) -> np.ndarray:
    """Which severity lesions an image shows: ``[N, 4]`` bool in the order MA, HE, EX, SE.

    A lesion kind is present when its mask has at least ``min_pixels`` non-zero pixels.

    Args:
        masks: ``[N, H, W, 5]`` lesion masks in the record order ``drkeras.keys.LESIONS``.
        min_pixels: smallest lesion area (in pixels) counted as present.

    Example::

        present = lesion_presence(batch["masks"], min_pixels=4)
    """
    masks = _check_masks(masks)
    area = np.count_nonzero(masks[..., _SEVERITY_CHANNELS], axis=(1, 2))
    return area >= min_pixels


def _grades_for_pattern(present: Sequence[bool], severe_min_kinds: int, num_grades: int):
    allowed = np.zeros(num_grades, bool)
    kinds = int(np.sum(present))
    if kinds == 0:
        allowed[0] = True
    elif kinds == 1 and present[0]:
        allowed[1] = True
    else:
        allowed[2] = True
        if kinds >= severe_min_kinds:
            allowed[3:] = True
    return allowed


def lesion_consistent_grades(
    present,
    annotated=None,
    *,
    severe_min_kinds: int = 3,
    num_grades: int = keys.NUM_GRADES,
) -> np.ndarray:
    """Grades the lesion kinds allow, ``[N, num_grades]`` bool (PLDMLT section 3.1).

    With ``n`` the number of severity lesion kinds present (MA, HE, EX, SE):

    - ``n = 0`` -> {0} (no DR lesions);
    - only microaneurysms -> {1};
    - any other lesion kind (not only MA) -> {2}, plus {3, 4} when ``n >= severe_min_kinds``
      (grades 3 and 4 "show more than [grade 2] in terms of the number of DR lesion categories").

    A kind whose mask was not annotated (``annotated`` False) may be present or absent: the
    allowed set is the union over both cases.

    Args:
        present: ``[N, 4]`` bool from :func:`lesion_presence`.
        annotated: optional ``[N, 4]`` (or record-order ``[N, 5]``) bool annotation flags.
        severe_min_kinds: lesion kinds needed before grades 3-4 are allowed.
        num_grades: number of grades (5 for ICDRS).

    Example::

        >>> lesion_consistent_grades(np.array([[True, False, False, False]])).astype(int)
        array([[0, 1, 0, 0, 0]])
    """
    present = np.asarray(present, bool)
    if present.ndim != 2 or present.shape[1] != len(SEVERITY_LESIONS):
        raise ValueError(f"present must be [N, 4] (MA, HE, EX, SE), got {present.shape}")
    if annotated is None:
        annotated = np.ones_like(present)
    annotated = np.asarray(annotated, bool)
    if annotated.shape[-1] == keys.NUM_LESIONS:
        annotated = annotated[:, _SEVERITY_CHANNELS]
    if annotated.shape != present.shape:
        raise ValueError(f"annotated must be [N, 4] or [N, 5], got {annotated.shape}")
    patterns = np.array(list(itertools.product([False, True], repeat=len(SEVERITY_LESIONS))))
    table = np.stack([_grades_for_pattern(p, severe_min_kinds, num_grades) for p in patterns])
    # A pattern is compatible when it agrees with every annotated kind.
    compatible = np.all(
        (patterns[None] == present[:, None]) | ~annotated[:, None], axis=-1
    )  # [N, 16]
    return np.any(compatible[..., None] & table[None], axis=1)


def cam_lesion_overlap(cams, masks, *, cam_threshold: float = 0.5) -> np.ndarray:
    """Fraction of each grade's sensitive CAM region lying on lesions, ``[N, C]`` in [0, 1].

    For grade ``c`` the sensitive region is ``S_c = {p : CAM_c(p) >= cam_threshold}`` and the
    score is ``|S_c & L| / |S_c|`` with ``L`` the union of the MA, HE, EX and SE masks (0 when
    ``S_c`` is empty). A map attending to the optic disc or to background scores low (Fig. 6:
    "levels 0 and 2 have fundus image optic discs as a grading guide").

    Args:
        cams: ``[N, C, H, W]`` Grad-CAM maps in [0, 1] (:meth:`GradCAM.all_classes`).
        masks: ``[N, h, w, 5]`` record-order lesion masks; resized (nearest) to ``H x W`` if
            needed.
        cam_threshold: CAM value from which a pixel is "sensitive".

    Example::

        overlap = cam_lesion_overlap(cam.all_classes(images), masks, cam_threshold=0.5)
    """
    cams = np.asarray(cams, np.float32)
    masks = _check_masks(masks)
    if cams.ndim != 4 or cams.shape[0] != masks.shape[0]:
        raise ValueError(
            f"cams must be [N, C, H, W] for the {masks.shape[0]} masks, got shape {cams.shape}"
        )
    lesions = np.any(masks[..., _SEVERITY_CHANNELS] > 0, axis=-1)
    if lesions.shape[1:] != cams.shape[2:]:
        lesions = (
            tf.image.resize(lesions[..., None].astype(np.uint8), cams.shape[2:], method="nearest")
            .numpy()[..., 0]
            .astype(bool)
        )
    sensitive = cams >= cam_threshold
    on_lesions = np.count_nonzero(sensitive & lesions[:, None], axis=(2, 3))
    area = np.count_nonzero(sensitive, axis=(2, 3))
    return np.where(area > 0, on_lesions / np.maximum(area, 1), 0.0)


def refine_pseudo_grades(
    pseudo_grades,
    probs,
    masks,
    cams=None,
    mask_present=None,
    *,
    min_pixels: int = 1,
    severe_min_kinds: int = 3,
    cam_threshold: float = 0.5,
    min_overlap: float = 0.2,
) -> Dict[str, np.ndarray]:
    """Accept or change each pseudo grade by the lesion masks and the CAMs (PLDMLT 3.1, 4.2).

    The rule, per image:

    1. Lesion kinds: MA, HE, EX, SE are present when their masks have ``>= min_pixels`` pixels
       (:func:`lesion_presence`; the optic disc is not a lesion).
    2. Lesion-consistent grades ``G_L`` (:func:`lesion_consistent_grades`): no lesion -> {0};
       MA only -> {1}; otherwise {2}, plus {3, 4} when ``>= severe_min_kinds`` kinds are present.
       Kinds not annotated (``mask_present`` False) count as unknown (union of both cases).
    3. CAM-supported grades ``G_C`` (skipped when ``cams`` is None): grades ``c >= 1`` whose
       sensitive region (``CAM_c >= cam_threshold``) lies on lesions for at least a fraction
       ``min_overlap`` (:func:`cam_lesion_overlap`). Grade 0 is never CAM-supported: it means
       "no lesions", which step 2 decides.
    4. Allowed grades ``G = G_L & G_C``, or ``G_L`` when that intersection is empty (the maps
       are evidence, the masks are ground truth).
    5. The pseudo grade is accepted if it is in ``G``; otherwise it becomes the grade of ``G``
       with the highest predicted probability.

    Fig. 6 of the paper is one example: the CAMs of grades 3 and 4 lie on the lesions while 0
    and 2 look at the optic disc and 1 barely touches a lesion, so ``G = {3, 4}`` and the
    predicted grade 4 is accepted.

    Args:
        pseudo_grades: ``[N]`` initial grades (:func:`select_confident`).
        probs: ``[N, C]`` probabilities of the grader that chose each grade.
        masks: ``[N, H, W, 5]`` record-order lesion masks.
        cams: optional ``[N, C, H, W]`` Grad-CAM maps of every grade.
        mask_present: optional ``[N, 5]`` annotation flags of the record.
        min_pixels, severe_min_kinds, cam_threshold, min_overlap: the thresholds above.

    Returns:
        dict of arrays: ``grades`` [N] (refined), ``accepted`` [N] bool, ``allowed`` [N, C] bool
        (the mask ``M`` of Eq. 4 in stage 2), ``lesion_allowed`` [N, C], ``cam_supported``
        [N, C] (all False without CAMs) and ``overlap`` [N, C] (zeros without CAMs).

    Example::

        refined = refine_pseudo_grades(sel["grades"], sel["probs"], masks, cams)
    """
    pseudo = np.asarray(pseudo_grades, np.int64).reshape(-1)
    probs = np.asarray(probs, np.float32)
    count, num_grades = probs.shape
    if pseudo.shape[0] != count or np.any((pseudo < 0) | (pseudo >= num_grades)):
        raise ValueError(
            f"pseudo_grades must be {count} grades in [0, {num_grades}), got {pseudo.tolist()}"
        )
    present = lesion_presence(masks, min_pixels=min_pixels)
    lesion_allowed = lesion_consistent_grades(
        present, mask_present, severe_min_kinds=severe_min_kinds, num_grades=num_grades
    )
    overlap = np.zeros((count, num_grades), np.float32)
    cam_supported = np.zeros((count, num_grades), bool)
    allowed = lesion_allowed.copy()
    if cams is not None:
        overlap = cam_lesion_overlap(cams, masks, cam_threshold=cam_threshold).astype(np.float32)
        cam_supported = overlap >= min_overlap
        cam_supported[:, 0] = False
        both = lesion_allowed & cam_supported
        allowed = np.where(both.any(axis=1, keepdims=True), both, lesion_allowed)
    rows = np.arange(count)
    accepted = allowed[rows, pseudo]
    best_allowed = np.argmax(np.where(allowed, probs, -np.inf), axis=1)
    grades = np.where(accepted, pseudo, best_allowed).astype(np.int32)
    return {
        "grades": grades,
        "accepted": accepted,
        "allowed": allowed,
        "lesion_allowed": lesion_allowed,
        "cam_supported": cam_supported,
        "overlap": overlap,
    }


def generate_pseudo_grades(
    graders: Sequence[tf.keras.Model],
    images,
    masks,
    mask_present=None,
    *,
    output: Optional[str] = None,
    layer_names: Optional[Sequence[Optional[str]]] = None,
    batch_size: int = 8,
    use_cams: bool = True,
    **rule_thresholds,
) -> Dict[str, np.ndarray]:
    """Stage 1 of PLDMLT end to end: predict, keep the more confident, refine with CAMs.

    Args:
        graders: pre-trained grading models (ResNeXt-101 and ResNeXt-50 in the paper).
        images: ``[N, H, W, 3]`` inputs as the graders consume them.
        masks: ``[N, H', W', 5]`` record-order lesion masks of the same images.
        mask_present: optional ``[N, 5]`` annotation flags.
        output: output key for dict-output graders.
        layer_names: Grad-CAM layer per grader (``None`` entries: auto-pick).
        batch_size: images per forward pass.
        use_cams: refine with Grad-CAM (False: lesion rules only).
        **rule_thresholds: ``min_pixels``, ``severe_min_kinds``, ``cam_threshold``,
            ``min_overlap`` of :func:`refine_pseudo_grades`.

    Returns:
        the dict of :func:`refine_pseudo_grades` plus ``initial_grades``, ``probs``,
        ``confidence``, ``source`` (:func:`select_confident`) and ``cams`` ([N, C, H, W], the
        maps of each image's chosen grader; absent with ``use_cams=False``) for Fig. 6.

    Example::

        stage1 = generate_pseudo_grades([resnext101, resnext50], images, masks)
        labels, grade_mask = stage1["grades"], stage1["allowed"]
    """
    if not graders:
        raise ValueError("generate_pseudo_grades needs at least one grader")
    layer_names = list(layer_names) if layer_names is not None else [None] * len(graders)
    if len(layer_names) != len(graders):
        raise ValueError(f"{len(layer_names)} layer_names for {len(graders)} graders")
    images = np.asarray(images)
    probs = [predict_grade_probs(g, images, output=output, batch_size=batch_size) for g in graders]
    chosen = select_confident(probs)
    cams = None
    if use_cams:
        cams = np.zeros((images.shape[0], chosen["probs"].shape[1]) + images.shape[1:3], np.float32)
        for index, (grader, layer) in enumerate(zip(graders, layer_names)):
            rows = np.flatnonzero(chosen["source"] == index)
            if rows.size:
                explainer = GradCAM(grader, output=_grade_output(grader, output), layer_name=layer)
                cams[rows] = explainer.all_classes(images[rows], batch_size=batch_size)
    refined = refine_pseudo_grades(
        chosen["grades"], chosen["probs"], masks, cams, mask_present, **rule_thresholds
    )
    refined.update(
        initial_grades=chosen["grades"],
        probs=chosen["probs"],
        confidence=chosen["confidence"],
        source=chosen["source"],
    )
    if cams is not None:
        refined["cams"] = cams
    return refined


def _grade_output(model: tf.keras.Model, output: Optional[str]) -> Optional[str]:
    if output is not None or not isinstance(model.output, dict):
        return output
    return keys.GRADE_PROBS
