"""Evidence that the methods learn: ``make evidence`` (``python -m drkeras.evidence``).

One command runs, into ``--out`` (default ``runs/evidence``):

1. **Runs**: every experiment's ``mini`` preset (``experiments/<paper>.py --preset mini``) for
   seeds ``0 .. seeds-1``, each into ``<out>/<paper>_seed<s>/`` with its console output in
   ``run.log``: all papers at seed 0 first, then the further seeds, so one seed of every row
   exists as early as possible.
2. **Claims**: each paper's directional claims (``CLAIMS``, :mod:`drkeras.claims`) over the
   seeds that finished, into ``claims.md`` (a paired t-test needs two seeds at least; with fewer
   the verdict reads "not shown").
3. **Leaderboard**: every export of the seed-0 runs evaluated on one held-out synthetic IDRiD
   test split, generated here with a seed no run trains on (:mod:`drkeras.leaderboard`), into
   ``leaderboard/``.
4. **Figures**: ``learning_curves.png`` (every stage's training loss per epoch, per paper, from
   the seed-0 runs' ``history.csv``) and ``overlays.png`` (the first prediction overlay of every
   model that segments, from the leaderboard's evaluation).

``evidence.md`` lists every part with the seconds it took (also in ``times.json``).

Running the same command again resumes: a run with its ``evidence_done.json`` is not run again,
an interrupted run continues from its stage checkpoints (the experiments' own resume), and the
claims, leaderboard and figures are rebuilt from what exists (they take minutes). A run that fails
stops the whole command with its exit code and the end of its ``run.log``, naming the file.

Examples::

    python -m drkeras.evidence                            # the five minis, 3 seeds each
    python -m drkeras.evidence --papers mtunet --seeds 1  # one paper, one seed
    python -m drkeras.evidence --preset smoke --out /tmp/ev --seeds 2   # minutes: checks the wiring
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import subprocess
import sys
import time
from typing import Dict, Mapping, Optional, Sequence

log = logging.getLogger("drkeras.evidence")

__all__ = ["PAPERS", "evidence", "learning_curves", "main", "overlay_sheet"]

PAPERS = ("mtunet", "pldmlt", "collaborative", "ssl_gan", "cooperative")
ROOT = pathlib.Path(__file__).resolve().parents[1]
DONE = "evidence_done.json"
FINISHED_EARLIER = "finished earlier"  # a run another invocation made (evidence.md's note)
# The leaderboard's held-out images: IDRiD (segmentation and grading splits) at the published
# IDRiD-S counts, from a generator seed no run uses (runs draw their data from --seed 0, 1, 2).
LEADERBOARD_DATASET = "idrid"
LEADERBOARD_SEED = 1000
LEADERBOARD_SIZE = 256
LEADERBOARD_SCALE = 6.75


class EvidenceError(RuntimeError):
    """A run of ``make evidence`` failed; the message names its log file."""


def run_dir(out: pathlib.Path, paper: str, seed: int) -> pathlib.Path:
    return out / f"{paper}_seed{seed}"  # the folder name is the leaderboard's run name


def _tail(path: pathlib.Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_once(
    paper: str,
    seed: int,
    directory: pathlib.Path,
    *,
    preset: str,
    overrides: Sequence[str] = (),
    python: str = sys.executable,
) -> Dict[str, object]:
    """Run ``experiments/<paper>.py`` at ``preset`` and ``seed`` into ``directory`` unless it
    finished before; returns ``{"seconds", "resumed"}`` (``resumed``: skipped as done).

    Raises:
        EvidenceError: the run exited non-zero (message: exit code, log file, its last lines).
    """
    done = directory / DONE
    if done.is_file():
        return {**json.loads(done.read_text()), "resumed": True}
    directory.mkdir(parents=True, exist_ok=True)
    command = [python, str(ROOT / "experiments" / f"{paper}.py"), "--preset", preset]
    command += ["--seed", str(seed), "--out", str(directory)]
    for item in overrides:
        command += ["--set", item]
    log_path = directory / "run.log"
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as stream:
        stream.write(f"$ {' '.join(command)}\n")
        stream.flush()
        code = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = round(time.time() - start, 1)
    if code != 0:
        raise EvidenceError(
            f"{paper} seed {seed} failed (exit code {code}); its log is {log_path}:\n"
            + _tail(log_path)
        )
    record = {"paper": paper, "seed": seed, "preset": preset, "seconds": seconds}
    tmp = done.with_name(DONE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(done)
    return {**record, "resumed": False}


def learning_curves(histories: Mapping[str, pathlib.Path], path) -> pathlib.Path:
    """One panel per paper: the training loss of every stage per epoch (log scale), the stages
    one after another along the x axis, each in its own colour; from the runs' ``history.csv``."""
    import matplotlib
    import pandas as pd

    from drkeras import plots

    papers = [p for p, h in histories.items() if pathlib.Path(h).is_file()]
    if not papers:
        raise ValueError("no history.csv to draw learning curves from")
    cols = min(3, len(papers))
    rows = -(-len(papers) // cols)
    fig = plots.new_figure((5.0 * cols, 3.6 * rows))
    for i, paper in enumerate(papers):
        frame = pd.read_csv(histories[paper])
        ax = fig.add_subplot(rows, cols, i + 1)
        stages = list(dict.fromkeys(frame["stage"].astype(str)))
        colours = matplotlib.colormaps["tab20"].resampled(max(len(stages), 1))
        x0 = 0
        for k, stage in enumerate(stages):
            part = frame[frame["stage"].astype(str) == stage]
            loss = part["loss"].to_numpy(float) if "loss" in part else []
            xs = list(range(x0 + 1, x0 + len(loss) + 1))
            ax.plot(xs, loss, "-", color=colours(k), linewidth=1.2, label=stage)
            x0 += len(loss)
        ax.set_yscale("log")
        ax.set_title(f"{paper}: training loss per epoch", fontsize=10)
        ax.set_xlabel("epoch (stages one after another)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, ncol=2, loc="upper right")
    fig.tight_layout()
    return plots.save_figure(fig, path)


def overlay_sheet(model_dirs: Mapping[str, pathlib.Path], path) -> Optional[pathlib.Path]:
    """The first ``overlay_*.png`` of every model folder side by side (``None`` when no model
    wrote one: nothing segments)."""
    import matplotlib.image as mpimg

    from drkeras import plots

    found = []
    for name, folder in model_dirs.items():
        files = sorted(pathlib.Path(folder).glob("overlay_*.png"))
        if files:
            found.append((name, files[0]))
    if not found:
        return None
    fig = plots.new_figure((10.0, 5.5 * len(found)))
    for i, (name, file) in enumerate(found):
        ax = fig.add_subplot(len(found), 1, i + 1)
        ax.imshow(mpimg.imread(file))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return plots.save_figure(fig, path)


def leaderboard_records(out: pathlib.Path) -> pathlib.Path:
    """The held-out synthetic IDRiD records the leaderboard evaluates on (made once)."""
    from drkeras.config import DataConfig
    from drkeras.experiment import synthetic_records

    data = DataConfig(synthetic_scale=LEADERBOARD_SCALE, synthetic_size=LEADERBOARD_SIZE)
    return synthetic_records(LEADERBOARD_DATASET, out / "leaderboard_data", data, LEADERBOARD_SEED)


def evidence(
    out,
    *,
    papers: Sequence[str] = PAPERS,
    seeds: int = 3,
    preset: str = "mini",
    overrides: Sequence[str] = (),
    leaderboard_images: int = 0,
) -> Dict[str, object]:
    """Runs, claims, leaderboard and figures into ``out`` (module docstring); returns
    ``{"times": {part: seconds}, "md": path of evidence.md}``."""
    from drkeras import claims as claims_module
    from drkeras import leaderboard as leaderboard_module

    unknown = [p for p in papers if p not in PAPERS]
    if unknown:
        raise ValueError(f"unknown papers {unknown}: expected some of {', '.join(PAPERS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be 1 or more, got {seeds}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: Dict[str, Dict[str, object]] = {}
    for seed in range(seeds):
        for paper in papers:
            log.info("evidence: %s seed %d (%s preset)", paper, seed, preset)
            record = run_once(
                paper, seed, run_dir(out, paper, seed), preset=preset, overrides=overrides
            )
            times[f"{paper} seed {seed}"] = {
                "seconds": record["seconds"],
                "note": FINISHED_EARLIER if record["resumed"] else "",
            }

    start = time.time()
    sections = []
    for paper in papers:
        runs = [run_dir(out, paper, s) for s in range(seeds)]
        title, claims = claims_module.experiment_claims(paper)
        results = claims_module.check_claims(claims, runs)
        sections.append(claims_module.claims_markdown(title, results, runs))
    header = (
        f"# The papers' claims on the {preset} preset, {seeds} seed(s)\n\n"
        "Verdicts as :mod:`drkeras.claims` computes them (one-sided paired t-test, alpha 0.05); "
        "nothing is tuned towards them.\n\n"
    )
    (out / "claims.md").write_text(header + "\n".join(sections), encoding="utf-8")
    times["claims"] = {"seconds": round(time.time() - start, 1), "note": "claims.md"}

    start = time.time()
    records = leaderboard_records(out)
    board = leaderboard_module.leaderboard(
        [run_dir(out, p, 0) for p in papers],
        records,
        split="test",
        out_dir=out / "leaderboard",
        max_examples=leaderboard_images,
    )
    times["leaderboard"] = {
        "seconds": round(time.time() - start, 1),
        "note": f"{board['n']} held-out images",
    }

    start = time.time()
    learning_curves(
        {p: run_dir(out, p, 0) / "history.csv" for p in papers}, out / "learning_curves.png"
    )
    models = sorted((out / "leaderboard" / "models").glob("*"))
    sheet = overlay_sheet({m.name: m for m in models}, out / "overlays.png")
    times["figures"] = {
        "seconds": round(time.time() - start, 1),
        "note": "learning_curves.png" + (", overlays.png" if sheet else " (no model segments)"),
    }
    (out / "times.json").write_text(json.dumps(times, indent=1) + "\n")
    md = out / "evidence.md"
    md.write_text(_summary(preset, seeds, papers, times, board), encoding="utf-8")
    return {"times": times, "md": md}


def _summary(preset, seeds, papers, times, board) -> str:
    total = sum(float(t["seconds"]) for t in times.values() if t["note"] != FINISHED_EARLIER)
    lines = [
        f"# Evidence: the {preset} presets of {', '.join(papers)}, {seeds} seed(s)",
        "",
        "- runs: `<paper>_seed<s>/` (results.md beside the papers' numbers, history.csv, "
        "export/)",
        "- claims: [claims.md](claims.md)",
        f"- leaderboard: [leaderboard/leaderboard.md](leaderboard/leaderboard.md) "
        f"({board['n']} held-out synthetic IDRiD test images)",
        "- figures: learning_curves.png, overlays.png",
        "",
        "| part | seconds | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {part} | {t['seconds']} | {t['note']} |" for part, t in times.items()]
    lines += ["", f"Time spent by this invocation: {total / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.evidence",
        description="Mini presets over seeds, the papers' claims, one leaderboard, figures.",
    )
    parser.add_argument("--out", default="runs/evidence")
    parser.add_argument("--papers", nargs="+", default=list(PAPERS), choices=PAPERS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--preset", default="mini", help="mini (default); smoke checks wiring")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="passed to every run",
    )  # fmt: skip
    parser.add_argument(
        "--leaderboard-images", type=int, default=0, help="at most this many images (0: all)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = evidence(
            args.out,
            papers=args.papers,
            seeds=args.seeds,
            preset=args.preset,
            overrides=args.overrides,
            leaderboard_images=args.leaderboard_images,
        )
    except (EvidenceError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result["md"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
