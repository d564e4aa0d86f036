"""The package sets what its dependencies need; entry points start without TensorFlow's
start-up log lines unless asked (drkeras.startup)."""

import os
import subprocess
import sys

import pytest

from drkeras import startup
from tests.conftest import REPO

NOISE = (
    "2026-01-01 10:00:00.1: E external/local_xla/xla/stream_executor/cuda/cuda_dnn.cc:9261] "
    "Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one "
    "has already been registered\n"
    "2026-01-01 10:00:00.2: I tensorflow/core/util/port.cc:113] oneDNN custom operations are "
    "on. You may see slightly different numerical results\n"
    "2026-01-01 10:00:00.3: W tensorflow/compiler/tf2tensorrt/utils/py_utils.cc:38] TF-TRT "
    "Warning: Could not find TensorRT\n"
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "SM_FRAMEWORK")}
    env.update(extra)
    return env


def test_noise_filter_drops_the_known_lines_and_keeps_the_rest():
    kept = "W0101 something the user must see\n"
    assert startup.filter_startup_noise(NOISE + kept + NOISE) == kept
    assert startup.filter_startup_noise("") == ""


@pytest.mark.parametrize(
    "argv0, expected",
    [
        (str(REPO / "experiments" / "pldmlt.py"), True),
        (str(REPO / "drkeras" / "predict.py"), True),
        (str(REPO / "data_prep" / "__main__.py"), True),
        ("-c", False),
        ("-m", False),
        ("", False),
        (str(REPO / "tests" / "tiny_experiment.py"), False),
        ("/usr/lib/python3/dist-packages/ipykernel_launcher.py", False),
    ],
)
def test_entry_points_are_recognised_by_their_script(argv0, expected):
    assert startup.started_as_entry_point(argv0) is expected


def test_a_library_import_or_a_set_log_level_changes_nothing(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    # TensorFlow is loaded in this process: nothing to quiet.
    assert not startup.quiet_startup([str(REPO / "drkeras" / "predict.py")])
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ


def test_drkeras_and_segmentation_models_import_without_sm_framework():
    result = subprocess.run(
        [sys.executable, "-c", "import drkeras, segmentation_models as sm; print(sm.framework())"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "tf.keras"
    assert "Traceback" not in result.stderr
    # A user's own value is kept.
    user = subprocess.run(
        [sys.executable, "-c", "import drkeras, os; print(os.environ['SM_FRAMEWORK'])"],
        env=_env(SM_FRAMEWORK="keras"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert user.stdout.strip() == "keras"


def test_predict_help_starts_quietly_and_verbose_shows_tensorflow_lines():
    command = [sys.executable, "-m", "drkeras.predict", "--help"]
    quiet = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "usage:" in quiet.stdout and "--verbose" in quiet.stdout
    assert quiet.stderr.strip() == ""
    verbose = subprocess.run(
        command + ["--verbose"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert verbose.returncode == 0
    # At least one start-up line TensorFlow 2.15 always writes on this kind of machine (x86
    # CPU: the oneDNN notice or the CUDA/TensorRT probes) shows again.
    assert startup.STARTUP_NOISE.search(verbose.stderr), verbose.stderr[-2000:]
