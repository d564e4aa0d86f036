"""Evaluation sets spanning several splits (drkeras.data.pipeline.evaluation_dataset): EyePACS'
Kaggle test set is converted as ``val`` (Public) and ``test`` (Private); papers that test on
the whole set read both."""

import numpy as np
import pytest

import data_prep
from drkeras import keys
from drkeras.data import pipeline, synthetic


@pytest.fixture(scope="module")
def eyepacs_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("eyepacs")
    raw = synthetic.write_layout(
        root / "raw", "eyepacs", counts=dict(train=2, public=2, private=3), size=40
    )
    manifest = data_prep.convert("eyepacs", raw, root / "records", quiet=True)
    assert manifest["counts"] == {"train": 2, "val": 2, "test": 3}
    return root / "records"


def test_split_names():
    assert pipeline.split_names("val+test") == ("val", "test")
    assert pipeline.split_names(" val + test ") == ("val", "test")
    assert pipeline.split_names("test") == ("test",)
    assert pipeline.split_names(("val", "test")) == ("val", "test")
    for bad in ("val+", "+", "test+test", ()):
        with pytest.raises(ValueError, match="split names joined by"):
            pipeline.split_names(bad)


def test_eyepacs_public_and_private_form_one_evaluation_set(eyepacs_records):
    options = dict(size=32, batch_size=2, num_classes=5)
    ds = pipeline.evaluation_dataset(
        pipeline.grading_dataset, eyepacs_records, "val+test", **options
    )
    grades = np.concatenate([g.numpy() for _, g in ds])
    val = pipeline.read_labels(eyepacs_records, "val")[keys.GRADE]
    test = pipeline.read_labels(eyepacs_records, "test")[keys.GRADE]
    # Every image of both halves once, Public first: val + test images.
    assert len(grades) == len(val) + len(test) == 5
    np.testing.assert_array_equal(grades, np.concatenate([val, test]))
    # One split reads like the builder itself.
    alone = pipeline.evaluation_dataset(
        pipeline.grading_dataset, eyepacs_records, "test", **options
    )
    direct = pipeline.grading_dataset(eyepacs_records, "test", shuffle=False, **options)
    np.testing.assert_array_equal(
        np.concatenate([g.numpy() for _, g in alone]),
        np.concatenate([g.numpy() for _, g in direct]),
    )


def test_bad_evaluation_requests_name_the_problem(eyepacs_records):
    with pytest.raises(ValueError, match="repeat=True is not allowed"):
        pipeline.evaluation_dataset(
            pipeline.grading_dataset, eyepacs_records, "val+test", repeat=True
        )
    with pytest.raises(FileNotFoundError, match=r"no public-NNNNN.tfrecord shards .*test"):
        pipeline.evaluation_dataset(pipeline.grading_dataset, eyepacs_records, "public+test")


def test_a_file_cache_gets_one_file_per_split(eyepacs_records, tmp_path):
    """Two splits cached in one file would read the first split's images twice."""
    options = dict(size=32, batch_size=2, num_classes=5)
    plain = pipeline.evaluation_dataset(
        pipeline.grading_dataset, eyepacs_records, "val+test", **options
    )
    cached = pipeline.evaluation_dataset(
        pipeline.grading_dataset, eyepacs_records, "val+test", cache=str(tmp_path / "c"), **options
    )
    expected = [i.numpy() for i, _ in plain]
    for _ in range(2):  # writes the files, then reads them
        got = [i.numpy() for i, _ in cached]
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    assert sorted(p.name.split(".")[0] for p in tmp_path.glob("c_*.index")) == ["c_test", "c_val"]
