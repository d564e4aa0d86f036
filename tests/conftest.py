"""Test set-up shared by the whole suite (DESIGN.md section 6).

- The CPU is split into two logical devices before TensorFlow initialises, so MirroredStrategy
  tests can compare one replica with two on a machine without GPUs.
- Every test starts from the same seeds and ends with a cleared Keras session.
- ``shared_dir``/``idrid_mini`` point at ``../shared`` when it exists; tests that need the real
  IDRiD files skip cleanly when it does not (as on a user's machine).
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
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _seed_and_clear():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (code under test may use the global NumPy RNG)
    tf.random.set_seed(0)
    tf.keras.utils.set_random_seed(0)
    yield
    tf.keras.backend.clear_session()


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (only developers and CI have it)")
    return SHARED


@pytest.fixture(scope="session")
def idrid_mini(shared_dir):
    root = shared_dir / "fixtures" / "idrid_mini"
    if not root.is_dir():
        pytest.skip("../shared/fixtures/idrid_mini is absent")
    return root


@pytest.fixture(scope="session")
def two_replicas():
    """A MirroredStrategy over the two logical CPU devices."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
