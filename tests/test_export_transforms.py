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
from tests.conftest import stand_in_context

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
    # the evaluation pipeline of experiments/cooperative.py
    # (_Run.evaluate_segmentation / evaluate_grading)
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


# ------------------------------------------------------------------------------------------
# The other four experiments: each run's own export method against its own evaluation data


def _context(tmp_path, config, root):
    """A stand-in for the runner's context: every dataset name reads ``root``."""
    return stand_in_context(config, tmp_path, export_dir=tmp_path / "export", records=root)


def _assert_serves(exported, photo, reference, names):
    served = exported.predict(photo.image[None])
    for name in names:
        np.testing.assert_allclose(
            served[name], np.asarray(reference[name]), atol=TOLERANCE, err_msg=name
        )


def _assert_input(exported, photo, x):
    """The served input of the photograph is the evaluation pipeline's tensor ``x``."""
    meta = exported.meta
    served = serving_input(photo.image, size=meta["image_size"], **meta["preprocess"])
    np.testing.assert_allclose(served.numpy(), np.asarray(x), atol=1e-5)


def test_pldmlt_export_serves_the_evaluation_transform(tmp_path):
    from experiments import pldmlt

    photo = _photograph()
    root = _write(tmp_path / "records", photo)
    run = pldmlt._Run(_context(tmp_path, pldmlt.SMOKE, root))
    mode = run._scaling(run._row_network("Ours"))
    tf.keras.utils.set_random_seed(0)
    model = _tiny(run.size, classes=pldmlt.NUM_FUSED_CLASSES)
    exported = load_exported(run._export(model))
    source = pldmlt.SegSource(root, "test", ("photo-0",))
    x, _ = next(iter(run._seg_eval_data(source, mode=mode)))  # the segmentation tables
    graded, _ = next(iter(run._grading_data(root, "test", training=False, mode=mode)))
    np.testing.assert_array_equal(x.numpy(), graded.numpy())  # lossless record: one tensor
    _assert_input(exported, photo, x[0])
    _assert_serves(exported, photo, model(x, training=False), [keys.GRADE_PROBS, keys.SEG_PROBS])


def test_mtunet_export_serves_the_evaluation_transform(tmp_path):
    from drkeras.data import preprocess as prep
    from drkeras.models import mtunet as mtunet_models
    from experiments import mtunet

    photo = _photograph()
    root = _write(tmp_path / "records", photo)
    run = mtunet._Run(_context(tmp_path, mtunet.SMOKE, root))
    mode = run._input_mode(mtunet.VGG16_ENCODER)
    tf.keras.utils.set_random_seed(0)
    model = _tiny(run.size, classes=len(mtunet_models.CLASS_SETS[run.class_set]))
    run.export(model, mode)
    exported = load_exported(run.ctx.export_dir / "mtunet")
    # Dice (segmentation images) and ROC (graded images) both go through run.outputs
    images = run.segmentation_images("test").images
    np.testing.assert_array_equal(images, run.grading_images("idrid", "test").images)
    reference = {
        name: run.outputs(model, images, mode, name) for name in (keys.GRADE_PROBS, keys.SEG_PROBS)
    }
    x = tf.constant(images, tf.float32)
    x = mtunet._network_input(prep.graham(x) if run.data.graham else x, mode)
    _assert_input(exported, photo, x[0])
    _assert_serves(exported, photo, reference, [keys.GRADE_PROBS, keys.SEG_PROBS])


def _tiny_collaborative(size, lesions):
    """A generator (lesion maps) and an ``image -> G -> C`` stand-in with the grader's outputs."""
    x = keras.Input((size, size, 3), name=keys.IMAGE)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="g1")(x)
    lesion = keras.layers.Conv2D(lesions, 1, activation="sigmoid", name=keys.LESION_PROBS)(h)
    generator = keras.Model(x, {keys.LESION_PROBS: lesion}, name="tiny_generator")
    maps = generator(x)[keys.LESION_PROBS]
    attention = keras.layers.Conv2D(lesions, 1, activation="sigmoid", name=keys.ATTENTION)(
        keras.layers.Concatenate(name="cat")([h, maps])
    )
    grade = keras.layers.Dense(5, activation="softmax", name=keys.GRADE_PROBS)(
        keras.layers.GlobalAveragePooling2D(name="pool")(attention)
    )
    outputs = {keys.GRADE_PROBS: grade, keys.ATTENTION: attention, keys.LESION_PROBS: maps}
    return generator, keras.Model(x, outputs, name="tiny_collaborative")


def test_collaborative_exports_serve_the_evaluation_transform(tmp_path):
    from experiments import collaborative

    photo = _photograph()
    root = _write(tmp_path / "records", photo)
    run = collaborative._Run(_context(tmp_path, collaborative.SMOKE, root))
    assert run.data.graham  # Graham of the rounded image, as the pipelines compute it
    tf.keras.utils.set_random_seed(0)
    generator, model = _tiny_collaborative(run.size, len(run.lesions))
    run.export(generator, model)
    x, _ = next(iter(run._seg_test()))  # Table 3 / Fig. 4 (generator)
    graded, _ = next(iter(run._grade_test("idrid", "test")))  # Tables 1-2, Fig. 5 (grader)
    np.testing.assert_array_equal(x.numpy(), graded.numpy())
    exported = load_exported(tmp_path / "export" / "collaborative_generator")
    _assert_input(exported, photo, x[0])
    _assert_serves(exported, photo, generator(x, training=False), [keys.LESION_PROBS])
    exported = load_exported(tmp_path / "export" / "collaborative_grader")
    _assert_serves(
        exported,
        photo,
        model(graded, training=False),
        [keys.GRADE_PROBS, keys.ATTENTION, keys.LESION_PROBS],
    )


def test_ssl_gan_export_serves_the_evaluation_transform(tmp_path):
    from drkeras import metrics
    from experiments import ssl_gan

    photo = _photograph(size=300)
    root = _write(tmp_path / "records", photo)
    run = ssl_gan._Run(_context(tmp_path, ssl_gan.SMOKE, root))
    p = run.method.patch_size
    patch = keras.Input((p, p, 3), name="patch")
    h = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="d1")(patch)
    logit = keras.layers.Dense(1, name="d2")(keras.layers.GlobalAveragePooling2D(name="gp")(h))
    logit = keras.layers.Reshape((), name=keys.PATCH_LOGITS)(logit)
    tf.keras.utils.set_random_seed(0)
    discriminator = keras.Model(patch, {keys.PATCH_LOGITS: logit}, name="tiny_discriminator")
    # the evaluation of Tables 1-2: each image's patch grid (patch_dataset, mode="images")
    grids = run.grids([ssl_gan.CohortImage("test", "photo-0", 1)])
    run.export(discriminator, grids)
    logits = run._predict(discriminator, grids.patches)  # [1, grid * grid]
    g = run.method.grid
    exported = load_exported(tmp_path / "export" / "ssl_gan")
    reference = {
        keys.PATCH_LOGITS: logits.reshape(1, g, g),
        keys.IMAGE_SCORE: metrics.image_scores_from_patches(logits),
    }
    _assert_serves(exported, photo, reference, [keys.PATCH_LOGITS, keys.IMAGE_SCORE])
    served = serving_input(photo.image, size=run.data.image_size, **exported.meta["preprocess"])
    grid = run._assemble(grids)[0]  # the patches put back together: the evaluated image
    np.testing.assert_allclose(served.numpy(), grid, atol=1e-5)
