"""Synthetic fundus photographs, their labels, the dataset layouts and the contact sheet."""

import argparse
import statistics
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from data_prep import contact_sheet
from data_prep import synthetic as synthetic_cli
from drkeras import keys
from drkeras.data import synthetic

MA, HE, EX, SE, OD = range(5)
SIZE = 96


def _fov(f):
    """Pixels of the field of view (bright enough) of a generated photograph."""
    return np.maximum(f.image[..., 0], f.image[..., 1]) > 25


def test_same_seed_same_image_and_other_seed_differs():
    a = synthetic.generate(5, size=64)
    b = synthetic.generate(5, size=64)
    c = synthetic.generate(6, size=64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert (a.grade, a.dme, a.camera, a.eye) == (b.grade, b.dme, b.camera, b.eye)
    assert not np.array_equal(a.image, c.image[: a.image.shape[0], : a.image.shape[1]])


def test_same_eye_at_every_resolution():
    small = synthetic.generate(11, size=64, grade=3)
    large = synthetic.generate(11, size=128, grade=3)
    assert small.image.shape[0] * 2 == large.image.shape[0]
    assert (small.camera, small.eye, small.true_grade, small.dme) == (
        large.camera,
        large.eye,
        large.true_grade,
        large.dme,
    )
    assert small.lesion_counts == large.lesion_counts
    np.testing.assert_allclose(np.array(large.od_center), 2 * np.array(small.od_center), atol=1.0)
    np.testing.assert_allclose(large.od_radius, 2 * small.od_radius, rtol=1e-6)


@pytest.mark.parametrize("grade", range(5))
def test_grade_follows_the_lesions_drawn(grade):
    for seed in range(3):
        f = synthetic.generate(100 + seed, size=SIZE, grade=grade)
        counts = f.lesion_counts
        assert f.true_grade == grade == f.grade
        assert synthetic.icdrs_grade(counts) == grade
        lesion_pixels = f.masks[..., :OD].reshape(-1, 4).sum(axis=0)
        if grade == 0:
            assert lesion_pixels.tolist() == [0, 0, 0, 0]
        if grade == 1:
            assert lesion_pixels[MA] > 0 and lesion_pixels[HE:].tolist() == [0, 0, 0]
        if grade == 3:
            assert min(counts["HE_quadrants"]) >= synthetic.SEVERE_HE_PER_QUADRANT
        if grade == 4:
            assert counts["NV"] > 0
        # a lesion type that was drawn has pixels in its mask and vice versa
        for name, k in (("MA", MA), ("HE", HE), ("EX", EX), ("SE", SE)):
            assert (counts[name] > 0) == (lesion_pixels[k] > 0), (name, counts, lesion_pixels)


def test_icdrs_and_messidor_rules_on_hand_made_counts():
    def counts(ma=0, he=0, ex=0, se=0, nv=0, quadrants=(0, 0, 0, 0)):
        return {"MA": ma, "HE": he, "EX": ex, "SE": se, "NV": nv, "HE_quadrants": quadrants}

    table = [
        (counts(), 0, 0),
        (counts(ma=3), 1, 1),
        (counts(ma=6), 1, 2),
        (counts(ma=15), 1, 3),
        (counts(ma=2, ex=4), 2, 1),
        (counts(he=4, quadrants=(1, 1, 1, 1)), 2, 2),
        (counts(he=19, quadrants=(5, 5, 5, 4)), 2, 3),
        (counts(he=20, quadrants=(5, 5, 5, 5)), 3, 3),
        (counts(ma=1, nv=3), 4, 3),
    ]
    for c, icdrs, messidor in table:
        assert synthetic.icdrs_grade(c) == icdrs, c
        assert synthetic.messidor_grade(c) == messidor, c


def test_dme_follows_exudate_distance_to_fovea():
    seen = set()
    for seed in range(12):
        f = synthetic.generate(seed, size=SIZE, grade=2 + seed % 3)
        ys, xs = np.nonzero(f.masks[..., EX])
        if len(ys) == 0:
            expected = 0
        else:
            near = np.hypot(xs - f.fovea[0], ys - f.fovea[1]).min() <= 2 * f.od_radius
            expected = 2 if near else 1
        assert f.dme == expected
        seen.add(f.dme)
    assert seen == {0, 1, 2}


def test_anatomy_and_lesions_look_like_fundus_photographs():
    for seed in range(4):
        f = synthetic.generate(200 + seed, size=128, grade=3)
        img = f.image.astype(np.float32)
        fov = _fov(f)
        # black surround, bright FOV; red dominates the retina
        assert img[0, 0].max() < 30 and img[-1, -1].max() < 30
        retina = fov & (f.masks.max(axis=-1) == 0)
        r, g, b = (img[..., c][retina].mean() for c in range(3))
        assert r > g > b
        # optic disc: brighter than the retina
        disc = f.masks[..., OD] > 0
        assert img[disc].mean() > img[retina].mean() + 20
        # red lesions are darker in green than their surroundings, exudates brighter
        ring = cv2.dilate(f.masks[..., HE], np.ones((7, 7), np.uint8)) - f.masks[..., HE]
        ring = (ring > 0) & retina
        assert img[..., 1][f.masks[..., HE] > 0].mean() < img[..., 1][ring].mean()
        if f.masks[..., EX].any():
            assert img[..., 1][f.masks[..., EX] > 0].mean() > img[..., 1][retina].mean() + 30


def test_masks_are_binary_inside_the_field_of_view():
    f = synthetic.generate(3, size=SIZE, grade=4, camera="kowa")
    assert f.masks.dtype == np.uint8 and f.image.dtype == np.uint8
    assert f.masks.shape == f.image.shape[:2] + (keys.NUM_LESIONS,)
    assert set(np.unique(f.masks)) <= {0, 1}
    annotated = f.masks.max(axis=-1) > 0
    outside = annotated & ~_fov(f)
    assert outside.sum() <= 0.02 * annotated.sum()  # only dark lesion pixels near the rim
    # the Kowa camera's FOV is wider than the frame: clipped at the top and bottom
    width = f.image.shape[1]
    assert _fov(f)[0, width // 2] and _fov(f)[-1, width // 2]
    assert f.image.shape[1] == round(SIZE * 4288 / 2848)


def test_cameras_differ_in_colour_and_geometry():
    means = {}
    for name in synthetic.CAMERAS:
        f = synthetic.generate(7, size=64, grade=0, camera=name)
        assert f.camera == name
        assert f.image.shape[1] == round(64 * synthetic.CAMERAS[name].aspect)
        means[name] = f.image[_fov(f)].mean(axis=0)
    assert means["dim"].sum() < means["kowa"].sum()
    with pytest.raises(ValueError, match="camera must be one of"):
        synthetic.generate(0, camera="nikon")


def test_label_noise_moves_grades_by_one_step():
    flipped = 0
    for seed in range(40):
        f = synthetic.generate(seed, size=32, label_noise=1.0)
        assert abs(f.grade - f.true_grade) == 1 and 0 <= f.grade <= 4
        clean = synthetic.generate(seed, size=32, label_noise=0.0)
        assert clean.grade == clean.true_grade == f.true_grade
        noisy = synthetic.generate(seed, size=32, label_noise=0.3)
        flipped += noisy.grade != noisy.true_grade
    assert 4 <= flipped <= 22  # Binomial(40, 0.3): mean 12
    with pytest.raises(ValueError, match="label_noise"):
        synthetic.generate(0, label_noise=1.5)


def test_generation_is_fast():
    synthetic.generate(0, size=256)
    times = []
    for seed in range(5):
        start = time.perf_counter()
        synthetic.generate(seed, size=256)
        times.append(time.perf_counter() - start)
    # ~0.045 s measured on an idle core; the bound leaves room for a shared CI machine
    assert statistics.median(times) < 0.2


def test_bad_arguments_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="size must be at least 16"):
        synthetic.generate(0, size=8)
    with pytest.raises(ValueError, match="grade must be None or in"):
        synthetic.generate(0, grade=5)
    with pytest.raises(ValueError, match="layout must be one of"):
        synthetic.write_layout("/nonexistent", "kaggle")
    with pytest.raises(ValueError, match="unknown count keys"):
        synthetic.write_layout("/nonexistent", "idrid", counts={"train": 3})


# --------------------------------------------------------------------------------------------
# Layouts


def _idrid_counts():
    return {"seg_train": 3, "seg_test": 2, "grading_train": 6, "grading_test": 5}


@pytest.fixture(scope="module")
def idrid_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "idrid"
    synthetic.write_layout(root, "idrid", counts=_idrid_counts(), size=48, seed=3)
    return root


def test_idrid_segmentation_layout_and_palette_masks(idrid_root):
    seg = idrid_root / "A. Segmentation"
    train_images = sorted((seg / "1. Original Images" / "a. Training Set").glob("*.jpg"))
    test_images = sorted((seg / "1. Original Images" / "b. Testing Set").glob("*.jpg"))
    assert [p.name for p in train_images] == ["IDRiD_01.jpg", "IDRiD_02.jpg", "IDRiD_03.jpg"]
    assert [p.name for p in test_images] == ["IDRiD_04.jpg", "IDRiD_05.jpg"]
    gt = seg / "2. All Segmentation Groundtruths" / "a. Training Set"
    masks = sorted(gt.glob("*/*.tif"))
    assert masks, "no mask written"
    for path in masks:
        img = Image.open(path)
        assert img.mode == "P" and img.tag_v2[258] == (1,) and img.tag_v2[262] == 3
        assert img.getpalette()[:6] == [0, 0, 0, 255, 0, 0]
        values = np.asarray(img)
        assert set(np.unique(values)) == {0, 1}  # an empty mask has no file at all
        assert set(np.unique(np.asarray(img.convert("L")))) == {0, 76}
        assert set(np.unique(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))) == {0, 76}
    # each file holds exactly the mask the generator drew; an empty mask has no file
    written = cv2.cvtColor(cv2.imread(str(train_images[0])), cv2.COLOR_BGR2RGB).astype(float)
    seed = synthetic._image_seed(3, "idrid-seg", 1)
    candidates = [synthetic.generate(seed, size=48, grade=g, camera="kowa") for g in range(5)]
    errors = [np.abs(c.image - written).mean() for c in candidates]
    f = candidates[int(np.argmin(errors))]
    assert min(errors) < 4.0  # JPEG quality 95
    for k, (lesion, folder) in enumerate(zip(keys.LESIONS, synthetic._IDRID_LESION_DIRS)):
        path = gt / folder / f"IDRiD_01_{lesion}.tif"
        assert path.exists() == bool(f.masks[..., k].any()), lesion
        if path.exists():
            np.testing.assert_array_equal(np.asarray(Image.open(path)), f.masks[..., k])


def test_idrid_grading_csv_bytes_have_the_real_quirks(idrid_root):
    truth = idrid_root / "B. Disease Grading" / "2. Groundtruths"
    train = (truth / "a. IDRiD_Disease Grading_Training Labels.csv").read_bytes()
    test = (truth / "b. IDRiD_Disease Grading_Testing Labels.csv").read_bytes()
    train_lines = train.split(b"\r\n")
    assert train_lines[0] == b"Image name,Retinopathy grade,Risk of macular edema,,,,,,,,,"
    assert train_lines[-1] == b"" and b"\n" not in b"".join(train_lines)
    rows = train_lines[1:-1]
    assert len(rows) == 6 and all(r.count(b",") == 11 for r in rows)
    assert sum(r.endswith(b" ") for r in rows) == 1
    assert sorted(int(r.split(b",")[1]) for r in rows) == [0, 0, 1, 2, 3, 4]
    test_lines = test.split(b"\r\n")
    assert test_lines[0] == b"Image name,Retinopathy grade,Risk of macular edema"
    assert test_lines[1].startswith(b"IDRiD_001,") and test_lines[1].count(b",") == 2
    images = idrid_root / "B. Disease Grading" / "1. Original Images"
    assert (images / "b. Testing Set" / "IDRiD_001.jpg").is_file()
    assert (images / "a. Training Set" / "IDRiD_006.jpg").is_file()


def test_idrid_layout_matches_the_real_files(idrid_root, idrid_mini):
    real_mask = next((idrid_mini / "A. Segmentation").rglob("IDRiD_01_HE.tif"))
    ours = next((idrid_root / "A. Segmentation").rglob("IDRiD_0*_OD.tif"))
    real, mine = Image.open(real_mask), Image.open(ours)
    for tag in (258, 259, 262, 277, 320):
        assert real.tag_v2[tag] == mine.tag_v2[tag], tag
    name = "a. IDRiD_Disease Grading_Training Labels.csv"
    real_header = (idrid_mini / "B. Disease Grading" / "2. Groundtruths" / name).read_bytes()
    our_header = (idrid_root / "B. Disease Grading" / "2. Groundtruths" / name).read_bytes()
    assert real_header.split(b"\r\n")[0] == our_header.split(b"\r\n")[0]


def test_eyepacs_ddr_messidor_layouts(tmp_path):
    eyepacs = synthetic.write_layout(
        tmp_path / "eyepacs", "eyepacs", counts={"train": 10, "public": 3, "private": 2}, size=32
    )
    labels = (eyepacs / "trainLabels.csv").read_text().splitlines()
    assert labels[0] == "image,level" and len(labels) == 11
    names = [line.split(",")[0] for line in labels[1:]]
    assert all((eyepacs / "train" / f"{n}.jpeg").is_file() for n in names)
    assert all(n.endswith(("_left", "_right")) for n in names)
    blank = cv2.imread(str(eyepacs / "train" / f"{names[1]}.jpeg"))
    assert blank.max() <= 30  # EyePACS ships blank training photographs
    solution = (eyepacs / "retinopathy_solution.csv").read_text().splitlines()
    assert solution[0] == "image,level,Usage"
    assert (
        sorted(line.rsplit(",", 1)[1] for line in solution[1:]) == ["Private"] * 2 + ["Public"] * 3
    )

    ddr = synthetic.write_layout(
        tmp_path / "ddr",
        "ddr",
        counts={"grading_train": 10, "grading_valid": 2, "grading_test": 2, "seg_valid": 2},
        size=32,
    )
    lines = (ddr / "DR_grading" / "train.txt").read_text().splitlines()
    grades = [int(line.split(" ")[1]) for line in lines]
    assert 5 in grades and set(grades) <= set(range(6))
    assert all((ddr / "DR_grading" / "train" / line.split(" ")[0]).is_file() for line in lines)
    valid = ddr / "lesion_segmentation" / "valid"
    assert (valid / "segmentation label").is_dir() and not (valid / "label").exists()
    stem = sorted((valid / "image").glob("*.jpg"))[0].stem
    for lesion in ("EX", "HE", "MA", "SE"):
        mask = Image.open(valid / "segmentation label" / lesion / f"{stem}.tif")
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}

    xlrd = pytest.importorskip("xlrd")
    messidor = synthetic.write_layout(
        tmp_path / "messidor", "messidor", counts={"Base11": 5, "Base32": 3}, size=32
    )
    sheet = xlrd.open_workbook(str(messidor / "Base11" / "Annotation_Base11.xls")).sheet_by_name(
        "Feuil1"
    )
    assert sheet.row_values(0) == [
        "Image name",
        "Ophthalmologic department",
        "Retinopathy grade",
        "Risk of macular edema ",
    ]
    for row in range(1, sheet.nrows):
        name, _, grade, dme = sheet.row_values(row)
        assert (messidor / "Base11" / name).is_file() and name.endswith("_0100_PP.tif")
        assert 0 <= grade <= 3 and 0 <= dme <= 2
    assert Image.open(messidor / "Base11" / sheet.row_values(1)[0]).mode == "RGB"
    assert (messidor / "Base32" / "Annotation_Base32.xls").is_file()


def test_scaled_counts_and_command_line(tmp_path, capsys):
    assert synthetic.scaled_counts("eyepacs", 0.5) == {"train": 10, "public": 5, "private": 5}
    assert min(synthetic.scaled_counts("ddr", 0.01).values()) == 1
    parser = argparse.ArgumentParser()
    synthetic_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--layout", "ddr", "--out", str(tmp_path / "ddr"), "--size", "32", "--count-scale", "0.2"]
    )
    assert synthetic_cli.run(args) == 0
    assert "wrote a synthetic ddr layout" in capsys.readouterr().out
    assert len((tmp_path / "ddr" / "DR_grading" / "train.txt").read_text().splitlines()) == 4
    args = parser.parse_args(
        ["--layout", "ddr", "--out", str(tmp_path / "x"), "--count-scale", "0"]
    )
    assert synthetic_cli.run(args) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--layout", "kaggle", "--out", str(tmp_path)])


def test_contact_sheet_renders_images_and_overlays(tmp_path):
    image = np.full((40, 40, 3), 200, np.uint8)
    masks = np.zeros((40, 40, 5), np.uint8)
    masks[5:10, 5:10, HE] = 1
    masks[20:30, 20:30, EX] = 1
    masks[2:38, 2:38, OD] = 1
    painted = contact_sheet.overlay(image, masks)
    assert (painted[5:10, 5:10] == contact_sheet.LESION_COLOURS["HE"]).all()
    assert (painted[20:30, 20:30] == contact_sheet.LESION_COLOURS["EX"]).all()
    assert (painted[2, 20] == contact_sheet.LESION_COLOURS["OD"]).all()  # disc outline only
    assert (painted[15, 15] == 90).all()  # elsewhere the photograph dimmed to 45 %
    out = tmp_path / "sheet.png"
    assert contact_sheet.main(["--out", str(out), "--size", "48", "--n", "3"]) == 0
    sheet = cv2.imread(str(out))
    assert sheet is not None and sheet.shape[0] > 200 and sheet.shape[1] > 400


def test_messidor2_layout_converts_with_its_adjudicated_grades(tmp_path):
    import data_prep
    from drkeras.data import pipeline

    raw = synthetic.write_layout(tmp_path / "raw", "messidor2", counts={"test": 10}, size=48)
    rows = [line.split(",") for line in (raw / "messidor_data.csv").read_text().splitlines()]
    assert rows[0] == [
        "image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"
    ]  # fmt: skip
    assert [r[3] for r in rows[1:]] == ["1"] * 9 + ["0"]  # the last one is ungradable
    assert all((raw / "IMAGES" / r[0]).is_file() and r[0].endswith(".png") for r in rows[1:])
    assert {int(r[1]) for r in rows[1:]} <= set(range(5)) and {r[2] for r in rows[1:]} <= {"0", "1"}
    manifest = data_prep.convert("messidor2", raw, tmp_path / "records", quiet=True)
    assert manifest["counts"] == {"test": 9}
    assert manifest["skipped_by_kind"] == {"ungradable": 1}
    labels = pipeline.read_labels(tmp_path / "records", "test")
    expected = {f"messidor2-test-{r[0][:-4]}": int(r[1]) for r in rows[1:10]}
    assert dict(zip(labels["id"], labels["grade"].tolist())) == expected
