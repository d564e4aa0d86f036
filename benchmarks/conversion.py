"""Section 5, conversion: ``data_prep`` images/s on IDRiD-size JPEGs with 1 and 2 workers, and
peak memory at 50 vs 500 images.

``python -m benchmarks.conversion --out DIR`` (or as part of ``python -m benchmarks``).

A few distinct synthetic 4288 x 2848 photographs (JPEG, ~400 KB like the real ones) are written
once and hard-linked into IDRiD part B layouts (``B. Disease Grading/1. Original Images/a.
Training Set/IDRiD_NNN.jpg`` + the grading CSV) of 50 and 500 images. Each conversion
(``data_prep.convert("idrid", ..., max_side=1024)``, the README's command) runs in a fresh
subprocess that reports the seconds of the conversion itself (imports excluded) and its peak
resident memory (``VmHWM`` of ``/proc``: the main process, and the largest worker process).

Goal (issue 8): peak memory must not grow with the dataset (500 vs 50 images).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

from benchmarks import common

__all__ = ["IDRID_HEIGHT", "child_main", "convert_in_subprocess", "make_layout", "run"]

IDRID_HEIGHT = 2848
_IDRID_JPEG_BYTES = 450_000  # real IDRiD JPEGs are 246-429 KB
_TRAIN_IMAGES = ("B. Disease Grading", "1. Original Images", "a. Training Set")
_TRAIN_CSV = (
    "B. Disease Grading",
    "2. Groundtruths",
    "a. IDRiD_Disease Grading_Training Labels.csv",
)


def _distinct_photos(folder: pathlib.Path, count: int, seed: int) -> list:
    """``count`` distinct IDRiD-size JPEGs in ``folder`` (written once, then reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"distinct_{seed + i:03d}.jpg"
        if not path.is_file():
            image, _, _ = common.synthetic_photo(seed + i, IDRID_HEIGHT)
            tmp = path.with_suffix(".tmp")
            common.write_jpeg(tmp, image, max_bytes=_IDRID_JPEG_BYTES)
            tmp.rename(path)
        paths.append(path)
    return paths


def make_layout(root: pathlib.Path, photos: Sequence[pathlib.Path], n: int) -> pathlib.Path:
    """An IDRiD part B training set of ``n`` images at ``root``: hard links to ``photos`` (in
    turn; copies where links are impossible) and the grading CSV. Returns ``root``.

    Example: ``make_layout(tmp / "idrid50", photos, 50)``.
    """
    root = pathlib.Path(root)
    images = root.joinpath(*_TRAIN_IMAGES)
    images.mkdir(parents=True, exist_ok=True)
    lines = ["Image name,Retinopathy grade,Risk of macular edema"]
    for i in range(n):
        name = f"IDRiD_{i + 1:03d}"
        target = images / f"{name}.jpg"
        if not target.exists():
            source = photos[i % len(photos)]
            try:
                os.link(source, target)
            except OSError:
                target.write_bytes(source.read_bytes())
        lines.append(f"{name},{i % 5},{i % 3}")
    csv = root.joinpath(*_TRAIN_CSV)
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return root


def _status_mb(path: pathlib.Path, field: str) -> Optional[float]:
    """A memory field (``VmHWM``: peak resident set, ``VmRSS``) of ``/proc/<pid>/status`` in
    MB, ``None`` when unreadable (the process ended, or not Linux)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _own_peak_mb() -> float:
    """This process's peak resident memory. ``/proc/self/status`` ``VmHWM`` where it exists:
    ``getrusage``'s ``ru_maxrss`` survives ``exec``, so a process started from a large one
    (the benchmark itself, after the train steps) would report its parent's size."""
    peak = _status_mb(pathlib.Path("/proc/self/status"), "VmHWM")
    if peak is not None:
        return peak
    # ru_maxrss is in kilobytes on Linux (bytes on macOS)
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def child_main(options: dict) -> dict:
    """What the subprocess runs: one conversion, timed, with its peak memory.

    ``options``: ``src``, ``out``, ``workers``, ``max_side``. Returns ``seconds``,
    ``cpu_seconds`` (this process and its workers), ``images``,
    ``peak_mb`` (this process), ``workers_peak_mb`` (the largest worker process, 0 without
    workers), ``before_mb`` (this process after imports, before converting).
    """
    import data_prep
    from data_prep import idrid  # noqa: F401  (imported before the clock starts)
    from drkeras.data import records  # noqa: F401  (TensorFlow: seconds to import)

    before = _own_peak_mb()
    cpu_start = _cpu_seconds()
    with _ChildPeak() as workers_peak:
        start = time.perf_counter()
        manifest = data_prep.convert(
            "idrid",
            options["src"],
            options["out"],
            max_side=options["max_side"],
            workers=options["workers"],
            parts=("grading",),
            quiet=True,
        )
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - cpu_start,
        "images": manifest["total"],
        "skipped": len(manifest["skipped"]),
        "before_mb": before,
        "peak_mb": _own_peak_mb(),
        "workers_peak_mb": workers_peak.mb,
    }


class _ChildPeak:
    """Peak resident memory (``VmHWM``) of this process's children, sampled from ``/proc``
    while the block runs (Linux; elsewhere 0). ``getrusage(RUSAGE_CHILDREN)`` would also count
    any helper process a library forked after TensorFlow was imported, at its parent's size."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = str(os.getpid())
        while not self._stop.is_set():
            for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
                try:
                    # "pid (name) state ppid ...": the name may hold spaces, split after it
                    ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
                except (OSError, IndexError):  # the process ended while being read
                    continue
                if ppid == me:
                    peak = _status_mb(stat.with_name("status"), "VmHWM")
                    self.mb = max(self.mb, peak or 0.0)
            self._stop.wait(self.interval)

    def __enter__(self):
        if pathlib.Path("/proc/self/status").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def convert_in_subprocess(src, out, *, workers: int, max_side: Optional[int]) -> dict:
    """Run :func:`child_main` in a fresh Python process and return its report.

    Raises ``RuntimeError`` with the child's output when it fails.
    """
    options = {"src": str(src), "out": str(out), "workers": workers, "max_side": max_side}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.conversion", "--child", json.dumps(options)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not reports:
        raise RuntimeError(
            f"conversion subprocess failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return json.loads(reports[-1])


def run(
    out: pathlib.Path,
    *,
    small: int = 50,
    large: int = 500,
    distinct: int = 4,
    max_side: Optional[int] = 1024,
    seed: int = 0,
) -> common.Section:
    """Measure conversion speed and memory (see the module docstring); returns the section.

    Args:
        out: working folder (``out/conversion``: photographs, layouts, records).
        small, large: image counts compared for memory (2 workers); ``large`` also for 1 vs
            2 workers.
        distinct: distinct photographs behind the hard links.
        max_side: ``--max-side`` of the conversion (``None`` keeps the 4288 px originals).
        seed: seed of the photographs.
    """
    start = time.perf_counter()
    work = pathlib.Path(out) / "conversion"
    photos = _distinct_photos(work / "photos", distinct, seed)
    section = common.Section(
        "conversion",
        "5. Conversion (data_prep idrid, 4288x2848 JPEGs)",
        [
            ("images", "images"),
            ("workers", "workers"),
            ("images_per_s", "images/s"),
            ("speedup", f"vs 1 worker ({large} images)"),
            ("cpu_ms", "CPU ms/img"),
            ("cores", "cores used"),
            ("peak_mb", "peak MB (main)"),
            ("workers_peak_mb", "peak MB (largest worker)"),
            ("growth_mb", "main growth MB"),
        ],
        config=dict(small=small, large=large, distinct=distinct, max_side=max_side),
    )
    # memory: small vs large with 2 workers; speed: 1 vs 2 workers on the large set (on the
    # small one, starting the pool is a large part of a two-second run)
    runs = ((small, 2), (large, 1), (large, 2))
    results = {}
    for n, workers in runs:
        src = make_layout(work / f"idrid_{n}", photos, n)
        report = convert_in_subprocess(
            src, work / f"records_{n}_{workers}", workers=workers, max_side=max_side
        )
        if report["images"] != n:
            raise RuntimeError(f"converted {report['images']} of {n} images: {report}")
        results[(n, workers)] = report
    base = results[(large, 1)]["seconds"] / large
    for (n, workers), r in results.items():
        section.rows.append(
            {
                "images": n,
                "workers": workers,
                "images_per_s": n / r["seconds"],
                "speedup": base / (r["seconds"] / n),
                "cpu_ms": r["cpu_seconds"] / n * 1e3,
                "cores": r["cpu_seconds"] / r["seconds"],
                "peak_mb": r["peak_mb"],
                "workers_peak_mb": r["workers_peak_mb"] or None,
                "growth_mb": r["peak_mb"] - r["before_mb"],
                **{k: v for k, v in r.items() if k not in ("peak_mb", "workers_peak_mb")},
            }
        )
    small_run, large_run = results[(small, 2)], results[(large, 2)]
    for key, what in (("peak_mb", "main process"), ("workers_peak_mb", "largest worker")):
        section.goals.append(
            common.Goal.at_most(
                f"peak memory {large} / {small} images, {what} (2 workers)",
                large_run[key] / small_run[key] if small_run[key] else None,
                1.1,
                f"{small_run[key]:.0f} MB vs {large_run[key]:.0f} MB",
            )
        )
    section.notes.append(
        f"--max-side {max_side}, {distinct} distinct photographs hard-linked {large} times; "
        "each conversion in a fresh process (TensorFlow imports excluded from the time); one "
        "run per setting. 'cores used' = CPU time / wall time: below the worker count when the "
        "machine does not give the workers a core each."
    )
    section.seconds = time.perf_counter() - start
    return section


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.conversion``: run the section, or (``--child``) one conversion."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conversion", description=__doc__)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=500)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    drkeras.startup.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return 0
    if args.out is None:
        parser.error("--out is required")
    from benchmarks import report

    section = run(args.out, small=args.small, large=args.large)
    print(report.markdown_table(section.columns, section.rows))
    for goal in section.goals:
        print(f"{goal.name}: {goal.value} (goal {goal.target}, met: {goal.met}) {goal.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
