"""The record schema: exact round trips, graph-mode parsing, shard writing that never leaves a
half-written file, and clear errors for bad input."""

import os
import signal

import cv2
import numpy as np
import pytest
import tensorflow as tf

from drkeras import keys
from drkeras.data import records


def _example(rng, height=12, width=20, *, present=(True, True, False, True, False), **kwargs):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = (rng.random((height, width, keys.NUM_LESIONS)) < 0.3).astype(np.uint8)
    masks[..., [i for i, p in enumerate(present) if not p]] = 0
    masks[..., 3] = 0  # an annotated but empty channel
    fields = dict(id="d-train-1", dataset="d", split="train", lossless=True)
    fields.update(kwargs)
    blob = records.encode_example(image=image, masks=masks, mask_present=present, **fields)
    return image, masks, blob


def _numpy(parsed):
    return {k: v.numpy() for k, v in parsed.items()}


def test_round_trip_is_exact_with_lossless_image():
    rng = np.random.default_rng(0)
    image, masks, blob = _example(rng, id="ddr-segmentation-val-007-1", dataset="ddr", split="val")
    ex = _numpy(records.parse_example(tf.constant(blob)))
    np.testing.assert_array_equal(ex[keys.IMAGE], image)
    np.testing.assert_array_equal(ex[keys.MASKS], masks)
    assert ex[keys.MASKS].dtype == np.uint8 and set(np.unique(ex[keys.MASKS])) == {0, 1}
    np.testing.assert_array_equal(ex[keys.MASK_PRESENT], [True, True, False, True, False])
    assert ex[keys.GRADE] == -1 and ex[keys.DME] == -1
    assert ex[keys.GRADE].dtype == np.int32 and ex[keys.DME].dtype == np.int32
    assert (ex[keys.ID], ex[keys.DATASET], ex[keys.SPLIT]) == (
        b"ddr-segmentation-val-007-1",
        b"ddr",
        b"val",
    )


def test_labels_and_missing_masks():
    blob = records.encode_example(
        id="m-test-a",
        dataset="messidor",
        split="test",
        image=np.full((5, 7, 3), 200, np.uint8),
        masks=None,
        mask_present=[False] * 5,
        grade=3,
        dme=2,
        lossless=True,
    )
    ex = _numpy(records.parse_example(blob))
    assert (ex[keys.GRADE], ex[keys.DME]) == (3, 2)
    assert ex[keys.MASKS].shape == (5, 7, 5) and ex[keys.MASKS].sum() == 0
    assert not ex[keys.MASK_PRESENT].any()


def test_encoded_bytes_are_kept_and_jpeg_arrays_are_close():
    rng = np.random.default_rng(1)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), (0, 0), 3)
    jpeg = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    blob = records.encode_example(
        id="a", dataset="x", split="train", image=jpeg, masks=None, mask_present=[False] * 5
    )
    stored = tf.train.Example.FromString(blob).features.feature[keys.IMAGE].bytes_list.value[0]
    assert stored == jpeg
    decoded = records.parse_example(blob)[keys.IMAGE].numpy()
    np.testing.assert_array_equal(decoded, tf.io.decode_jpeg(jpeg, channels=3).numpy())

    # An array is stored as JPEG quality 95: close to, not equal to, the original.
    blob = records.encode_example(
        id="a", dataset="x", split="train", image=smooth, masks=None, mask_present=[False] * 5
    )
    stored = tf.train.Example.FromString(blob).features.feature[keys.IMAGE].bytes_list.value[0]
    assert stored[:3] == b"\xff\xd8\xff"
    decoded = records.parse_example(blob)[keys.IMAGE].numpy().astype(int)
    assert np.abs(decoded - smooth).mean() < 2.0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(image=np.zeros((4, 4), np.uint8)), "HxWx3"),
        (dict(image=np.zeros((4, 4, 3), np.float32)), "uint8"),
        (dict(image=b"GIF89a...."), "JPEG or PNG"),
        (dict(masks=np.zeros((4, 5, 5), np.uint8)), r"\(4, 4, 5\)"),
        (dict(masks=np.full((4, 4, 5), 2, np.uint8)), r"\{0, 1\}"),
        (dict(mask_present=[True] * 4), "5 flags"),
        (dict(grade=5), r"grade must be in \[-1, 4\]"),
        (dict(dme=3), r"dme must be in \[-1, 2\]"),
        (dict(grade=1.0), "grade must be an int"),
        (dict(split="validation"), "split must be one of"),
        (dict(id=""), "id must be a non-empty string"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(change, message):
    fields = dict(
        id="a",
        dataset="x",
        split="train",
        image=np.zeros((4, 4, 3), np.uint8),
        masks=np.zeros((4, 4, 5), np.uint8),
        mask_present=[True] * 5,
    )
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        records.encode_example(**fields)


def test_lesion_pixels_in_a_not_annotated_channel_are_rejected():
    masks = np.zeros((4, 4, 5), np.uint8)
    masks[0, 0, 4] = 1
    with pytest.raises(ValueError, match="mask channel OD has lesion pixels"):
        records.encode_example(
            id="a",
            dataset="x",
            split="train",
            image=np.zeros((4, 4, 3), np.uint8),
            masks=masks,
            mask_present=[True, True, True, True, False],
        )


def test_shards_parse_in_graph_mode_in_order(tmp_path):
    rng = np.random.default_rng(2)
    written = {}
    with records.ShardWriter(tmp_path, "train", examples_per_shard=2) as writer:
        for i in range(5):
            image, masks, blob = _example(rng, 8 + i, 10, id=f"x-train-{i}", grade=i % 5)
            written[f"x-train-{i}"] = (image, masks)
            writer.write(blob)
    assert writer.shards == [f"train-0000{k}.tfrecord" for k in range(3)]
    assert writer.count == 5
    assert sorted(os.listdir(tmp_path)) == writer.shards
    assert records.list_shards(tmp_path, "train") == [str(tmp_path / s) for s in writer.shards]

    ds = records.records_dataset(tmp_path, "train", cycle_length=1)
    spec = ds.element_spec
    assert spec[keys.IMAGE].shape.as_list() == [None, None, 3]
    assert spec[keys.MASKS].shape.as_list() == [None, None, keys.NUM_LESIONS]
    assert spec[keys.MASK_PRESENT].shape.as_list() == [keys.NUM_LESIONS]
    # A graph-mode map over parsed fields: the per-lesion pixel counts.
    counts = ds.map(
        lambda ex: (ex[keys.ID], tf.reduce_sum(tf.cast(ex[keys.MASKS], tf.int32), [0, 1]))
    )
    seen = []
    for ex_id, lesion_counts in counts.as_numpy_iterator():
        image, masks = written[ex_id.decode()]
        np.testing.assert_array_equal(lesion_counts, masks.sum(axis=(0, 1)))
        seen.append(ex_id.decode())
    assert seen == [f"x-train-{i}" for i in range(5)]
    grades = [int(ex[keys.GRADE]) for ex in ds.as_numpy_iterator()]
    assert grades == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_shard_writer_leaves_nothing_when_interrupted(tmp_path, error):
    rng = np.random.default_rng(3)
    blob = _example(rng)[2]
    with pytest.raises(type(error)):
        with records.ShardWriter(tmp_path, "test", examples_per_shard=2) as writer:
            for i in range(5):
                writer.write(blob)
                if i == 2:
                    # One shard is complete and renamed, the next one is half-written.
                    assert sorted(os.listdir(tmp_path)) == [
                        "test-00000.tfrecord",
                        "test-00001.tfrecord.tmp",
                    ]
                    raise error
    assert os.listdir(tmp_path) == []


def test_shard_writer_cleans_up_on_sigterm(tmp_path):
    blob = _example(np.random.default_rng(4))[2]
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as raised:
        with records.ShardWriter(tmp_path, "val", examples_per_shard=10) as writer:
            writer.write(blob)
            os.kill(os.getpid(), signal.SIGTERM)
            writer.write(blob)  # the handler raises before or at this point
            pytest.fail("SIGTERM did not interrupt the writer")
    assert raised.value.code == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_list_shards_and_manifest_errors_name_the_folder(tmp_path):
    with records.ShardWriter(tmp_path, "train") as writer:
        writer.write(_example(np.random.default_rng(5))[2])
    (tmp_path / "test-00000.tfrecord.tmp").write_bytes(b"partial")  # never listed
    with pytest.raises(FileNotFoundError, match=rf"no val-NNNNN.*{tmp_path}.*found there: train\)"):
        records.list_shards(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="found there: train"):
        records.list_shards(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        records.list_shards(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        records.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"counts": {"train": 1}}')
    assert records.read_manifest(tmp_path) == {"counts": {"train": 1}}


def test_image_size_of_reads_headers():
    png = cv2.imencode(".png", np.zeros((3, 5, 3), np.uint8))[1].tobytes()
    jpg = cv2.imencode(".jpg", np.zeros((7, 2, 3), np.uint8))[1].tobytes()
    assert records.image_size_of(png) == (3, 5)
    assert records.image_size_of(jpg) == (7, 2)
