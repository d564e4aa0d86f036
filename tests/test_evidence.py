"""make evidence: runs resume from their marker, a failed run names its log, the figures, and
(slow) the whole chain on the smoke preset of one paper, twice."""

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from drkeras import evidence


def _history(path, stages):
    lines = ["stage,epoch,loss,seg_loss"]
    for stage, losses in stages.items():
        lines += [f"{stage},{k + 1},{v},{v / 2}" for k, v in enumerate(losses)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_learning_curves_one_panel_per_paper(tmp_path):
    histories = {
        "mtunet": _history(tmp_path / "a" / "history.csv", {"seg": [1.0, 0.5, 0.2], "c": [2, 1]}),
        "pldmlt": _history(tmp_path / "b" / "history.csv", {"s1": [0.9, 0.3]}),
        "ssl_gan": tmp_path / "missing" / "history.csv",  # not run: left out, no panel
    }
    out = evidence.learning_curves(histories, tmp_path / "curves.png")
    height, width = mpimg.imread(out).shape[:2]
    # two panels side by side (5 x 3.6 inches each at the project's dpi)
    assert width > 1.8 * height
    with pytest.raises(ValueError, match="no history.csv"):
        evidence.learning_curves({"x": tmp_path / "none.csv"}, tmp_path / "none.png")


def test_overlay_sheet_takes_the_first_overlay_of_each_model(tmp_path):
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for folder in (a, b, c):
        folder.mkdir()
    mpimg.imsave(a / "overlay_lesion_probs_0_x.png", np.zeros((8, 16, 3)))
    mpimg.imsave(a / "overlay_lesion_probs_1_y.png", np.ones((8, 16, 3)))
    mpimg.imsave(b / "overlay_seg_probs_0_z.png", np.ones((8, 16, 3)))
    assert evidence.overlay_sheet({"c": c}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    out = evidence.overlay_sheet({"a": a, "b": b, "c": c}, tmp_path / "sheet.png")
    height, width = mpimg.imread(out).shape[:2]
    assert height > width  # two rows (a and b), c has nothing to show


def test_a_finished_run_is_not_run_again(tmp_path):
    folder = tmp_path / "mtunet" / "seed0"
    folder.mkdir(parents=True)
    record = {"paper": "mtunet", "seed": 0, "preset": "mini", "seconds": 612.5}
    (folder / evidence.DONE).write_text(json.dumps(record))
    # python=/nonexistent: any attempt to start the run would raise
    got = evidence.run_once("mtunet", 0, folder, preset="mini", python="/nonexistent")
    assert got == {**record, "resumed": True}


def test_a_failed_run_names_its_log_and_leaves_no_marker(tmp_path):
    folder = tmp_path / "cooperative" / "seed0"
    with pytest.raises(evidence.EvidenceError, match=r"exit code 2.*run\.log") as error:
        evidence.run_once("cooperative", 0, folder, preset="no_such_preset")
    assert "invalid choice: 'no_such_preset'" in str(error.value)  # the run's own words
    assert (folder / "run.log").is_file()
    assert not (folder / evidence.DONE).exists()


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown papers"):
        evidence.evidence(tmp_path / "ev", papers=["nope"])
    with pytest.raises(ValueError, match="seeds must be 1 or more"):
        evidence.evidence(tmp_path / "ev", papers=["mtunet"], seeds=0)
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_evidence_chain_on_the_smoke_preset_resumes(tmp_path):
    out = tmp_path / "ev"
    result = evidence.evidence(out, papers=["ssl_gan"], seeds=2, preset="smoke")
    times = result["times"]
    assert set(times) == {"ssl_gan seed 0", "ssl_gan seed 1", "claims", "leaderboard", "figures"}
    assert all(t["note"] != evidence.FINISHED_EARLIER for t in times.values())
    claims = (out / "claims.md").read_text()
    assert "ssl_gan" in claims.lower() or "Lecouat" in claims
    assert "seeds" in claims and "| 2 |" in claims  # both seeds paired
    assert (out / "leaderboard" / "leaderboard.md").is_file()
    assert (out / "learning_curves.png").is_file()
    # again: the runs are taken as they are, the rest is rebuilt
    again = evidence.evidence(out, papers=["ssl_gan"], seeds=2, preset="smoke")["times"]
    assert again["ssl_gan seed 1"]["note"] == evidence.FINISHED_EARLIER
    assert again["ssl_gan seed 1"]["seconds"] == times["ssl_gan seed 1"]["seconds"]
