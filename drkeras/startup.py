"""Quiet start-up of drkeras' command-line entry points.

TensorFlow 2.15 prints a dozen log lines when it loads (the oneDNN notice, "Could not find cuda
drivers", "Unable to register cuDNN/cuFFT/cuBLAS factory" errors, the TensorRT warning, the CPU
instruction notice) that say nothing about the user's run. Every entry point
(``python -m drkeras.predict``, ``python -m drkeras.evaluate``, ``python -m data_prep``,
``python -m benchmarks``, ``python experiments/<paper>.py``) imports this module before
anything imports TensorFlow; when the process was started as one of them it

1. sets ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's C++ errors still show; its info and warning
   lines do not), and
2. imports TensorFlow with the process's standard error captured, then writes back every captured
   line except the known start-up noise (:data:`STARTUP_NOISE`).

It does nothing when the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves, passed ``--verbose``, or
imported drkeras as a library (a notebook, pytest), or when TensorFlow is already loaded. The
sort order that puts this import first is declared in ``pyproject.toml`` (ruff's isort section
``startup``).

Example (the first drkeras import of an entry point)::

    import drkeras.startup  # noqa: F401  (before TensorFlow loads)
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile

# Lines TensorFlow 2.15 writes while it loads that concern no run (checked on CPU-only and CUDA
# machines). Anything else it writes then is passed through.
STARTUP_NOISE = re.compile(
    r"Unable to register cu(DNN|FFT|BLAS) factory"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|cpu_feature_guard\.cc"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)

_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]
_ENTRY_FOLDERS = ("drkeras", "data_prep", "benchmarks", "experiments")


def started_as_entry_point(argv0: str | None = None) -> bool:
    """True when the process runs a drkeras command (its script lies in one of the project's
    packages); False for a library use (an interpreter, a notebook, pytest)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if not argv0 or argv0 in ("-c", "-m"):
        return False
    try:
        path = pathlib.Path(argv0).resolve()
    except OSError:
        return False
    return path.suffix == ".py" and any(
        path.is_relative_to(_PACKAGE_ROOT / folder) for folder in _ENTRY_FOLDERS
    )


def filter_startup_noise(text: str) -> str:
    """``text`` without the lines matching :data:`STARTUP_NOISE`."""
    return "".join(
        line for line in text.splitlines(keepends=True) if not STARTUP_NOISE.search(line)
    )


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 captured; write back what is not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(filter_startup_noise(captured.read().decode(errors="replace")))
            sys.stderr.flush()


def add_verbose_flag(parser) -> None:
    """The ``--verbose`` flag of every entry point (its effect is taken at import time)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow's start-up log lines (hidden by default, as they are when "
        "TF_CPP_MIN_LOG_LEVEL is set)",
    )


def quiet_startup(argv=None) -> bool:
    """Apply the quiet start-up when it applies (module docstring); True when it did."""
    argv = sys.argv if argv is None else argv
    if (
        "tensorflow" in sys.modules
        or "TF_CPP_MIN_LOG_LEVEL" in os.environ
        or "--verbose" in argv[1:]
        or not started_as_entry_point(argv[0] if argv else "")
    ):
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import_tensorflow_quietly()
    return True


quiet_startup()
