"""PLDMLT stage 1: confident-model selection and the lesion/CAM refinement rule, exact cases."""

import numpy as np
import pytest
from tensorflow import keras

from drkeras import keys
from drkeras.explain.gradcam import GradCAM
from drkeras.pseudo_grades import (
    cam_lesion_overlap,
    generate_pseudo_grades,
    lesion_consistent_grades,
    lesion_presence,
    predict_grade_probs,
    refine_pseudo_grades,
    select_confident,
)

MA, HE, EX, SE, OD = (keys.LESIONS.index(n) for n in ("MA", "HE", "EX", "SE", "OD"))


def _masks(n=1, size=8):
    return np.zeros((n, size, size, keys.NUM_LESIONS), np.uint8)


def test_select_confident():
    a = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.5, 0.0]])
    b = np.array([[0.1, 0.8, 0.1], [0.4, 0.3, 0.3], [0.0, 0.5, 0.5]])
    out = select_confident([a, b])
    np.testing.assert_array_equal(out["source"], [1, 0, 0])  # the tie goes to the first model
    np.testing.assert_array_equal(out["grades"], [1, 2, 0])
    np.testing.assert_allclose(out["confidence"], [0.8, 0.6, 0.5])
    np.testing.assert_allclose(out["probs"], np.stack([b[0], a[1], a[2]]))


def test_lesion_presence_counts_pixels_and_ignores_optic_disc():
    masks = _masks(2)
    masks[0, :2, :2, MA] = 1  # 4 pixels
    masks[0, 5, 5, HE] = 1  # 1 pixel
    masks[1, :, :, OD] = 1
    np.testing.assert_array_equal(lesion_presence(masks), [[True, True, False, False], [False] * 4])
    np.testing.assert_array_equal(
        lesion_presence(masks, min_pixels=2), [[True, False, False, False], [False] * 4]
    )
    with pytest.raises(ValueError, match="record order"):
        lesion_presence(np.zeros((1, 8, 8, 4)))


@pytest.mark.parametrize(
    "present, severe_min_kinds, expected",
    [
        ([0, 0, 0, 0], 3, [1, 0, 0, 0, 0]),  # no lesion: grade 0
        ([1, 0, 0, 0], 3, [0, 1, 0, 0, 0]),  # microaneurysms only: grade 1
        ([1, 1, 0, 0], 3, [0, 0, 1, 0, 0]),  # MA and more, two kinds: grade 2
        ([0, 0, 1, 0], 3, [0, 0, 1, 0, 0]),  # not only MA: at least grade 2
        ([1, 1, 1, 0], 3, [0, 0, 1, 1, 1]),  # three kinds: grades 2-4
        ([1, 1, 1, 1], 3, [0, 0, 1, 1, 1]),
        ([1, 1, 0, 0], 2, [0, 0, 1, 1, 1]),  # the threshold is an argument
        ([1, 0, 0, 0], 1, [0, 1, 0, 0, 0]),  # MA alone stays grade 1 whatever the threshold
    ],
)
def test_lesion_consistent_grades(present, severe_min_kinds, expected):
    got = lesion_consistent_grades(np.array([present], bool), severe_min_kinds=severe_min_kinds)
    np.testing.assert_array_equal(got[0].astype(int), expected)


def test_unannotated_lesions_allow_both_cases():
    present = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
    annotated = np.array(
        [[1, 1, 1, 0, 1], [0, 0, 0, 0, 1], [1, 1, 1, 0, 1]], bool
    )  # record order, SE (and more) missing
    got = lesion_consistent_grades(present, annotated).astype(int)
    np.testing.assert_array_equal(got[0], [0, 1, 1, 0, 0])  # MA only, or MA + SE
    np.testing.assert_array_equal(got[1], [1, 1, 1, 1, 1])  # nothing known
    np.testing.assert_array_equal(got[2], [0, 0, 1, 1, 1])  # MA + HE, maybe + SE (3 kinds)


def test_cam_lesion_overlap_exact():
    masks = _masks(1, size=4)
    masks[0, 0, :2, EX] = 1  # lesion pixels (0, 0) and (0, 1)
    masks[0, 3, 3, OD] = 1  # not a lesion
    cams = np.zeros((1, 3, 4, 4), np.float32)
    cams[0, 0, 0, 0:4] = 0.9  # 4 sensitive pixels, 2 on the lesion -> 0.5
    cams[0, 1, 3, 3] = 1.0  # only the optic disc -> 0
    cams[0, 2] = 0.4  # nothing reaches the threshold -> 0
    np.testing.assert_allclose(cam_lesion_overlap(cams, masks), [[0.5, 0.0, 0.0]])
    np.testing.assert_allclose(cam_lesion_overlap(cams, masks, cam_threshold=0.3)[0, 2], 2 / 16)
    # Masks at twice the CAM resolution are resized (nearest) to it.
    big = np.repeat(np.repeat(masks, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(
        cam_lesion_overlap(np.repeat(np.repeat(cams, 2, 2), 2, 3), big), [[0.5, 0.0, 0.0]]
    )


def _fig6_case():
    """Fig. 6 of the paper: MA, HE and EX in the top rows, the optic disc bottom right."""
    masks = _masks(1, size=8)
    masks[0, 0, 0, MA] = 1
    masks[0, 0:2, 2:4, HE] = 1
    masks[0, 1:3, 5:7, EX] = 1
    masks[0, 6:8, 6:8, OD] = 1
    cams = np.zeros((1, 5, 8, 8), np.float32)
    cams[0, 0, 6:8, 6:8] = 1.0  # grade 0 looks at the optic disc
    cams[0, 1, 0:4, 0:4] = 1.0  # grade 1: 5 of 16 pixels on lesions (0.3125)
    cams[0, 2, 5:8, 5:8] = 1.0  # grade 2: mostly the optic disc (0 of 9)
    cams[0, 3, 0:2, 2:4] = 1.0  # grade 3 on the haemorrhage (1.0)
    cams[0, 4, 1:3, 5:7] = 1.0  # grade 4 on the exudate (1.0)
    return masks, cams


def test_refine_fig6_accepts_grade_four():
    masks, cams = _fig6_case()
    probs = np.array([[0.05, 0.05, 0.1, 0.2, 0.6]])
    out = refine_pseudo_grades([4], probs, masks, cams, min_overlap=0.4)
    np.testing.assert_allclose(out["overlap"][0], [0.0, 5 / 16, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(out["lesion_allowed"][0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(out["cam_supported"][0], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(out["allowed"][0], [0, 0, 0, 1, 1])
    assert out["accepted"][0] and out["grades"][0] == 4
    # Grade 2 is consistent with the lesions but no map supports it: changed to the most
    # probable allowed grade.
    out = refine_pseudo_grades([2], np.array([[0.1, 0.1, 0.4, 0.3, 0.1]]), masks, cams)
    assert not out["accepted"][0] and out["grades"][0] == 3
    # A lower min_overlap lets grade 1's map count, but the lesions still exclude grade 1.
    out = refine_pseudo_grades([1], probs, masks, cams, min_overlap=0.3)
    np.testing.assert_array_equal(out["cam_supported"][0], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(out["allowed"][0], [0, 0, 0, 1, 1])
    assert out["grades"][0] == 4


def test_refine_lesion_rules_and_fallback():
    masks = _masks(4)
    masks[1, 3, 3, MA] = 1  # MA only
    masks[2, 0, 0, MA] = 1  # MA + HE: grade 2 only (two kinds)
    masks[2, 4:6, 4:6, HE] = 1
    masks[3, 2, 2, MA] = 1
    probs = np.array(
        [
            [0.1, 0.1, 0.6, 0.1, 0.1],
            [0.1, 0.2, 0.1, 0.5, 0.1],
            [0.0, 0.0, 0.1, 0.8, 0.1],
            [0.0, 0.9, 0.1, 0.0, 0.0],
        ]
    )
    cams = np.zeros((4, 5, 8, 8), np.float32)
    cams[2, 3, 4:6, 4:6] = 1.0  # only grade 3's map is on the lesions: not allowed by them
    out = refine_pseudo_grades([2, 3, 3, 1], probs, masks, cams)
    np.testing.assert_array_equal(out["grades"], [0, 1, 2, 1])
    np.testing.assert_array_equal(out["accepted"], [False, False, False, True])
    # Image 2: G_L = {2} and G_C = {3} do not meet, so the lesions decide.
    np.testing.assert_array_equal(out["allowed"][2], [0, 0, 1, 0, 0])
    # Without CAMs only the lesion rule applies.
    no_cam = refine_pseudo_grades([2, 3, 3, 1], probs, masks)
    np.testing.assert_array_equal(no_cam["grades"], [0, 1, 2, 1])
    assert not no_cam["cam_supported"].any()
    with pytest.raises(ValueError, match="pseudo_grades"):
        refine_pseudo_grades([5, 0, 0, 0], probs, masks)


def _grader(seed, size=16, name="grader"):
    keras.utils.set_random_seed(seed)
    image = keras.Input((size, size, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
    g = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(5, activation="softmax", name="probs")(g)
    return keras.Model(image, out, name=name)


def test_generate_pseudo_grades_end_to_end():
    a, b = _grader(1, name="resnext101"), _grader(2, name="resnext50")
    # A dict-output network is a valid grader too (its GRADE_PROBS output is used).
    image = keras.Input((16, 16, 3), name="image")
    c = keras.Model(image, {keys.GRADE_PROBS: a(image)}, name="dict_grader")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (6, 16, 16, 3)).astype(np.float32)
    masks = _masks(6, size=16)
    masks[:3, 2:6, 2:6, HE] = 1
    masks[:3, 8:10, 8:10, MA] = 1
    masks[:2, 10:14, 2:6, EX] = 1
    out = generate_pseudo_grades([a, b], images, masks, batch_size=4)
    pa, pb = predict_grade_probs(a, images), predict_grade_probs(b, images)
    np.testing.assert_allclose(predict_grade_probs(c, images, batch_size=5), pa, atol=1e-6)
    chosen = select_confident([pa, pb])
    np.testing.assert_array_equal(out["source"], chosen["source"])
    np.testing.assert_array_equal(out["initial_grades"], chosen["grades"])
    assert out["cams"].shape == (6, 5, 16, 16)
    for i, src in enumerate(out["source"]):
        expected = GradCAM([a, b][src]).all_classes(images[i : i + 1])[0]
        np.testing.assert_allclose(out["cams"][i], expected, atol=1e-5)
    manual = refine_pseudo_grades(chosen["grades"], chosen["probs"], masks, out["cams"])
    np.testing.assert_array_equal(out["grades"], manual["grades"])
    # Images without lesions end at grade 0; the refined grade is always allowed.
    np.testing.assert_array_equal(out["grades"][3:], [0, 0, 0])
    assert out["allowed"][np.arange(6), out["grades"]].all()
