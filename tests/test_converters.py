"""Dataset converters: the real IDRiD files, tiny layouts written in each dataset's on-disk format,
and every kind of bad input (skipped, counted and explained; never a crash or a partial shard)."""

import json
import os
import pathlib
import shutil
import signal

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data_prep
from data_prep import common
from data_prep.__main__ import main
from drkeras import keys
from drkeras.data import records

IDRID_SEG = "A. Segmentation"
IDRID_GRADING = "B. Disease Grading"
TRAIN_CSV = "a. IDRiD_Disease Grading_Training Labels.csv"
TEST_CSV = "b. IDRiD_Disease Grading_Testing Labels.csv"


# --------------------------------------------------------------------------------------------
# Helpers writing files in the datasets' formats


def _photo(height, width, seed):
    """A smooth random RGB image (compresses like a photograph)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _save(path, array, **kwargs):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _blobs(height, width, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 3), rng.integers(0, width - 3)
        mask[y : y + 3, x : x + 3] = 1
    return mask


def _palette_tif(path, mask):
    """IDRiD's mask format: palette TIFF, index 0 black, index 1 red."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="TIFF")
    return path


def _text(path, text, newline="\n"):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline=newline) as f:
        f.write(text)
    return path


def _read_all(out):
    """Every record of a converted folder, keyed by id."""
    found = {}
    for split in keys.SPLITS:
        try:
            ds = records.records_dataset(out, split)
        except FileNotFoundError:
            continue
        for ex in ds.as_numpy_iterator():
            found[ex[keys.ID].decode()] = ex
    return found


def _reasons(manifest, kind):
    return [e for e in manifest["skipped"] if e["kind"] == kind]


def _no_partial_files(out):
    leftovers = [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------------------------
# IDRiD on the real files


def test_idrid_fixture_masks_match_the_tiffs_pixel_for_pixel(idrid_mini, tmp_path):
    out = tmp_path / "records"
    with pytest.warns(common.LayoutWarning) as caught:
        manifest = data_prep.convert("idrid", idrid_mini, out, quiet=True)
    messages = " | ".join(str(w.message) for w in caught)
    # The fixture is an incomplete copy: three lesion folders and the grading images are absent.
    for missing in ("microaneurysm", "soft exudate", "optic disc", "no '1. Original Images'"):
        assert missing in messages
    assert manifest["counts"] == {"train": 3}
    coverage = manifest["lesion_coverage"]["train"]
    assert {k: (v["present"], v["nonempty"]) for k, v in coverage.items()} == {
        "MA": (0, 0),
        "HE": (3, 3),
        "EX": (3, 3),
        "SE": (0, 0),
        "OD": (0, 0),
    }
    truth = idrid_mini / IDRID_SEG / "2. All Segmentation Groundtruths" / "a. Training Set"
    images = idrid_mini / IDRID_SEG / "1. Original Images" / "a. Training Set"
    converted = _read_all(out)
    assert sorted(converted) == [f"idrid-segmentation-train-IDRiD_0{i}" for i in (1, 2, 3)]
    for i in (1, 2, 3):
        ex = converted[f"idrid-segmentation-train-IDRiD_0{i}"]
        assert ex[keys.IMAGE].shape == (2848, 4288, 3)
        np.testing.assert_array_equal(ex[keys.MASK_PRESENT], [False, True, True, False, False])
        for lesion, folder in (("HE", "2. Haemorrhages"), ("EX", "3. Hard Exudates")):
            tif = truth / folder / f"IDRiD_0{i}_{lesion}.tif"
            expected = (np.asarray(Image.open(tif)) > 0).sum()
            channel = ex[keys.MASKS][..., keys.LESIONS.index(lesion)]
            assert channel.sum() == expected > 0
        # The original JPEG bytes are stored unchanged when no resizing is asked for.
        original = cv2.cvtColor(cv2.imread(str(images / f"IDRiD_0{i}.jpg")), cv2.COLOR_BGR2RGB)
        assert np.abs(ex[keys.IMAGE].astype(int) - original).mean() < 1.0
        assert ex[keys.GRADE] == -1 and ex[keys.DME] == -1


def test_idrid_fixture_max_side_through_the_command_line(idrid_mini, tmp_path, capsys):
    out = tmp_path / "small"
    status = main(["idrid", "--src", str(idrid_mini), "--out", str(out), "--max-side", "512"])
    assert status == 0
    captured = capsys.readouterr()
    assert "idrid: 3 examples written" in captured.out
    assert "warning: IDRiD segmentation train: no 'microaneurysm' folder" in captured.err
    manifest = records.read_manifest(out)
    assert manifest["options"]["max_side"] == 512 and manifest["shards"] == {
        "train": ["train-00000.tfrecord"]
    }
    truth = idrid_mini / IDRID_SEG / "2. All Segmentation Groundtruths" / "a. Training Set"
    for ex_id, ex in _read_all(out).items():
        name = ex_id.rsplit("-", 1)[1]
        assert ex[keys.IMAGE].shape == (340, 512, 3)  # 2848 * 512 / 4288 = 340.06
        assert ex[keys.MASKS].shape == (340, 512, 5)
        tif = Image.open(truth / "2. Haemorrhages" / f"{name}_HE.tif")
        expected = np.asarray(tif.resize((512, 340), Image.NEAREST)) > 0
        np.testing.assert_array_equal(ex[keys.MASKS][..., 1], expected)


def test_idrid_grading_csv_quirks_on_the_real_files(idrid_mini):
    truth = idrid_mini / IDRID_GRADING / "2. Groundtruths"
    columns = {"Image name": (), "Retinopathy grade": (), "Risk of macular edema": ()}
    train = common.read_csv_table(truth / TRAIN_CSV, columns)
    test = common.read_csv_table(truth / TEST_CSV, columns)
    # 9 trailing empty columns, CRLF and a stray blank are gone; 413 / 103 rows.
    assert list(train.columns) == list(columns) == list(test.columns)
    assert (len(train), len(test)) == (413, 103)
    assert train.loc[2].tolist() == ["IDRiD_001", "3", "2"]  # row 2 = first data line
    counts = train["Retinopathy grade"].astype(int).value_counts().sort_index().tolist()
    assert counts == [134, 20, 136, 74, 49]
    assert train["Risk of macular edema"].astype(int).value_counts().sort_index().tolist() == [
        177,
        41,
        195,
    ]
    assert test["Retinopathy grade"].astype(int).value_counts().sort_index().tolist() == [
        34,
        5,
        32,
        19,
        13,
    ]


def test_idrid_grading_keys_test_names_by_split(idrid_mini, tmp_path):
    # A doubled top folder, the real label CSVs, and a few tiny grading images.
    part = tmp_path / "raw" / IDRID_GRADING / IDRID_GRADING
    shutil.copytree(idrid_mini / IDRID_GRADING / "2. Groundtruths", part / "2. Groundtruths")
    images = part / "1. Original Images"
    _save(images / "a. Training Set" / "IDRiD_001.jpg", _photo(32, 48, 1))
    _save(images / "a. Training Set" / "IDRiD_005.jpg", _photo(32, 48, 2))
    _save(images / "b. Testing Set" / "IDRiD_001.jpg", _photo(32, 48, 3))
    out = tmp_path / "records"
    manifest = data_prep.convert("idrid", tmp_path / "raw", out, quiet=True)
    converted = _read_all(out)
    labels = {k: (int(v[keys.GRADE]), int(v[keys.DME])) for k, v in converted.items()}
    assert labels == {
        "idrid-grading-train-IDRiD_001": (3, 2),
        "idrid-grading-train-IDRiD_005": (4, 0),
        "idrid-grading-test-IDRiD_001": (4, 0),
    }
    assert manifest["grades"] == {"train": {"3": 1, "4": 1}, "test": {"4": 1}}
    assert manifest["dme"] == {"train": {"0": 1, "2": 1}, "test": {"0": 1}}
    # Every other listed image is absent: each one skipped with the file it expected.
    missing = _reasons(manifest, common.MISSING)
    assert len(missing) == 411 + 102
    first = next(e for e in missing if e["file"].endswith("a. Training Set/IDRiD_002.jpg"))
    assert (
        "listed in a. IDRiD_Disease Grading_Training Labels.csv row 3 but not found"
        in (first["reason"])
    )


# --------------------------------------------------------------------------------------------
# IDRiD tiny layout: splits, lesion folders, bad files


def _idrid_segmentation(root, *, size=(32, 48)):
    part = root / IDRID_SEG
    truth = part / "2. All Segmentation Groundtruths"
    folders = {
        "MA": "1. Microaneurysms",
        "HE": "2. Haemorrhages",
        "EX": "3. Hard Exudates",
        "SE": "4. Soft Exudates",
        "OD": "5. Optic Disc",
    }
    masks = {}
    for split_dir, names in (("a. Training Set", (1, 2, 3)), ("b. Testing Set", (55,))):
        for n in names:
            name = f"IDRiD_{n:02d}"
            _save(part / "1. Original Images" / split_dir / f"{name}.jpg", _photo(*size, n))
            for i, (lesion, folder) in enumerate(folders.items()):
                if lesion == "SE" and n != 1:
                    # Soft exudates drawn on one image only: the others have no SE file.
                    (truth / split_dir / folder).mkdir(parents=True, exist_ok=True)
                    continue
                mask = _blobs(*size, seed=10 * n + i)
                masks[name, lesion] = mask
                _palette_tif(truth / split_dir / folder / f"{name}_{lesion}.tif", mask)
    return masks


def test_idrid_splits_missing_files_and_missing_folders(tmp_path):
    raw = tmp_path / "raw"
    masks = _idrid_segmentation(raw)
    # The test split's optic-disc folder is missing from this copy.
    shutil.rmtree(
        raw / IDRID_SEG / "2. All Segmentation Groundtruths" / "b. Testing Set" / "5. Optic Disc"
    )
    out = tmp_path / "records"
    with pytest.warns(common.LayoutWarning, match="segmentation test: no 'optic disc' folder"):
        manifest = data_prep.convert("idrid", raw, out, workers=2, quiet=True)
    assert manifest["counts"] == {"train": 3, "test": 1}
    converted = _read_all(out)
    train2 = converted["idrid-segmentation-train-IDRiD_02"]
    # SE: folder present, file missing -> annotated and empty.
    np.testing.assert_array_equal(train2[keys.MASK_PRESENT], [True] * 5)
    assert train2[keys.MASKS][..., 3].sum() == 0
    for i, lesion in enumerate(keys.LESIONS):
        if lesion != "SE":
            np.testing.assert_array_equal(train2[keys.MASKS][..., i], masks["IDRiD_02", lesion])
    test = converted["idrid-segmentation-test-IDRiD_55"]
    np.testing.assert_array_equal(test[keys.MASK_PRESENT], [True, True, True, True, False])
    assert manifest["lesion_coverage"]["train"]["SE"] == {"present": 3, "nonempty": 1}
    assert manifest["lesion_coverage"]["test"]["OD"] == {"present": 0, "nonempty": 0}


def test_bad_images_and_masks_are_skipped_with_reasons(tmp_path):
    raw = tmp_path / "raw"
    _idrid_segmentation(raw)
    images = raw / IDRID_SEG / "1. Original Images" / "a. Training Set"
    truth = raw / IDRID_SEG / "2. All Segmentation Groundtruths" / "a. Training Set"
    good = (images / "IDRiD_01.jpg").read_bytes()
    (images / "IDRiD_02.jpg").write_bytes(good[: len(good) // 2])  # truncated download
    (images / "IDRiD_03.jpg").write_bytes(b"not an image at all")
    _palette_tif(truth / "3. Hard Exudates" / "IDRiD_01_EX.tif", np.zeros((30, 48), np.uint8))
    out = tmp_path / "records"
    manifest = data_prep.convert("idrid", raw, out, workers=2, quiet=True)
    assert manifest["counts"] == {"test": 1}
    assert manifest["skipped_by_kind"] == {"corrupt": 2, "mask_size": 1}
    by_file = {pathlib.Path(e["file"]).name: e["reason"] for e in manifest["skipped"]}
    assert by_file["IDRiD_02.jpg"].startswith("cannot decode image (OSError: Truncated")
    assert "cannot decode image" in by_file["IDRiD_03.jpg"]
    assert by_file["IDRiD_01_EX.tif"] == (
        "mask is 48x30 (WxH) but its image is 48x32; expected the same size"
    )
    _no_partial_files(out)


def test_wrong_src_exits_non_zero_and_names_the_folder(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    status = main(["idrid", "--src", str(tmp_path / "photos"), "--out", str(tmp_path / "o")])
    assert status == 2
    err = capsys.readouterr().err
    assert f"no IDRiD part found under {tmp_path / 'photos'}" in err
    assert "'1. Original Images'" in err
    status = main(["eyepacs", "--src", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert status == 2
    assert f"source folder {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
    assert main(["nodataset"]) == 2
    assert "unknown dataset 'nodataset'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "messidor2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["ddr", "--src", "x", "--out", "y", "--parts", "grading,boxes"])


@pytest.mark.parametrize("interrupt", ["error", "sigterm"])
def test_interrupted_conversion_leaves_no_shards(tmp_path, monkeypatch, interrupt):
    raw = tmp_path / "raw"
    _idrid_segmentation(raw)
    real_write = records.ShardWriter.write
    calls = []

    def failing_write(self, serialized):
        calls.append(self.split)
        real_write(self, serialized)
        if len(calls) == 3:
            if interrupt == "error":
                raise OSError("disk full")
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(records.ShardWriter, "write", failing_write)
    out = tmp_path / "records"
    expected = OSError if interrupt == "error" else SystemExit
    with pytest.raises(expected):
        data_prep.convert("idrid", raw, out, examples_per_shard=1, quiet=True)
    assert len(calls) == 3
    assert os.listdir(out) == []  # no shard, no temporary file, no manifest


# --------------------------------------------------------------------------------------------
# EyePACS


def _eyepacs(root, *, train_header="image,level"):
    for name in ("10_left", "10_right", "13_left"):
        _save(root / "train" / f"{name}.jpeg", _photo(24, 32, len(name)), format="JPEG")
    for name in ("1_left", "1_right", "2_left"):
        _save(root / "test" / f"{name}.jpeg", _photo(24, 32, 7), format="JPEG")
    _text(
        root / "trainLabels.csv",
        f"{train_header}\r\n10_left,0\r\n10_right,4\r\n13_left,7\r\n15_left,1\r\n",
    )
    _text(
        root / "retinopathy_solution.csv",
        "image,level,Usage\n1_left,2,Public\n1_right,3,Private\n2_left,1,Private\n",
    )


def test_eyepacs_splits_grades_and_bad_labels(tmp_path):
    raw = tmp_path / "kaggle"
    _eyepacs(raw)
    out = tmp_path / "records"
    manifest = data_prep.convert("eyepacs", tmp_path, out, examples_per_shard=1, quiet=True)
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 2}
    assert manifest["shards"]["test"] == ["test-00000.tfrecord", "test-00001.tfrecord"]
    grades = {k: int(v[keys.GRADE]) for k, v in _read_all(out).items()}
    assert grades == {
        "eyepacs-train-10_left": 0,
        "eyepacs-train-10_right": 4,
        "eyepacs-val-1_left": 2,
        "eyepacs-test-1_right": 3,
        "eyepacs-test-2_left": 1,
    }
    assert manifest["skipped_by_kind"] == {"label": 1, "missing": 1}
    (label,) = _reasons(manifest, common.LABEL)
    assert label["file"].endswith("trainLabels.csv")
    assert label["reason"] == "row 4 (13_left): unknown level '7' (expected one of [0, 1, 2, 3, 4])"
    (missing,) = _reasons(manifest, common.MISSING)
    assert missing["file"] == str(raw / "train" / "15_left.jpeg")
    assert "listed in trainLabels.csv row 5 but not found" in missing["reason"]


def test_eyepacs_missing_column_and_unlabeled_test(tmp_path):
    _eyepacs(tmp_path, train_header="image,lvl")
    (tmp_path / "retinopathy_solution.csv").unlink()
    out = tmp_path / "records"
    with pytest.warns(common.LayoutWarning, match="no retinopathy_solution.csv"):
        manifest = data_prep.convert("eyepacs", tmp_path, out, quiet=True)
    assert manifest["counts"] == {"test": 3}
    assert manifest["grades"] == {"test": {"-1": 3}}
    (bad,) = manifest["skipped"]
    assert bad["file"].endswith("trainLabels.csv") and bad["kind"] == "label"
    assert bad["reason"].startswith("missing column 'level'; found columns ['image', 'lvl']")


def test_splits_and_limit_options(tmp_path):
    _eyepacs(tmp_path)
    manifest = data_prep.convert(
        "eyepacs", tmp_path, tmp_path / "r", splits=("test",), limit=1, quiet=True
    )
    assert manifest["counts"] == {"test": 1}
    # A second conversion into the same folder replaces the first one's shards.
    manifest = data_prep.convert("eyepacs", tmp_path, tmp_path / "r", splits=("val",), quiet=True)
    assert sorted(os.listdir(tmp_path / "r")) == ["manifest.json", "val-00000.tfrecord"]


# --------------------------------------------------------------------------------------------
# Messidor and Messidor-2


def _xls(path, rows):
    import xlwt

    book = xlwt.Workbook()
    sheet = book.add_sheet("Feuil1")
    header = ["Image name", "Ophthalmologic department", "Retinopathy grade"]
    header.append("Risk of macular edema ")  # the trailing blank of the real files
    for col, name in enumerate(header):
        sheet.write(0, col, name)
    for r, row in enumerate(rows, start=1):
        for col, value in enumerate(row):
            sheet.write(r, col, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(str(path))


def test_messidor_bases_with_sheets_inside_and_beside(tmp_path):
    pytest.importorskip("xlwt")
    raw = tmp_path / "messidor"
    # Base11 keeps its sheet inside the folder, Base12 beside it.
    _save(raw / "Base11" / "20051019_38557_0100_PP.tif", _photo(24, 36, 1), format="TIFF")
    _save(raw / "Base11" / "20051019_38557_0200_PP.tif", _photo(24, 36, 2), format="TIFF")
    _xls(
        raw / "Base11" / "Annotation_Base11.xls",
        [
            ["20051019_38557_0100_PP.tif", "Service Ophtalmologie Lariboisiere", 3, 2],
            ["20051019_38557_0200_PP.tif", "Service Ophtalmologie Lariboisiere", 0, 0],
        ],
    )
    _save(raw / "Base12" / "20051020_43808_0100_PP.tif", _photo(24, 36, 3), format="TIFF")
    _xls(
        raw / "Annotation_Base12.xls",
        [
            ["20051020_43808_0100_PP.tif", "CHU de St Etienne", 1, 1],
            ["20051020_43808_0200_PP.tif", "CHU de St Etienne", 2, 0],
            ["20051020_43808_0300_PP.tif", "CHU de St Etienne", 4, 0],
        ],
    )
    out = tmp_path / "records"
    manifest = data_prep.convert("messidor", raw, out, quiet=True)
    converted = _read_all(out)
    labels = {k: (int(v[keys.GRADE]), int(v[keys.DME])) for k, v in converted.items()}
    assert labels == {
        "messidor-test-Base11-20051019_38557_0100_PP": (3, 2),
        "messidor-test-Base11-20051019_38557_0200_PP": (0, 0),
        "messidor-test-Base12-20051020_43808_0100_PP": (1, 1),
    }
    assert {v[keys.DATASET] for v in converted.values()} == {b"messidor"}
    # TIFF photographs are re-encoded; a lossless run keeps them exactly.
    assert converted["messidor-test-Base11-20051019_38557_0100_PP"][keys.IMAGE].shape == (24, 36, 3)
    assert manifest["skipped_by_kind"] == {"missing": 1, "label": 1}
    (label,) = _reasons(manifest, common.LABEL)
    assert "unknown Retinopathy grade '4' (expected one of [0, 1, 2, 3])" in label["reason"]

    manifest = data_prep.convert("messidor", raw, out, lossless=True, quiet=True)
    stored = _read_all(out)["messidor-test-Base11-20051019_38557_0200_PP"][keys.IMAGE]
    np.testing.assert_array_equal(stored, _photo(24, 36, 2))


def test_messidor2_skips_ungradable_images(tmp_path):
    raw = tmp_path / "messidor2"
    _save(raw / "IMAGES" / "20051020_43808_0100_PP.png", _photo(20, 30, 1))
    _save(raw / "IMAGES" / "IM001667.JPG", _photo(20, 30, 2), format="JPEG")
    _save(raw / "IMAGES" / "IM001668.JPG", _photo(20, 30, 3), format="JPEG")
    _text(
        raw / "messidor_data.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051020_43808_0100_PP.png,0,0,1\nIM001667.JPG,4,1,1\nIM001668.JPG,,,0\n",
    )
    _text(raw / "messidor-2.csv", "20051020_43808_0100_PP.png;IM001667.JPG\n")
    out = tmp_path / "records"
    manifest = data_prep.convert("messidor2", raw, out, quiet=True)
    grades = {k: int(v[keys.GRADE]) for k, v in _read_all(out).items()}
    assert grades == {"messidor2-test-20051020_43808_0100_PP": 0, "messidor2-test-IM001667": 4}
    assert manifest["skipped_by_kind"] == {"ungradable": 1}
    (entry,) = manifest["skipped"]
    assert entry["file"].endswith("IM001668.JPG")
    assert entry["reason"] == "ungradable (adjudicated_gradable=0 in messidor_data.csv row 4)"


# --------------------------------------------------------------------------------------------
# DDR, DiaRetDB1, APTOS


def test_ddr_grading_ungradable_and_segmentation(tmp_path):
    root = tmp_path / "DDR-dataset"
    grading = root / "DR_grading"
    for split, names in (("train", ("007-0004-000", "007-0005-000")), ("valid", ("007-0006-000",))):
        for i, name in enumerate(names):
            _save(grading / split / f"{name}.jpg", _photo(28, 28, i))
    _text(grading / "train.txt", "007-0004-000.jpg 2\n007-0005-000.jpg 5\n")
    _text(grading / "valid" / "valid.txt", "007-0006-000.jpg 0\n")  # inside its folder
    seg = root / "lesion_segmentation"
    masks = {}
    for split, label in (("train", "label"), ("valid", "segmentation label")):
        _save(seg / split / "image" / "007-5846-300.jpg", _photo(28, 28, 9))
        for lesion in ("EX", "HE", "MA"):  # no SE mask file: annotated, empty
            mask = _blobs(28, 28, seed=len(lesion) + len(split)) * 255
            masks[split, lesion] = mask // 255
            _save(seg / split / label / lesion / "007-5846-300.tif", mask)
        (seg / split / label / "SE").mkdir()
    out = tmp_path / "records"
    manifest = data_prep.convert("ddr", tmp_path, out, quiet=True)
    converted = _read_all(out)
    assert sorted(converted) == [
        "ddr-grading-train-007-0004-000",
        "ddr-grading-train-007-0005-000",
        "ddr-grading-val-007-0006-000",
        "ddr-segmentation-train-007-5846-300",
        "ddr-segmentation-val-007-5846-300",
    ]
    assert converted["ddr-grading-train-007-0005-000"][keys.GRADE] == -1
    assert manifest["grades"]["train"] == {"-1": 2, "2": 1}
    assert manifest["flagged_counts"] == {"train": {"ungradable": 1}, "val": {}}
    (flag,) = manifest["flagged"]
    assert flag["id"] == "ddr-grading-train-007-0005-000" and flag["ungradable"] is True
    for split in ("train", "val"):
        ex = converted[f"ddr-segmentation-{split}-007-5846-300"]
        np.testing.assert_array_equal(ex[keys.MASK_PRESENT], [True, True, True, True, False])
        for lesion in ("EX", "HE", "MA"):
            folder_split = "valid" if split == "val" else split
            np.testing.assert_array_equal(
                ex[keys.MASKS][..., keys.LESIONS.index(lesion)], masks[folder_split, lesion]
            )
        assert ex[keys.MASKS][..., 3].sum() == 0
    grading_only = data_prep.convert("ddr", root, tmp_path / "g", parts=("grading",), quiet=True)
    assert grading_only["counts"] == {"train": 2, "val": 1}


@pytest.mark.parametrize(
    "confidence, expected_values", [(0.75, (189, 252)), (0.5, (150, 188, 189, 252))]
)
def test_diaretdb1_soft_maps_are_binarised_at_the_confidence(tmp_path, confidence, expected_values):
    res = tmp_path / "diaretdb1_v_1_1" / "resources"
    images = res / "images" / "ddb1_fundusimages"
    truth = res / "images" / "ddb1_groundtruth"
    soft = np.zeros((20, 30), np.uint8)
    soft[2:4, 2:4], soft[5:7, 5:7], soft[8:10, 8:10], soft[11:13, 11:13] = 100, 150, 189, 252
    soft[14, 14] = 188
    for n in (1, 2, 3):
        _save(images / f"image00{n}.png", _photo(20, 30, n))
    for folder in ("redsmalldots", "hemorrhages", "hardexudates"):  # softexudates missing
        _save(truth / folder / "image001.png", soft)
    _text(res / "traindatasets" / "trainset.txt", "images/ddb1_fundusimages/image001.png\n")
    _text(res / "testdatasets" / "testset.txt", "image002.png\r\nimage009.png\r\n")
    out = tmp_path / "records"
    with pytest.warns(common.LayoutWarning, match="no softexudates/ folder"):
        manifest = data_prep.convert(
            "diaretdb1", tmp_path, out, confidence=confidence, lossless=True, quiet=True
        )
    assert manifest["counts"] == {"train": 1, "test": 1}
    assert manifest["options"]["confidence"] == confidence
    assert manifest["skipped_by_kind"] == {"missing": 1, "unlabeled": 1}
    converted = _read_all(out)
    train = converted["diaretdb1-train-image001"]
    np.testing.assert_array_equal(train[keys.MASK_PRESENT], [True, True, True, False, False])
    expected = np.isin(soft, expected_values).astype(np.uint8)
    for i in range(3):
        np.testing.assert_array_equal(train[keys.MASKS][..., i], expected)
    np.testing.assert_array_equal(train[keys.IMAGE], _photo(20, 30, 1))
    assert converted["diaretdb1-test-image002"][keys.MASKS].sum() == 0


def test_aptos_train_graded_test_unlabeled(tmp_path):
    for name in ("000c1434d8d7", "001639a390f0"):
        _save(tmp_path / "train_images" / f"{name}.png", _photo(16, 24, 1))
    _save(tmp_path / "test_images" / "0005cfc8afb6.png", _photo(16, 24, 2))
    _save(tmp_path / "train_images" / "ffffffffffff.png", _photo(16, 24, 3))  # not in the CSV
    _text(tmp_path / "train.csv", "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n")
    _text(tmp_path / "test.csv", "id_code\n0005cfc8afb6\n")
    out = tmp_path / "records"
    manifest = data_prep.convert("aptos", tmp_path, out, max_side=12, quiet=True)
    assert manifest["grades"] == {"train": {"2": 1, "4": 1}, "test": {"-1": 1}}
    (unlisted,) = manifest["skipped"]
    assert unlisted["kind"] == "unlabeled" and unlisted["file"].endswith("ffffffffffff.png")
    for ex in _read_all(out).values():
        assert ex[keys.IMAGE].shape == (8, 12, 3)


def test_manifest_is_json_with_the_documented_keys(tmp_path):
    _eyepacs(tmp_path)
    data_prep.convert("eyepacs", tmp_path, tmp_path / "r", quiet=True)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert set(manifest) >= {
        "dataset",
        "source",
        "options",
        "counts",
        "grades",
        "lesion_coverage",
        "skipped",
        "skipped_by_kind",
        "flagged",
        "warnings",
        "shards",
        "total",
    }
    assert manifest["source"] == str(tmp_path.resolve())
    assert manifest["total"] == sum(manifest["counts"].values()) == 5


def test_target_size_caps_the_long_side():
    assert common.target_size(2848, 4288, 512) == (340, 512)
    assert common.target_size(4288, 2848, 1024) == (1024, 680)
    assert common.target_size(100, 50, 512) == (100, 50)
    assert common.target_size(100, 50, None) == (100, 50)


def test_clean_table_and_header_variants(tmp_path):
    path = _text(
        tmp_path / "labels.csv",
        "Image name ,Retinopathy grade,Risk of macular edema ,,\r\n"
        "IDRiD_001,3,2,,\r\nIDRiD_002, 1 ,0,, \r\n,,,,\r\n\r\n",
        newline="",
    )
    columns = {"Image name": (), "Retinopathy grade": (), "Risk of macular edema": ()}
    table = common.read_csv_table(path, columns)
    assert list(table.columns) == list(columns)
    assert table.to_dict("index") == {
        2: {"Image name": "IDRiD_001", "Retinopathy grade": "3", "Risk of macular edema": "2"},
        3: {"Image name": "IDRiD_002", "Retinopathy grade": "1", "Risk of macular edema": "0"},
    }
    frame = pd.DataFrame({" a ": [" 1 ", ""], "Unnamed: 1": ["", ""]})
    assert common.clean_table(frame, "x").to_dict("list") == {"a": ["1"]}
    with pytest.raises(common.SkippedFile, match=r"row 7 \(x\): unknown level '2.5'"):
        common.parse_label("2.5", range(5), file="f.csv", row=7, column="level", name="x")
    assert common.parse_label("2.0", range(5), file="f.csv", row=7, column="level") == 2


# --------------------------------------------------------------------------------------------
# Layouts written by the synthetic generator, cross-checked against the raw files it wrote


def _mask_sum(path):
    return int((np.asarray(Image.open(path)) > 0).sum()) if path is not None else 0


def test_synthetic_idrid_layout(tmp_path):
    from drkeras.data import synthetic

    counts = dict(seg_train=3, seg_test=2, grading_train=4, grading_test=3)
    raw = synthetic.write_layout(tmp_path / "raw", "idrid", counts=counts, size=48, seed=3)
    manifest = data_prep.convert("idrid", raw, tmp_path / "r", workers=2, quiet=True)
    assert manifest["counts"] == {"train": 3 + 4, "test": 2 + 3}
    assert manifest["skipped"] == [] and manifest["warnings"] == []
    converted = _read_all(tmp_path / "r")
    truth = raw / IDRID_SEG / "2. All Segmentation Groundtruths"
    segmentation = {k: v for k, v in converted.items() if "-segmentation-" in k}
    assert len(segmentation) == 5
    for ex_id, ex in segmentation.items():
        _, _, split, name = ex_id.split("-")
        split_dir = truth / ("a. Training Set" if split == "train" else "b. Testing Set")
        assert ex[keys.MASK_PRESENT].all()
        for i, lesion in enumerate(keys.LESIONS):
            files = list(split_dir.glob(f"*/{name}_{lesion}.tif"))
            assert ex[keys.MASKS][..., i].sum() == _mask_sum(files[0] if files else None)
    for split, csv_name in (("train", TRAIN_CSV), ("test", TEST_CSV)):
        lines = (raw / IDRID_GRADING / "2. Groundtruths" / csv_name).read_text().splitlines()
        for line in lines[1:]:
            name, grade, dme = line.split(",")[:3]
            ex = converted[f"idrid-grading-{split}-{name}"]
            assert (ex[keys.GRADE], ex[keys.DME]) == (int(grade), int(dme))


def test_synthetic_eyepacs_ddr_and_messidor_layouts(tmp_path):
    import xlrd

    from drkeras.data import synthetic

    raw = synthetic.write_layout(
        tmp_path / "eyepacs", "eyepacs", counts=dict(train=6, public=2, private=3), size=40
    )
    manifest = data_prep.convert("eyepacs", raw, tmp_path / "r_eyepacs", quiet=True)
    assert manifest["counts"] == {"train": 6, "val": 2, "test": 3}
    converted = _read_all(tmp_path / "r_eyepacs")
    for line in (raw / "trainLabels.csv").read_text().splitlines()[1:]:
        name, level = line.split(",")
        assert converted[f"eyepacs-train-{name}"][keys.GRADE] == int(level)

    counts = dict(
        grading_train=10, grading_valid=2, grading_test=2, seg_train=2, seg_valid=1, seg_test=1
    )
    raw = synthetic.write_layout(tmp_path / "ddr", "ddr", counts=counts, size=40)
    manifest = data_prep.convert("ddr", raw, tmp_path / "r_ddr", quiet=True)
    assert manifest["counts"] == {"train": 12, "val": 3, "test": 3}
    converted = _read_all(tmp_path / "r_ddr")
    ungradable = 0
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        for line in (raw / "DR_grading" / f"{folder}.txt").read_text().splitlines():
            name, grade = line.split()
            ungradable += grade == "5"
            expected = -1 if grade == "5" else int(grade)
            assert converted[f"ddr-grading-{split}-{name[:-4]}"][keys.GRADE] == expected
    assert ungradable >= 1
    assert sum(n.get("ungradable", 0) for n in manifest["flagged_counts"].values()) == ungradable
    for ex_id, ex in converted.items():
        if "-segmentation-" in ex_id:
            split = ex_id.split("-")[2]
            name = ex_id.split("-", 3)[3]
            folder = raw / "lesion_segmentation" / {"val": "valid"}.get(split, split)
            label = next(p for p in folder.iterdir() if p.name.endswith("label"))
            for lesion in ("MA", "HE", "EX", "SE"):
                channel = ex[keys.MASKS][..., keys.LESIONS.index(lesion)]
                assert channel.sum() == _mask_sum(label / lesion / f"{name}.tif")

    raw = synthetic.write_layout(
        tmp_path / "messidor", "messidor", counts={"Base11": 3, "Base32": 2}, size=40
    )
    manifest = data_prep.convert("messidor", raw, tmp_path / "r_messidor", quiet=True)
    assert manifest["counts"] == {"test": 5}
    converted = _read_all(tmp_path / "r_messidor")
    for base in ("Base11", "Base32"):
        sheet = xlrd.open_workbook(str(raw / base / f"Annotation_{base}.xls")).sheet_by_index(0)
        for r in range(1, sheet.nrows):
            name, _, grade, dme = sheet.row_values(r)
            ex = converted[f"messidor-test-{base}-{name[:-4]}"]
            assert (ex[keys.GRADE], ex[keys.DME]) == (int(grade), int(dme))


def test_cli_dispatches_synthetic_then_converts(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "records"
    status = main(
        ["synthetic", "--layout", "eyepacs", "--out", str(raw), "--size", "32"]
        + ["--count-scale", "0.1", "--records", str(out)]
    )
    assert status == 0
    manifest = records.read_manifest(out)
    assert manifest["dataset"] == "eyepacs"
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 1}
    assert "eyepacs: 4 examples written" in capsys.readouterr().out
