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


@pytest.fixture(scope="session")
def two_replicas():
    """A MirroredStrategy over the two logical CPU devices."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
