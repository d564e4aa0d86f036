"""The export serves the evaluation transform of the training pipelines.

For one photograph, the exported SavedModel's output must equal the Keras model's output on the
tensor the experiment's evaluation pipeline makes of that photograph. The photograph is stored
losslessly (PNG), so the record decoding is exact and the only operations are the shared
preprocessing functions: the tolerance is float32 rounding between the SavedModel graph and the
eager call (1e-4 on probabilities, the export's own reload check).
"""

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.data import pipeline, records, synthetic
from drkeras.export import (
    export_model,
    load_exported,
    masks_for_model,
    serving_input,
    uncrop_dense,
)
from experiments.cooperative import SMOKE, export_preprocess

TOLERANCE = 1e-4


def _photograph(seed=3, size=150):
    return synthetic.generate(seed, size=size, camera="canon")


def _write(root, photo, split="test"):
    with records.ShardWriter(root, split, examples_per_shard=4) as writer:
        writer.write(
            records.encode_example(
                id="photo-0",
                dataset="synthetic",
                split=split,
                image=photo.image,
                masks=photo.masks,
                mask_present=[True] * 5,
                grade=photo.grade,
                dme=photo.dme,
                lossless=True,
            )
        )
    return root


def _tiny(size, classes=5):
    x = keras.Input((size, size, 3), name=keys.IMAGE)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c2")(h)
    seg = keras.layers.UpSampling2D(2, name="up")(h)
    seg = keras.layers.Conv2D(classes, 1, activation="softmax", name=keys.SEG_PROBS)(seg)
    grade = keras.layers.Dense(5, activation="softmax", name=keys.GRADE_PROBS)(
        keras.layers.GlobalAveragePooling2D(name="pool")(h)
    )
    return keras.Model(x, {keys.GRADE_PROBS: grade, keys.SEG_PROBS: seg}, name="tiny")


def test_cooperative_export_serves_the_evaluation_crop(tmp_path):
    config = SMOKE
    size, frame = config.data.image_size, config.method.resize_size
    assert frame > size  # 256 -> 224 in the paper preset, 110 -> 96 in smoke
    preprocess = export_preprocess(config)
    photo = _photograph()
    root = _write(tmp_path / "records", photo)
    # the evaluation pipeline of experiments/cooperative.py (_Run.seg_eval / cls_eval)
    ds = pipeline.segmentation_dataset(
        root,
        "test",
        size=frame,
        crop_size=size,
        augment=False,
        batch_size=1,
        shuffle=False,
        fov_crop=config.data.fov_crop,
        graham=config.data.graham,
        normalization=config.data.normalization,
    )
    x, targets = next(iter(ds))
    tf.keras.utils.set_random_seed(0)
    model = _tiny(size)
    path = export_model(
        model,
        tmp_path / "export",
        image_size=size,
        preprocess=preprocess,
        output_names=[keys.GRADE_PROBS, keys.SEG_PROBS],
    )
    exported = load_exported(path)
    served = exported.predict(photo.image[None])
    reference = model(x, training=False)
    for name in (keys.GRADE_PROBS, keys.SEG_PROBS):
        np.testing.assert_allclose(served[name], reference[name].numpy(), atol=TOLERANCE)
    # The served input itself is the pipeline's tensor.
    np.testing.assert_allclose(
        serving_input(photo.image, size=size, **preprocess).numpy(), x[0].numpy(), atol=1e-5
    )
    # The masks evaluate and predict compare with are in the same (cropped) frame.
    box = [0, 0, photo.image.shape[0], photo.image.shape[1]]
    from drkeras.data import preprocess as prep

    box = prep.fov_box(photo.image).numpy() if config.data.fov_crop else box
    np.testing.assert_array_equal(
        masks_for_model(photo.masks, box, exported.meta), targets[keys.MASKS][0].numpy()
    )
    # Before: the field of view resized straight to the model size (lesions 12.5 % smaller in
    # the paper preset, 1 - 96/110 here), a different input.
    direct = serving_input(photo.image, size=size, **dict(preprocess, resize_size=None))
    assert np.abs(direct.numpy() - x[0].numpy()).max() > 0.5


def test_uncrop_dense_places_the_window_in_the_resized_frame():
    meta = {"image_size": 4, "preprocess": {"resize_size": 8}}
    dense = np.ones((4, 4, 2), np.float32)
    out = uncrop_dense(dense, meta)
    assert out.shape == (8, 8, 2)
    assert out[2:6, 2:6].min() == 1.0 and out.sum() == dense.sum()
    half = uncrop_dense(np.ones((2, 2), np.float32), meta)  # an output at half resolution
    assert half.shape == (4, 4) and half[1:3, 1:3].min() == 1.0 and half.sum() == 4.0
    no_crop = {"image_size": 4, "preprocess": {}}
    assert uncrop_dense(dense, no_crop) is not None
    np.testing.assert_array_equal(uncrop_dense(dense, no_crop), dense)
