"""Generated-input (property-based) tests of ``records.parse_example``, ``drkeras.predict`` and
``drkeras.evaluate`` (issue #20), on corruptions of a real IDRiD fixture photograph.

Properties: no traceback (the documented error type with a message saying what was expected, or
a result); every input predicted/evaluated or reported with a reason naming its file; nothing
dropped silently; no partial output. Bounded: a few derandomized examples each (the failures
found so far kept as plain tests), no shrinking; the module exports one tiny model and the entry
points load it once.
"""

import json
import pathlib
import tempfile

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tensorflow import keras

from drkeras import evaluate as evaluate_module
from drkeras import keys
from drkeras import predict as predict_module
from drkeras.data import records
from drkeras.export import export_model, load_exported
from drkeras.predict import main as predict_main

SIZE = 32
PHOTO = (
    pathlib.Path(__file__).resolve().parent
    / "fixtures/idrid_mini/A. Segmentation/1. Original Images/a. Training Set/IDRiD_03.jpg"
)
FUZZ = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class _Photo(tuple):
    """``(jpeg bytes, RGB pixels)`` with a short repr: hypothesis prints the fixture values of a
    falsifying example, and 34 kB of JPEG bytes would bury the example itself."""

    def __repr__(self):
        return "<IDRiD_03.jpg at 240 x 160: (JPEG bytes, RGB pixels)>"


@pytest.fixture(scope="module")
def small_photo():
    """The real photograph at 240 px (JPEG bytes and pixels): every fuzz input starts from it."""
    photo = cv2.imread(str(PHOTO))
    photo = cv2.resize(photo, (240, 160), interpolation=cv2.INTER_AREA)
    jpeg = cv2.imencode(".jpg", photo)[1].tobytes()
    return _Photo((jpeg, cv2.cvtColor(photo, cv2.COLOR_BGR2RGB)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny export for the module; the entry points load it once (loading a SavedModel
    costs seconds, and the properties are about the inputs, not the loading)."""
    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu")(image)
    grade = keras.layers.Dense(5, activation="softmax", name=keys.GRADE_PROBS)(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    lesions = keras.layers.Conv2D(5, 1, activation="sigmoid", name=keys.LESION_PROBS)(x)
    path = tmp_path_factory.mktemp("export") / "model"
    export_model(
        keras.Model(image, {keys.GRADE_PROBS: grade, keys.LESION_PROBS: lesions}),
        path,
        image_size=SIZE,
        preprocess={"fov_crop": True, "graham": False, "normalization": "unit"},
        output_names=[keys.GRADE_PROBS, keys.LESION_PROBS],
    )
    loaded = load_exported(path)

    def load_once(model_path):
        assert pathlib.Path(model_path) == path, model_path
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict_module, "load_exported", load_once)
        patch.setattr(evaluate_module, "load_exported", load_once)
        yield path


def _flip(data: bytes, positions) -> bytes:
    out = bytearray(data)
    for p in positions:
        if out:
            out[p % len(out)] ^= 1 << (p % 8)
    return bytes(out)


BYTE_CORRUPTION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.integers(0, 10**9), min_size=1, max_size=6)),
    st.tuples(st.just("none"), st.just(0)),
)


def _corrupt_bytes(data, corruption):
    kind, arg = corruption
    if kind == "truncate":
        return data[: int(arg * len(data))]
    return _flip(data, arg) if kind == "flip" else data


# --------------------------------------------------------------------------------------------
# records.parse_example


def _feature_bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _feature_int(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _raw_example(image, masks, grade=2, dme=1, present=(1, 1, 0, 0, 0), ex_id=b"fuzz-1"):
    """A record written field by field (not through encode_example, which refuses bad values)."""
    features = {
        keys.ID: _feature_bytes([ex_id]),
        keys.DATASET: _feature_bytes([b"idrid"]),
        keys.SPLIT: _feature_bytes([b"test"]),
        keys.IMAGE: _feature_bytes([image]),
        keys.MASKS: _feature_bytes(masks),
        keys.MASK_PRESENT: _feature_int(list(present)),
        keys.GRADE: _feature_int([grade]),
        keys.DME: _feature_int([dme]),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _mask_png(height, width):
    mask = np.zeros((height, width), np.uint8)
    mask[10:20, 10:30] = 255
    return cv2.imencode(".png", mask)[1].tobytes()


@given(
    image_corruption=BYTE_CORRUPTION,
    record_corruption=BYTE_CORRUPTION,
    mask_size=st.sampled_from([(160, 240), (160, 239), (1, 1)]),
    grade=st.sampled_from([-1, 0, 4, 5, 7, -2]),
    dme=st.sampled_from([-1, 2, 3]),
    present=st.lists(st.sampled_from([0, 1, 2]), min_size=5, max_size=5),
)
@settings(FUZZ, max_examples=15)  # about 0.2 s each
def test_parse_example_returns_the_schema_or_a_clear_error(
    small_photo, image_corruption, record_corruption, mask_size, grade, dme, present
):
    jpeg, _ = small_photo
    masks = [_mask_png(*mask_size), b"", b"", b"", b""]
    blob = _raw_example(_corrupt_bytes(jpeg, image_corruption), masks, grade, dme, present)
    blob = _corrupt_bytes(blob, record_corruption)
    try:
        ex = records.parse_example(tf.constant(blob))
    except tf.errors.InvalidArgumentError as err:
        assert err.message.strip(), "an error without a message"
        return
    image, parsed_masks = ex[keys.IMAGE].numpy(), ex[keys.MASKS].numpy()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert parsed_masks.shape == image.shape[:2] + (keys.NUM_LESIONS,)
    assert set(np.unique(parsed_masks)) <= {0, 1}
    assert -1 <= int(ex[keys.GRADE]) <= 4 and -1 <= int(ex[keys.DME]) <= 2


def test_parse_example_reports_bytes_tensorflow_cannot_quote():
    with pytest.raises(tf.errors.InvalidArgumentError, match="its bytes are corrupted"):
        records.parse_example(NOT_AN_EXAMPLE)
    with pytest.raises(tf.errors.InvalidArgumentError, match="its bytes are corrupted"):
        records.parse_labels(tf.constant(NOT_AN_EXAMPLE))


def test_parse_example_names_the_field_and_the_range():
    blob = _raw_example(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes(),
                        [b""] * 5, grade=7)  # fmt: skip
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"'grade' must be in \[-1, 4\]"):
        records.parse_example(blob)
    # and inside tf.data, as the pipelines and evaluate read records
    ds = tf.data.Dataset.from_tensors(blob).map(records.parse_labels)
    with pytest.raises(tf.errors.InvalidArgumentError, match="fuzz-1"):
        list(ds)


# --------------------------------------------------------------------------------------------
# drkeras.predict

GENERATED = st.one_of(
    st.tuples(st.just("jpeg"), BYTE_CORRUPTION),
    st.tuples(
        st.just("array"),
        st.tuples(
            st.integers(1, 200),
            st.integers(1, 200),
            st.sampled_from(["rgb", "grey", "16bit", "rgba", "black"]),
        ),  # fmt: skip
    ),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
)


def _write_input(path, spec, small_photo):
    jpeg, pixels = small_photo
    kind, arg = spec
    if kind == "jpeg":
        path = path.with_suffix(".jpg")
        path.write_bytes(_corrupt_bytes(jpeg, arg))
    elif kind == "bytes":
        path = path.with_suffix(".png")
        path.write_bytes(arg)
    else:
        height, width, mode = arg
        image = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
        image = image.reshape(height, width, 3)[..., ::-1]
        if mode == "grey":
            image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY)
        elif mode == "16bit":
            image = image.astype(np.uint16) * 257
        elif mode == "rgba":
            image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
        elif mode == "black":
            image = np.zeros_like(image)
        path = path.with_suffix(".png")
        assert cv2.imwrite(str(path), np.ascontiguousarray(image))
    return path


@given(specs=st.lists(GENERATED, min_size=1, max_size=3), strict=st.booleans())
@settings(FUZZ, max_examples=15)  # the model is loaded once (fixture): about 0.3 s each
def test_predict_reports_every_file(exported, small_photo, specs, strict):
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "in"
        folder.mkdir()
        files = [_write_input(folder / f"f{i}", s, small_photo) for i, s in enumerate(specs)]
        out = pathlib.Path(tmp) / "out"
        argv = ["--model", str(exported), "--images", str(folder), "--out", str(out)]
        code = predict_main(argv + ["--no-progress"] + (["--strict"] if strict else []))
        assert code in (0, 2)
        predicted = skipped = set()
        if (out / "predictions.csv").is_file():
            table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
            predicted = set(table["image"])
            assert table["quality"].str.len().min() > 0
            if strict:
                assert set(table["quality"]) == {"ok"}
        if (out / "skipped.csv").is_file():
            frame = pd.read_csv(out / "skipped.csv", keep_default_na=False)
            skipped = set(frame["image"])
            for image, reason in zip(frame["image"], frame["reason"]):
                assert reason.startswith(image), reason
        assert predicted.isdisjoint(skipped)
        assert predicted | skipped == {str(f.resolve()) for f in files}
        assert code == (0 if predicted else 2)
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# drkeras.evaluate

RECORD_CORRUPTION = st.one_of(
    st.tuples(st.just("truncate_shard"), st.floats(0, 1)),
    st.tuples(st.just("flip_shard"), st.lists(st.integers(0, 10**9), min_size=1, max_size=3)),
    st.tuples(st.just("bad_image"), BYTE_CORRUPTION),
    st.tuples(st.just("grade"), st.sampled_from([5, 9, -3])),
    st.tuples(st.just("duplicate_id"), st.just(0)),
    st.tuples(st.just("mask_size"), st.sampled_from([(159, 240), (8, 8)])),
    st.tuples(st.just("not_an_example"), st.binary(max_size=24)),
    st.tuples(st.just("none"), st.just(0)),
)


# Framed as a record but not a tf.train.Example: TensorFlow quotes these bytes in its error
# message and then cannot decode the message (UnicodeDecodeError, found by the fuzz test).
NOT_AN_EXAMPLE = b"\n\xf5\xff\xfe\x01garbage\xc3\x28"


def _write_records(root, small_photo, corruption):
    jpeg, _ = small_photo
    blobs = [
        _raw_example(jpeg, [_mask_png(160, 240)] + [b""] * 4, grade=g, ex_id=f"r{g}".encode())
        for g in (0, 2, 4)
    ]  # fmt: skip
    kind, arg = corruption
    if kind == "bad_image":
        blobs[1] = _raw_example(_corrupt_bytes(jpeg, arg), [b""] * 5, ex_id=b"bad")
    elif kind == "grade":
        blobs[1] = _raw_example(jpeg, [b""] * 5, grade=arg, ex_id=b"bad")
    elif kind == "duplicate_id":
        blobs[2] = _raw_example(jpeg, [b""] * 5, ex_id=b"r0")
    elif kind == "mask_size":
        blobs[1] = _raw_example(jpeg, [_mask_png(*arg)] + [b""] * 4, ex_id=b"bad")
    elif kind == "not_an_example":
        blobs[1] = NOT_AN_EXAMPLE + arg
    with records.ShardWriter(root, "test", examples_per_shard=2) as writer:
        for blob in blobs:
            writer.write(blob)
    # What a converter writes beside its shards: evaluate checks the split's count against it.
    manifest = {"dataset": "idrid", "counts": {"test": writer.count}, "shards": writer.shards}
    (root / records.MANIFEST).write_text(json.dumps(manifest))
    shard = root / writer.shards[-1]
    if kind in ("truncate_shard", "flip_shard"):
        data = shard.read_bytes()
        shard.write_bytes(
            data[: int(arg * len(data))] if kind == "truncate_shard" else _flip(data, arg)
        )
    return len(blobs)


@given(corruption=RECORD_CORRUPTION)
@FUZZ  # 1.5-6 s each (metrics and plots of a run that succeeds); the two failures this module
# found are kept as plain tests: test_evaluate_refuses_records_without_their_manifest and
# test_evaluate_names_the_shard_and_record_of_unparseable_bytes
def test_evaluate_scores_everything_or_names_the_shard(exported, small_photo, corruption):
    with tempfile.TemporaryDirectory() as tmp:
        root, out = pathlib.Path(tmp) / "records", pathlib.Path(tmp) / "eval"
        n = _write_records(root, small_photo, corruption)
        # overlays=0: the overlay figures cost seconds and are tested in test_export_evaluate
        try:
            result = evaluate_module.evaluate(
                exported, root, split="test", out_dir=out, num_thresholds=50, overlays=0,
                progress=False,
            )  # fmt: skip
        except ValueError as err:
            assert str(root) in str(err) and "expected" in str(err), str(err)
            assert not out.exists() or list(out.iterdir()) == [], "partial output"
            return
        assert result["n"] == n
        assert (out / "metrics.csv").is_file()
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_refuses_records_without_their_manifest(exported, small_photo, tmp_path):
    """The failure the fuzz test found: a shard cut exactly after its first record is a valid,
    shorter shard; only the manifest's count tells, so evaluate refuses to go without it."""
    root, out = tmp_path / "records", tmp_path / "eval"
    _write_records(root, small_photo, ("none", 0))
    shard = root / "test-00000.tfrecord"  # two records of the three
    (root / records.MANIFEST).unlink()
    # A TFRecord is length (8) + length CRC (4) + data + data CRC (4): keep the first one only.
    first = 16 + int.from_bytes(shard.read_bytes()[:8], "little")
    shard.write_bytes(shard.read_bytes()[:first])
    assert len(list(tf.data.TFRecordDataset(str(shard)))) == 1  # it reads as a complete shard
    kwargs = dict(split="test", out_dir=out, num_thresholds=50, progress=False)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found: evaluate reads"):
        evaluate_module.evaluate(exported, root, **kwargs)
    assert not out.exists()
    # With the manifest, the missing record is named instead of dropped.
    manifest = {"counts": {"test": 3}}
    (root / records.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"holds 2 readable records but .*manifest\.json counts 3"):
        evaluate_module.evaluate(exported, root, **kwargs)
    assert not out.exists()
    (root / records.MANIFEST).write_text(json.dumps({"counts": {"train": 3}}))
    with pytest.raises(ValueError, match=r"expected a record count of split 'test'"):
        evaluate_module.evaluate(exported, root, **kwargs)
    (root / records.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: cannot be read as JSON"):
        evaluate_module.evaluate(exported, root, **kwargs)


def test_evaluate_names_the_shard_and_record_of_unparseable_bytes(exported, small_photo, tmp_path):
    root, out = tmp_path / "records", tmp_path / "eval"
    _write_records(root, small_photo, ("not_an_example", b""))
    kwargs = dict(split="test", out_dir=out, num_thresholds=50, progress=False)
    shard = root / "test-00000.tfrecord"
    with pytest.raises(ValueError) as caught:
        evaluate_module.evaluate(exported, root, **kwargs)
    assert str(caught.value).startswith(f"{shard}: record 1 (id ?) cannot be read: corrupted bytes")
    assert "expected a complete record of the drkeras schema" in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--batch-size=0", "batch_size must be at least 1, got 0"),
        ("--num-thresholds=1", "num_thresholds must be at least 2, got 1"),
        ("--max-examples=-1", "max_examples must be at least 0, got -1"),
        ("--threshold=1.5", "threshold must be between 0 and 1"),
    ],
)
def test_evaluate_refuses_bad_numbers_before_reading_anything(tmp_path, capsys, argument, message):
    """Nothing named by --model or --data exists: the numbers are checked first, exit code 2."""
    code = evaluate_module.main(
        [
            "--model",
            str(tmp_path / "none"),
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
            argument,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
