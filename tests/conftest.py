"""Test set-up shared by the whole suite (docs/design.md section 6).

- The CPU is split into two logical devices before TensorFlow initialises, so MirroredStrategy
  tests can compare one replica with two on a machine without GPUs.
- Every test starts from the same seeds and ends with a cleared Keras session.
- ``idrid_mini`` is the folder of real IDRiD files shipped in ``tests/fixtures/idrid_mini``
  (CC BY 4.0, see its ATTRIBUTION.txt), so every test runs on a clone of the repository alone.
"""

import os
import pathlib
import random
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
warnings.filterwarnings("ignore", message=".*TensorFlow Addons.*")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _seed_and_clear():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (code under test may use the global NumPy RNG)
    tf.random.set_seed(0)
    tf.keras.utils.set_random_seed(0)
    yield
    tf.keras.backend.clear_session()


@pytest.fixture(scope="session")
def idrid_mini():
    """Real IDRiD files in the official layout (three segmentation photographs with HE/EX masks,
    both grading CSVs). A missing folder is an error, not a skip: it ships with the repository."""
    root = FIXTURES / "idrid_mini"
    assert (root / "ATTRIBUTION.txt").is_file(), f"{root} is missing: it belongs to the repository"
    return root


def stand_in_context(config, out_dir, *, export_dir=None, records=None):
    """What an experiment's ``_Run`` reads of the runner's ``RunContext``, for tests that build
    a run without the runner (one device, chief, every dataset name reading ``records``)."""
    import types

    context = types.SimpleNamespace(
        config=config,
        strategy=tf.distribute.get_strategy(),
        export_dir=export_dir or out_dir,
        out_dir=out_dir,
        is_chief=True,
    )
    if records is not None:
        context.records = lambda name: records
    return context


# A tiny exported-model set-up shared by the export/evaluate and leaderboard tests.
TINY_MODEL_SIZE = 32
TINY_PREPROCESS = {"fov_crop": True, "graham": False, "normalization": "unit"}
# seg_probs channels of tiny_joint_model: unions of lesion types, as MTUnet's classes
TINY_RED_YELLOW = [("background", ()), ("red", ("MA", "HE")), ("yellow", ("EX", "SE"))]


def tiny_joint_model():
    """A few conv layers with a grading head and two segmentation heads (sigmoid, softmax)."""
    from tensorflow import keras

    from drkeras import keys

    size = TINY_MODEL_SIZE
    x = keras.Input((size, size, 3), name=keys.IMAGE)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="enc_conv1")(x)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="enc_conv2")(h)
    lesion = keras.layers.Conv2D(5, 1, activation="sigmoid", name=keys.LESION_PROBS)(h)
    seg = keras.layers.Conv2D(3, 1, activation="softmax", name=keys.SEG_PROBS)(h)
    pooled = keras.layers.GlobalAveragePooling2D(name="grade_pool")(h)
    grade = keras.layers.Dense(5, activation="softmax", name=keys.GRADE_PROBS)(pooled)
    outputs = {keys.GRADE_PROBS: grade, keys.LESION_PROBS: lesion, keys.SEG_PROBS: seg}
    return keras.Model(x, outputs, name="tiny_joint")


def write_synthetic_test_records(root):
    """Six synthetic test examples: mixed sizes, one unknown grade, SE not annotated on one."""
    import json

    from drkeras.data import records, synthetic

    with records.ShardWriter(root, "test", examples_per_shard=4) as writer:
        for i in range(6):
            f = synthetic.generate(20 + i, size=40, grade=i % 5, camera="canon" if i == 4 else None)
            present = [True] * 5
            masks = f.masks.copy()
            if i == 2:
                present[3] = False
                masks[..., 3] = 0
            writer.write(
                records.encode_example(
                    id=f"syn-{i}",
                    dataset="synthetic",
                    split="test",
                    image=f.image,
                    masks=masks,
                    mask_present=present,
                    grade=-1 if i == 5 else f.grade,
                    dme=f.dme,
                    lossless=True,
                )
            )
    # The count a converter's manifest holds: evaluate checks the split against it.
    (root / records.MANIFEST).write_text(json.dumps({"counts": {"test": writer.count}}))
    return root


@pytest.fixture(scope="session")
def two_replicas():
    """A MirroredStrategy over the two logical CPU devices."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
