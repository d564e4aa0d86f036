"""Shared pieces of the benchmarks: timing statistics, machine facts, synthetic photographs,
and the result structure every section returns.

Every figure the benchmarks report is a ratio of two measurements taken in the same run on the
same machine (the absolute times are context only). The machine may be shared, so a comparison
is measured as interleaved rounds (A, B, A, B, ...) and summarised by medians; ``noise`` (the
spread of the rounds relative to their median) says how far to trust it.

Example::

    >>> s = summarize([1.0, 2.0, 4.0])
    >>> s["median"], s["noise"]
    (2.0, 1.5)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np

__all__ = [
    "Goal",
    "Section",
    "cpu_seconds",
    "interleaved",
    "load_average",
    "machine_info",
    "per_call",
    "percentile",
    "summarize",
    "synthetic_photo",
    "time_calls",
    "timed",
    "write_jpeg",
]


@dataclasses.dataclass
class Goal:
    """One acceptance criterion: a measured ratio against its target.

    Attributes:
        name: what is compared, e.g. ``"tf.data cached / python loop"``.
        value: the measured ratio (``None`` when it could not be measured).
        target: the goal, e.g. ``">= 3"``.
        met: whether ``value`` satisfies ``target`` (``None`` when unmeasured).
        note: why it is missed, or how it was measured.
    """

    name: str
    value: Optional[float]
    target: str
    met: Optional[bool]
    note: str = ""

    @classmethod
    def at_least(cls, name: str, value: Optional[float], bound: float, note: str = "") -> Goal:
        """A goal ``value >= bound``."""
        met = None if value is None else bool(value >= bound)
        return cls(name, _round(value), f">= {bound:g}", met, note)

    @classmethod
    def at_most(cls, name: str, value: Optional[float], bound: float, note: str = "") -> Goal:
        """A goal ``value <= bound``."""
        met = None if value is None else bool(value <= bound)
        return cls(name, _round(value), f"<= {bound:g}", met, note)


@dataclasses.dataclass
class Section:
    """What one benchmark section returns: its table, its goals and how it was run.

    Attributes:
        name: short key (``"pipeline"``, ``"train"``, ...), also the JSON key.
        title: heading of the report section.
        columns: ``(key, header)`` pairs of the table, in order.
        rows: one dict per table row (values for the column keys and any extra fields, which
            go to the JSON only).
        goals: the acceptance criteria measured here.
        notes: sentences printed under the table (what was measured, how noisy it was).
        config: the parameters of the run.
        seconds: wall time of the section.
    """

    name: str
    title: str
    columns: Sequence[tuple]
    rows: List[dict] = dataclasses.field(default_factory=list)
    goals: List[Goal] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    config: Dict[str, object] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "name": self.name,
            "title": self.title,
            "columns": [list(c) for c in self.columns],
            "rows": self.rows,
            "goals": [dataclasses.asdict(g) for g in self.goals],
            "notes": list(self.notes),
            "config": self.config,
            "seconds": round(self.seconds, 1),
        }


def _round(value: Optional[float], digits: int = 3) -> Optional[float]:
    if value is None:
        return None
    return float(f"{float(value):.{digits}g}")


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as ``numpy.percentile``.

    Example: ``percentile([1, 2, 3, 4], 50) == 2.5``.
    """
    return float(np.percentile(np.asarray(samples, np.float64), q))


def summarize(samples: Sequence[float]) -> dict:
    """Median, 95th percentile, min, max and ``noise`` = ``(max - min) / median`` of timings.

    Raises ``ValueError`` on an empty list.

    Example: ``summarize([2, 2, 2])["noise"] == 0.0``.
    """
    if len(samples) == 0:
        raise ValueError("summarize needs at least one sample")
    values = np.asarray(samples, np.float64)
    median = float(np.median(values))
    return {
        "median": median,
        "p95": percentile(values, 95),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
        "noise": float((values.max() - values.min()) / median) if median > 0 else 0.0,
    }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    Example: ``len(time_calls(lambda: None, 3)) == 3``.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """A measurement: calling it runs ``fn`` once and returns the seconds it took.

    Example: ``timed(lambda: None)() >= 0``.
    """

    def measure() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return measure


def per_call(fn: Callable[[], object], min_seconds: float = 0.25) -> Callable[[], float]:
    """A measurement of a short call: calling it runs ``fn`` repeatedly for at least
    ``min_seconds`` (at least once) and returns the seconds per call, so a millisecond call is
    not at the mercy of one scheduler hiccup on a shared machine.

    Example: ``per_call(lambda: None, 0.01)() >= 0``.
    """

    def measure() -> float:
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return elapsed / calls

    return measure


def interleaved(measures: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, list]:
    """Run each measurement once per round, in turn (A, B, C, A, B, C, ...): a load change on
    a shared machine then hits every candidate alike. A measurement returns its own seconds
    (see :func:`timed`), so it can leave its set-up and warm-up out of the time.

    Returns ``{name: [seconds per round]}``.

    Example::

        >>> times = interleaved({"a": timed(lambda: None), "b": timed(lambda: None)}, rounds=2)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 2)
    """
    times = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            times[name].append(float(measure()))
    return times


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, all threads.

    Divided by a wall time it gives the cores a measurement really had: below the cores the
    code could use when the shared machine was busy with other work.
    """
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> Optional[float]:
    """The 1-minute load average (how busy the shared machine was), ``None`` if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """CPU model and count, memory, OS, Python, TensorFlow and the oneDNN setting.

    Example: ``machine_info()["cpu_count"] >= 1``.
    """
    import tensorflow as tf

    memory_gb = None
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "opencv": cv2.__version__,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 Linux)"),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "auto",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "auto",
        "load_average_1min": load_average(),
    }


# Real IDRiD photographs are 246-429 KB JPEGs of 4288 x 2848 (docs/datasets.md section 1); the
# synthetic ones are encoded at the first quality that lands in that range, so decoding costs
# what it costs on the real files.
_JPEG_QUALITIES = (95, 90, 85, 80, 75, 70, 60, 50)


def write_jpeg(path: pathlib.Path, rgb: np.ndarray, max_bytes: Optional[int] = None) -> int:
    """Write ``rgb`` as a JPEG at the highest quality whose file is at most ``max_bytes``
    (quality 95 without a limit); returns the file size.

    Example: ``write_jpeg(tmp / "a.jpg", np.zeros((8, 8, 3), np.uint8)) > 0``.
    """
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    data = b""
    for quality in _JPEG_QUALITIES if max_bytes else _JPEG_QUALITIES[:1]:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError(f"OpenCV could not JPEG-encode an image of shape {rgb.shape}")
        data = buf.tobytes()
        if max_bytes is None or len(data) <= max_bytes:
            break
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


# Drawing a synthetic photograph costs ~16 s at 2848 px and ~0.4 s at 768 px; larger ones are
# drawn at this height and enlarged (cubic for the image, nearest for the masks).
_DRAW_HEIGHT = 768


def synthetic_photo(seed: int, height: int, camera: str = "kowa"):
    """A synthetic fundus photograph ``height`` pixels high, with its lesion masks and grade.

    Args:
        seed: drawing seed (:func:`drkeras.data.synthetic.generate`).
        height: image height; the width follows the camera's aspect (IDRiD's Kowa camera:
            ``4288 x 2848`` for height 2848).
        camera: a camera of ``drkeras.data.synthetic.CAMERAS``.

    Returns:
        ``(image uint8 [H, W, 3], masks uint8 [H, W, 5] in {0, 1}, grade)``.

    Example: ``synthetic_photo(0, 64)[0].shape == (64, 96, 3)``.
    """
    from drkeras.data import synthetic

    f = synthetic.generate(seed, size=min(int(height), _DRAW_HEIGHT), camera=camera)
    image, masks = f.image, f.masks
    if height > _DRAW_HEIGHT:
        width = int(round(height * synthetic.CAMERAS[camera].aspect))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
        masks = np.stack(
            [
                cv2.resize(masks[..., k], (width, height), interpolation=cv2.INTER_NEAREST)
                for k in range(masks.shape[-1])
            ],
            axis=-1,
        )
    return image, masks, int(f.grade)
