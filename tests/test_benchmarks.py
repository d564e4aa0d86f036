"""The benchmark machinery (FLOP counter, statistics, report) on hand-computable cases, and the
performance edits of the data modules against the slower code they replace."""

import json

import cv2
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import common, conversion, flops, report, train_steps
from benchmarks import pipeline as bench_pipeline
from drkeras import keys
from drkeras.data import augment as aug
from drkeras.data import preprocess, records

# --------------------------------------------------------------------------------------------
# FLOP counter


def _tiny_model():
    return tf.keras.Sequential(
        [
            tf.keras.Input((4, 4, 1)),
            tf.keras.layers.Conv2D(2, 3, padding="same", name="conv"),
            tf.keras.layers.Flatten(name="flatten"),
            tf.keras.layers.Dense(3, name="dense"),
        ]
    )


def test_flop_count_of_a_tiny_model_is_the_hand_count():
    model = _tiny_model()
    spec = tf.TensorSpec([1, 4, 4, 1])
    # conv: 2 * (4*4*2 outputs) * 3*3*1 = 576; its bias 32; dense: 2 * 32 * 3 = 192; bias 3
    expected = 576 + 32 + 192 + 3
    assert flops.count_flops(lambda x: model(x), spec) == expected
    assert flops.count_flops(lambda x: model(x), spec, executed_only=False) == expected
    batched = tf.TensorSpec([5, 4, 4, 1])
    assert flops.count_flops(lambda x: model(x), batched) == 5 * expected
    assert flops.uncounted_calls(lambda x: model(x), spec) == []


def test_ops_no_output_needs_are_not_counted():
    def fn(a, b):
        unused = a @ b  # noqa: F841  (traced into the graph, pruned at run time)
        return a + 1.0

    specs = (tf.TensorSpec([2, 3]), tf.TensorSpec([3, 4]))
    assert flops.count_flops(fn, *specs) == 6  # the add: one per element
    assert flops.count_flops(fn, *specs, executed_only=False) == 6 + 2 * 2 * 3 * 4


def test_conv_shapes_group_equal_convolutions_and_the_micro_step_counts_three_convs():
    inputs = tf.keras.Input((8, 8, 4))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="b")(x)
    x = tf.keras.layers.Conv2D(6, 1, strides=2, name="c")(x)
    model = tf.keras.Model(inputs, x)
    shapes = flops.conv_shapes(lambda t: model(t), tf.TensorSpec([2, 8, 8, 4]))
    assert [(s.in_channels, s.out_channels, s.kernel, s.stride, s.count) for s in shapes] == [
        (4, 4, 3, 1, 2),
        (4, 6, 1, 2, 1),
    ]
    assert shapes[0].flops == 2 * 2 * (2 * 8 * 8 * 4) * 3 * 3 * 4
    assert shapes[1].flops == 2 * (2 * 4 * 4 * 6) * 1 * 1 * 4
    assert shapes[0].describe() == "2x8x8 4->4 k3 s1"
    run, step_flops = flops.conv_step(shapes[0])
    run()
    assert step_flops == 3 * shapes[0].flops // shapes[0].count


def test_reference_rate_weights_shapes_by_their_time():
    shape = flops.ConvShape(1, 1, 1, 1, 1, 1, 1, "SAME")
    a, b = (flops.dataclasses.replace(shape, flops=f) for f in (100, 300))
    # 100 FLOPs at 10/s (10 s) + 300 FLOPs at 30/s (10 s): 400 FLOPs in 20 s
    assert flops.reference_rate([a, b], [10.0, 30.0]) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="one rate per shape"):
        flops.reference_rate([a], [1.0, 2.0])


# --------------------------------------------------------------------------------------------
# statistics and report


def test_summaries_percentiles_and_the_scaling_exponent():
    s = common.summarize([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4
    assert s["noise"] == pytest.approx(9.0 / 2.5)
    assert s["p95"] == pytest.approx(np.percentile([1, 2, 3, 10], 95))
    with pytest.raises(ValueError):
        common.summarize([])
    sizes = [256, 512, 1024]
    assert train_steps.scaling_exponent(sizes, [0.5 * (s * s) ** 0.8 for s in sizes]) == (
        pytest.approx(0.8)
    )
    assert train_steps.scaling_exponent([1, 2], [1.0, 4.0]) == pytest.approx(1.0)


def test_interleaved_rounds_alternate_the_candidates():
    calls = []

    def measure(name):
        def run():
            calls.append(name)
            return {"a": 1.0, "b": 2.0}[name]

        return run

    times = common.interleaved({"a": measure("a"), "b": measure("b")}, rounds=3)
    assert calls == ["a", "b"] * 3
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert 0.0 <= common.per_call(lambda: None, 0.001)() < 0.001


def test_goals_and_report_files(tmp_path):
    assert common.Goal.at_least("x", 3.0, 3).met is True
    assert common.Goal.at_most("y", 1.2, 1.15).met is False
    assert common.Goal.at_least("z", None, 3).met is None
    section = common.Section(
        "demo",
        "Demo",
        [("name", "what"), ("rate", "images/s")],
        rows=[{"name": "loop", "rate": 41.234, "extra": [1, 2]}, {"name": "a|b", "rate": None}],
        goals=[common.Goal.at_least("speed-up", 2.5, 3, "decode-bound")],
        notes=["measured twice"],
        seconds=12.0,
    )
    text = report.write(tmp_path, [section], {"cpu": "test cpu", "cpu_count": 2}, seconds=60)
    assert "| loop | 41.2 |" in text and "| a/b | - |" in text
    assert "| Demo | speed-up | 2.50 | >= 3 | no | decode-bound |" in text
    saved = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert saved["sections"]["demo"]["rows"][0]["extra"] == [1, 2]
    assert saved["goals"][0]["met"] is False
    assert (tmp_path / report.MARKDOWN_NAME).read_text() == text
    assert [report.format_value(v) for v in (0.01234, 1234.5, True, 2e-5)] == [
        "0.0123",
        "1234",
        "yes",
        "2e-05",
    ]


# --------------------------------------------------------------------------------------------
# benchmark inputs


def test_pipeline_inputs_hold_the_same_bytes_as_their_records(tmp_path):
    inputs = bench_pipeline.prepare_inputs(tmp_path, n=2, height=48)
    again = bench_pipeline.prepare_inputs(tmp_path, n=2, height=48)  # reused, not rewritten
    assert again["images"] == inputs["images"] and again["masks"] == inputs["masks"]
    blobs = list(tf.data.TFRecordDataset(records.list_shards(inputs["records"], "train")))
    assert len(blobs) == 2
    for blob, image_path, mask_paths in zip(blobs, inputs["images"], inputs["masks"]):
        feature = tf.train.Example.FromString(blob.numpy()).features.feature
        assert feature[keys.IMAGE].bytes_list.value[0] == image_path.read_bytes()
        stored = dict(zip(keys.LESIONS, feature[keys.MASKS].bytes_list.value))
        assert {k for k, v in stored.items() if v} == set(mask_paths)
        for lesion, path in mask_paths.items():
            assert stored[lesion] == path.read_bytes()
    image, masks = bench_pipeline._loop_example(
        inputs["images"][0], inputs["masks"][0], 32, np.random.default_rng(0), True
    )
    assert image.shape == (32, 32, 3) and masks.shape == (32, 32, 5)
    assert 0.0 <= image.min() and image.max() <= 1.0 and set(np.unique(masks)) <= {0.0, 1.0}


def test_conversion_layout_converts_in_process(tmp_path):
    photo = tmp_path / "p.jpg"
    common.write_jpeg(photo, common.synthetic_photo(1, 40)[0])
    root = conversion.make_layout(tmp_path / "raw", [photo], 3)
    report_ = conversion.child_main(
        {"src": str(root), "out": str(tmp_path / "rec"), "workers": 1, "max_side": 32}
    )
    assert report_["images"] == 3 and report_["skipped"] == 0
    assert report_["peak_mb"] >= report_["before_mb"] > 0 and report_["workers_peak_mb"] == 0
    labels = [int(ex[keys.GRADE]) for ex in records.records_dataset(tmp_path / "rec", "train")]
    assert sorted(labels) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# the performance edits give the results of the code they replace


def test_opencv_augmentation_matches_the_tf_ops_it_replaces():
    from drkeras.data import synthetic

    f = synthetic.generate(3, size=96, camera="square")
    image = cv2.GaussianBlur(f.image, (0, 0), 1.5).astype(np.float32)
    for s in range(4):
        seed = [s, 1]
        out, out_masks = aug.augment(image, f.masks, seed=seed)
        sub = aug._seeds(seed)
        transform = aug.sample_transform(sub[aug._GEOMETRY], 96, 96)
        reference = aug.color_jitter(
            aug.apply_transform(image, transform), sub[aug._COLOUR], aug.DEFAULT_AUGMENT
        )
        ref_masks = aug.apply_transform(f.masks, transform, interpolation="nearest")
        # OpenCV interpolates on a 1/32-pixel grid: small differences on a smooth image (the
        # neighbouring seed differs by ~20 grey levels on average)
        assert np.abs(out.numpy() - reference.numpy()).mean() < 0.2
        wrong = (out_masks.numpy() != ref_masks.numpy()).sum()
        assert wrong <= 0.02 * max(int(ref_masks.numpy().sum()), 1)
        # uint8 images are augmented in uint8: the same up to whole grey levels
        as_uint8, _ = aug.augment(image.round().astype(np.uint8), None, seed=seed)
        assert np.abs(as_uint8.numpy() - out.numpy()).mean() < 1.0


def test_gathered_nearest_resize_equals_tf_image_resize():
    rng = np.random.default_rng(0)
    for _ in range(25):
        h, w = rng.integers(2, 120, 2)
        masks = rng.integers(0, 2, (h, w, 3)).astype(np.uint8)
        y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
        box = [y0, x0, rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)]
        size = int(rng.integers(1, 90))
        crop = masks[box[0] : box[2], box[1] : box[3]]
        new_h, new_w, _ = preprocess._target_size(tf.constant(box), size)
        expected = tf.image.resize(crop, tf.stack([new_h, new_w]), method="nearest")
        expected = tf.image.pad_to_bounding_box(
            expected, (size - new_h) // 2, (size - new_w) // 2, size, size
        ).numpy()
        got = preprocess.prepare_example_masks(masks, box, size).numpy()
        np.testing.assert_array_equal(got, expected)
        planar = preprocess.prepare_example_masks(
            np.moveaxis(masks, -1, 0), box, size, channels_first=True
        )
        np.testing.assert_array_equal(planar.numpy(), expected)


def test_encoded_masks_reduced_decoding_and_labels():
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), (0, 0), 4)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    masks = np.zeros((64, 96, 5), np.uint8)
    masks[10:20, 30:50, 1] = 1
    blob = records.encode_example(
        id="a", dataset="x", split="train", image=jpeg, masks=masks, mask_present=[True] * 5
    )
    full = records.parse_example(blob)
    encoded = records.parse_example(blob, masks="encoded")
    assert encoded[keys.MASKS].shape == (5,) and encoded[keys.MASKS][0].numpy() == b""
    channels = [records.decode_mask(encoded[keys.MASKS][k], 64, 96) for k in range(5)]
    np.testing.assert_array_equal(np.stack(channels, -1), full[keys.MASKS].numpy())
    np.testing.assert_array_equal(full[keys.MASKS].numpy(), masks)
    reduced = records.parse_example(blob, masks=False, min_side=16)
    assert keys.MASKS not in reduced
    assert reduced[keys.IMAGE].shape == (16, 24, 3)  # 64 / 4 = 16 >= 16; / 8 would be 8
    shrunk = cv2.resize(full[keys.IMAGE].numpy(), (24, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced[keys.IMAGE].numpy().astype(int) - shrunk).mean() < 4
    assert records.parse_example(blob, masks=False, min_side=64)[keys.IMAGE].shape == (64, 96, 3)
    labels = records.parse_labels(blob)
    assert int(labels[keys.GRADE]) == -1 and labels[keys.MASK_PRESENT].numpy().all()
    with pytest.raises(ValueError, match="needs masks=False"):
        records.parse_example(blob, min_side=16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="photograph's height and width"):
        records.decode_mask(encoded[keys.MASKS][1], 64, 95)
