"""Semi-supervised pseudo masks of MTUnet (Foo et al. 2020, Fig. 7): the grade-0 rule."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models import mtunet
from drkeras.pseudo_masks import pseudo_label_batch, pseudo_label_dataset, pseudo_masks_from_probs

BG, RED, YELLOW, OD = range(4)


def _fixed_segmenter():
    """A 1x1-conv softmax 'segmenter' with hand-set scores: R -> red, G -> yellow, B -> disc.

    Scores per pixel: background 5, red 10 R, yellow 10 G, optic disc 10 B.
    """
    image = keras.Input((None, None, 3), name=keys.IMAGE)
    conv = keras.layers.Conv2D(4, 1, name="class_scores")
    scores = conv(image)
    kernel = np.zeros((1, 1, 3, 4), "float32")
    kernel[0, 0, 0, RED] = kernel[0, 0, 1, YELLOW] = kernel[0, 0, 2, OD] = 10.0
    conv.set_weights([kernel, np.array([5.0, 0, 0, 0], "float32")])
    probs = keras.layers.Activation("softmax", name=keys.SEG_PROBS)(scores)
    return keras.Model(image, {keys.SEG_PROBS: probs})


# Pixels: nothing (-> bg), R (-> red), R + 0.8 B (-> red; without lesions: disc 8 > bg 5),
# G (-> yellow; without lesions: bg 5 > disc 0).
IMAGE = np.array([[[0, 0, 0], [1, 0, 0]], [[1, 0, 0.8], [0, 1, 0]]], "float32")
PREDICTED = [[BG, RED], [RED, YELLOW]]
HEALTHY = [[BG, BG], [OD, BG]]


def _onehot(classes):
    return np.eye(4, dtype="float32")[np.array(classes)]


def test_grade_zero_allows_only_background_and_optic_disc():
    probs = np.array([[[[0.1, 0.6, 0.0, 0.3], [0.3, 0.0, 0.6, 0.1], [0.2, 0.1, 0.1, 0.6]]]])
    probs = np.repeat(probs, 3, axis=0).astype("float32")
    masks = pseudo_masks_from_probs(probs, [0, 2, -1]).numpy()
    np.testing.assert_array_equal(masks[0, 0], _onehot([OD, BG, OD]))  # next best allowed class
    np.testing.assert_array_equal(masks[1, 0], _onehot([RED, YELLOW, OD]))  # grade 2: as predicted
    np.testing.assert_array_equal(masks[2, 0], _onehot([RED, YELLOW, OD]))  # unknown grade
    assert masks.dtype == np.float32


def test_sigmoid_outputs_threshold_and_other_class_sets():
    # Channels of "lesions_od": bg, MA, HE, EX, SE, OD; sigmoid masks may overlap.
    probs = np.array([[[[0.2, 0.9, 0.7, 0.4, 0.6, 0.8]]]] * 2, "float32")
    masks = pseudo_masks_from_probs(
        probs, np.array([[0], [4]]), class_set="lesions_od", activation="sigmoid", threshold=0.5
    ).numpy()
    np.testing.assert_array_equal(masks[0, 0, 0], [0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(masks[1, 0, 0], [0, 1, 1, 0, 1, 1])
    # An explicit channel list overrides the class set's lesion classes.
    masks = pseudo_masks_from_probs(
        probs[:1], [0], class_set="lesions_od", activation="sigmoid", lesion_channels=[1]
    ).numpy()
    np.testing.assert_array_equal(masks[0, 0, 0], [0, 0, 1, 0, 1, 1])


def test_pseudo_label_batch_runs_the_segmenter():
    segmenter = _fixed_segmenter()
    images = np.stack([IMAGE] * 3)
    out_images, masks, grades = pseudo_label_batch(segmenter, images, tf.constant([0, 3, -1]))
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(grades, [0, 3, -1])
    np.testing.assert_array_equal(masks[0], _onehot(HEALTHY))
    np.testing.assert_array_equal(masks[1], _onehot(PREDICTED))
    np.testing.assert_array_equal(masks[2], _onehot(PREDICTED))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("as_dict", [True, False])
def test_pseudo_label_dataset(batched, as_dict):
    segmenter = _fixed_segmenter()
    grades = np.array([0, 2, 0, 1], "int64")
    images = np.stack([IMAGE] * 4)
    if as_dict:
        data = {keys.IMAGE: images, keys.GRADE: grades, keys.ID: np.array([b"a", b"b", b"c", b"d"])}
    else:
        data = (images, grades)
    ds = tf.data.Dataset.from_tensor_slices(data)
    if batched:
        ds = ds.batch(3)
    labelled = pseudo_label_dataset(segmenter, ds, cache="")
    assert len(labelled.element_spec) == 3
    got = [labelled.as_numpy_iterator(), labelled.as_numpy_iterator()]  # second pass: cache
    for passes in got:
        elements = list(passes)
        if batched:
            assert [len(e[0]) for e in elements] == [3, 1]
            elements = [tuple(part[i] for part in e) for e in elements for i in range(len(e[0]))]
        assert len(elements) == 4
        for (image, mask, grade), want_grade in zip(elements, grades):
            np.testing.assert_array_equal(image, IMAGE)
            assert grade == want_grade and grade.dtype == np.int64
            np.testing.assert_array_equal(mask, _onehot(HEALTHY if grade == 0 else PREDICTED))


def test_bad_inputs_name_what_was_expected():
    with pytest.raises(ValueError, match=r"\(batch, H, W, 4\) for class_set 'red_yellow_od'"):
        pseudo_masks_from_probs(np.zeros((1, 2, 2, 5)), [0])
    with pytest.raises(ValueError, match="'softmax' or 'sigmoid'"):
        pseudo_masks_from_probs(np.zeros((1, 2, 2, 4)), [0], activation="relu")
    ds = tf.data.Dataset.from_tensor_slices({keys.IMAGE: np.zeros((2, 4, 4, 3), "float32")})
    with pytest.raises(ValueError, match=r"expected 'image' and 'grade' \(missing \['grade'\]\)"):
        pseudo_label_dataset(_fixed_segmenter(), ds)
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((2, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match=r"\(image, grade\) tuples"):
        pseudo_label_dataset(_fixed_segmenter(), ds)
    image = keras.Input((4, 4, 3))
    other = keras.Model(image, {"other": keras.layers.Activation("linear", name="other")(image)})
    with pytest.raises(ValueError, match="neither 'seg_probs' nor 'lesion_probs'"):
        pseudo_label_batch(other, np.zeros((1, 4, 4, 3), "float32"), [0])


def test_figure7_process_feeds_the_multitask_network():
    """Segmenter -> pseudo masks on graded images -> MTUnet trained with fit."""
    size, width = 32, 1 / 16
    segmenter = mtunet.build_vgg16_unet(
        input_shape=(size, size, 3), num_seg_classes=4, num_grades=None, width=width
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, size, size, 3)).astype("float32")
    grades = np.array([0, 2, 0, 4])
    ds = tf.data.Dataset.from_tensor_slices({keys.IMAGE: images, keys.GRADE: grades}).batch(2)
    triples = pseudo_label_dataset(segmenter, ds, cache="")
    masks = np.concatenate([m for _, m, _ in triples.as_numpy_iterator()])
    np.testing.assert_array_equal(masks.sum(-1), 1.0)  # one class per pixel
    lesion = list(mtunet.lesion_class_indices())
    predicted = np.argmax(segmenter.predict(images, verbose=0)[keys.SEG_PROBS], -1)
    assert np.isin(predicted[grades == 0], lesion).any()  # the rule has lesions to remove
    assert masks[grades == 0][..., lesion].sum() == 0
    # The untrained segmenter's own argmax is kept for the images with DR.
    np.testing.assert_array_equal(np.argmax(masks[grades > 0], -1), predicted[grades > 0])

    model = mtunet.build_mtunet(input_shape=(size, size, 3), width=width)
    mtunet.compile_mtunet(model, lr=1e-3, run_eagerly=True)
    train = triples.map(lambda x, m, g: (x, {keys.SEG_PROBS: m, keys.GRADE_PROBS: g}))
    history = model.fit(train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
