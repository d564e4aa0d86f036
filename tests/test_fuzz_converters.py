"""Generated-input (property-based) tests of every dataset converter (issue #20).

Each example copies a clean raw layout (the real IDRiD fixture files for ``idrid``; for the other
six datasets their layout with one of the real IDRiD photographs among the images), applies a few
random corruptions drawn by hypothesis (truncation at any byte, bit flips, masks of another size
or mode, CSV headers and cells mutated, grades out of range, duplicated rows, deleted files) and
converts it. The property, whatever the corruption:

- no traceback: the conversion returns a manifest, or raises ``LayoutError`` whose message names
  the source folder;
- nothing is dropped silently: every image file of the layout is converted or listed in the
  manifest's ``skipped`` with its path and a reason;
- every record written decodes with ``drkeras.data.records.parse_example``, labels in range, ids
  unique;
- no partial output: no ``*.tmp`` file is left.

Bounded in time: a few examples per converter, no deadline (conversion time varies with the
machine's load); ``derandomize`` makes every run draw the same examples, so CI is repeatable.
"""

import pathlib
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

import data_prep
from data_prep import common
from drkeras import keys
from drkeras.data import records, synthetic

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "idrid_mini"
REAL_JPEG = FIXTURE / "A. Segmentation" / "1. Original Images" / "a. Training Set" / "IDRiD_02.jpg"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
LABEL_SUFFIXES = (".csv", ".txt", ".xls")
# The seven dataset converters ("synthetic" in data_prep.DATASETS writes layouts, it reads none).
CONVERTERS = ("aptos", "ddr", "diaretdb1", "eyepacs", "idrid", "messidor", "messidor2")

# No shrinking: a failure is reported with the example that found it, in bounded time.
FUZZ = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------------------------
# Clean layouts (written once per session)


def _photo(height, width, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _messidor2(root):
    for name in ("20051020_43808_0100_PP.png", "20051020_43808_0200_PP.png"):
        path = root / "IMAGES" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(40, 60, len(name))).save(path)
    shutil.copy(REAL_JPEG, root / "IMAGES" / "IM001667.JPG")
    _write(
        root / "messidor_data.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051020_43808_0100_PP.png,0,0,1\n20051020_43808_0200_PP.png,2,1,1\n"
        "IM001667.JPG,3,0,1\n",
    )


def _diaretdb1(root):
    res = root / "diaretdb1_v_1_1" / "resources"
    images = res / "images" / "ddb1_fundusimages"
    for n in (1, 2, 3):
        path = images / f"image00{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(40, 60, n)).save(path)
        soft = np.zeros((40, 60), np.uint8)
        soft[5 * n : 5 * n + 6, 10:20] = 252
        for folder in ("redsmalldots", "hemorrhages", "hardexudates", "softexudates"):
            mask = res / "images" / "ddb1_groundtruth" / folder / f"image00{n}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(soft).save(mask)
    _write(res / "traindatasets" / "trainset.txt", "images/ddb1_fundusimages/image001.png\n")
    _write(res / "testdatasets" / "testset.txt", "image002.png\nimage003.png\n")


def _aptos(root):
    for folder, names in (("train_images", ("000c1434d8d7", "001639a390f0")),
                          ("test_images", ("0005cfc8afb6",))):  # fmt: skip
        for name in names:
            path = root / folder / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_photo(30, 40, len(name))).save(path)
    _write(root / "train.csv", "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n")
    _write(root / "test.csv", "id_code\n0005cfc8afb6\n")


def _with_real_jpeg(root):
    """Replace the first JPEG of a synthetic layout by a real IDRiD photograph."""
    first = next(p for p in sorted(root.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg"))
    shutil.copy(REAL_JPEG, first)


def _build(dataset, root):
    if dataset == "idrid":
        shutil.copytree(FIXTURE, root)
        # A grading part with two of the listed images (the real photographs).
        grading = root / "B. Disease Grading" / "1. Original Images" / "a. Training Set"
        grading.mkdir(parents=True)
        shutil.copy(REAL_JPEG, grading / "IDRiD_001.jpg")
        shutil.copy(REAL_JPEG, grading / "IDRiD_002.jpg")
    elif dataset in ("eyepacs", "ddr", "messidor"):
        counts = {
            "eyepacs": dict(train=3, public=1, private=1),
            "ddr": dict(
                grading_train=2,
                grading_valid=1,
                grading_test=1,
                seg_train=1,
                seg_valid=1,
                seg_test=1,
            ),  # fmt: skip
            "messidor": {"Base11": 3},
        }[dataset]
        synthetic.write_layout(root, dataset, counts=counts, size=40, seed=1)
        if dataset != "messidor":
            _with_real_jpeg(root)
    else:
        {"messidor2": _messidor2, "diaretdb1": _diaretdb1, "aptos": _aptos}[dataset](root)


@pytest.fixture(scope="module")
def clean_layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("clean")
    layouts = {}
    for dataset in CONVERTERS:
        _build(dataset, base / dataset)
        layouts[dataset] = base / dataset
    return layouts


# --------------------------------------------------------------------------------------------
# Corruptions


def _files(root, suffixes):
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes]


def _masks(root):
    hints = ("groundtruth", "label", "segmentation groundtruths")
    return [p for p in _files(root, IMAGE_SUFFIXES) if any(h in str(p).lower() for h in hints)]


CELL_TEXT = st.one_of(
    st.sampled_from(["", "7", "-1", "5", "2.5", "x", " 3 ", "1e3", "nan", "0", "4"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=8),
)
OPERATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.floats(0, 1)),
    st.tuples(
        st.just("flip"),
        st.integers(0, 10**6),
        st.lists(st.integers(0, 10**9), min_size=1, max_size=4),
    ),  # fmt: skip
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("mask_size"), st.integers(0, 10**6), st.integers(-3, 3), st.integers(-3, 3)),
    st.tuples(
        st.just("mask_mode"),
        st.integers(0, 10**6),
        st.sampled_from(["RGB", "L255", "I;16", "1", "LA", "P"]),
    ),  # fmt: skip
    st.tuples(st.just("header"), st.integers(0, 10**6), st.integers(0, 20), CELL_TEXT),
    st.tuples(
        st.just("cell"), st.integers(0, 10**6), st.integers(1, 500), st.integers(0, 20), CELL_TEXT
    ),  # fmt: skip
    st.tuples(st.just("duplicate_row"), st.integers(0, 10**6), st.integers(1, 500)),
)


def _pick(items, index):
    return items[index % len(items)] if items else None


def _rewrite_mask(path, op, arg1, arg2=None):
    with Image.open(path) as img:
        img.load()
        values = (np.asarray(img) > 0).astype(np.uint8)
    if values.ndim == 3:
        values = values.max(axis=2)
    if op == "mask_size":
        h, w = values.shape
        size = (max(1, w + arg2), max(1, h + arg1))
        if size == (w, h):
            size = (w + 1, h)
        out = Image.fromarray(values).resize(size, Image.NEAREST)
    elif arg1 == "RGB":
        out = Image.fromarray(np.repeat(values[..., None] * 255, 3, axis=2))
    elif arg1 == "L255":
        out = Image.fromarray(values * 255)
    elif arg1 == "I;16":
        out = Image.fromarray(values.astype(np.uint16) * 65535)
    elif arg1 == "1":
        out = Image.fromarray(values.astype(bool))
    elif arg1 == "LA":
        out = Image.fromarray(np.stack([values * 255, np.full_like(values, 255)], -1), "LA")
    else:
        out = Image.fromarray(values, "P")
    fmt = "TIFF" if path.suffix.lower() in (".tif", ".tiff") else "PNG"
    if fmt == "PNG" and out.mode == "I;16":
        out = Image.fromarray(values * 255)
    out.save(path, format=fmt)


def _mutate_table(path, op, row, col, text):
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    if not lines:
        return
    sep = "," if "," in lines[0] else " "
    if op == "duplicate_row":
        if len(lines) > 1:
            index = 1 + (row - 1) % (len(lines) - 1)
            lines.insert(index + 1, lines[index] if lines[index].endswith("\n") else
                         lines[index] + "\n")  # fmt: skip
    else:
        index = 0 if op == "header" else min(row, len(lines) - 1)
        ending = lines[index][len(lines[index].rstrip("\r\n")) :]
        cells = lines[index].rstrip("\r\n").split(sep)
        cells[col % len(cells)] = text
        lines[index] = sep.join(cells) + ending
    path.write_text("".join(lines), encoding="utf-8")


def _corrupt(root, operations):
    for operation in operations:
        kind, index = operation[0], operation[1]
        images = _files(root, IMAGE_SUFFIXES)
        tables = [p for p in _files(root, LABEL_SUFFIXES) if p.suffix != ".xls"]
        if kind in ("truncate", "flip", "delete"):
            path = _pick(images + _files(root, (".xls",)), index)
            if path is None:
                continue
            data = bytearray(path.read_bytes())
            if kind == "delete":
                path.unlink()
            elif kind == "truncate":
                path.write_bytes(bytes(data[: int(operation[2] * len(data))]))
            elif data:
                for position in operation[2]:
                    data[position % len(data)] ^= 1 << (position % 8)
                path.write_bytes(bytes(data))
        elif kind in ("mask_size", "mask_mode"):
            path = _pick(_masks(root), index)
            if path is not None:
                try:
                    _rewrite_mask(path, kind, *operation[2:])
                except OSError:  # an earlier corruption made it unreadable: leave it so
                    pass
        elif kind in ("header", "cell", "duplicate_row") and tables:
            path = _pick(tables, index)
            if kind == "header":
                _mutate_table(path, kind, 0, operation[2], operation[3])
            elif kind == "cell":
                _mutate_table(path, kind, operation[2], operation[3], operation[4])
            else:
                _mutate_table(path, kind, operation[2], 0, "")


# --------------------------------------------------------------------------------------------
# The property


def _converted_ids(out):
    found = []
    for split in keys.SPLITS:
        try:
            shards = records.list_shards(out, split)
        except FileNotFoundError:
            continue
        for shard in shards:
            for raw in records.tf.data.TFRecordDataset(shard):
                ex = records.parse_example(raw)
                image, masks = ex[keys.IMAGE].numpy(), ex[keys.MASKS].numpy()
                assert image.ndim == 3 and image.shape[2] == 3 and image.size > 0
                assert masks.shape == image.shape[:2] + (keys.NUM_LESIONS,)
                assert set(np.unique(masks)) <= {0, 1}
                assert -1 <= int(ex[keys.GRADE]) <= 4 and -1 <= int(ex[keys.DME]) <= 2
                assert ex[keys.SPLIT].numpy().decode() == split
                found.append(ex[keys.ID].numpy().decode())
    assert len(found) == len(set(found)), f"duplicate ids in {out}: {found}"
    return found


def _stem_in(path, ids):
    stem = path.stem.lower()
    return any(i.lower().endswith(stem) for i in ids)


def _check(dataset, src, out):
    photos = [p for p in _files(src, IMAGE_SUFFIXES) if p not in _masks(src)]
    try:
        manifest = data_prep.convert(dataset, src, out, max_side=64, quiet=True)
    except common.LayoutError as err:
        assert str(src) in str(err), f"LayoutError without the folder: {err}"
        manifest = records.read_manifest(out) if (out / records.MANIFEST).is_file() else None
    leftovers = [p.name for p in out.rglob("*.tmp")] if out.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"
    if manifest is None:
        assert not list(out.glob("*.tfrecord")) if out.exists() else True
        return
    ids = _converted_ids(out)
    assert manifest["total"] == len(ids)
    for entry in manifest["skipped"]:
        assert entry["file"] and entry["reason"] and entry["kind"], entry
    skipped_files = {
        pathlib.Path(e[key]).resolve() for e in manifest["skipped"] for key in ("file", "image")
        if key in e
    }  # fmt: skip
    # A bad label row is reported against its label file, naming the image in the reason.
    reasons = " | ".join(e["reason"] for e in manifest["skipped"])
    for photo in photos:
        named = photo.resolve() in skipped_files or photo.stem in reasons
        assert (
            _stem_in(photo, ids) or named
        ), f"{photo} neither converted nor reported in {manifest['skipped']}"


def _fuzz(dataset, clean_layouts, operations):
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "raw"
        shutil.copytree(clean_layouts[dataset], src)
        _corrupt(src, operations)
        _check(dataset, src, pathlib.Path(tmp) / "records")


@pytest.mark.parametrize("dataset", CONVERTERS)
def test_converters_survive_random_corruptions(dataset, clean_layouts):
    @FUZZ
    @given(operations=st.lists(OPERATIONS, min_size=1, max_size=3))
    def run(operations):
        _fuzz(dataset, clean_layouts, operations)

    run()


def test_converters_on_the_clean_layouts_convert_everything(clean_layouts):
    """The baseline of the property: without corruption nothing is skipped but the labels'
    own gaps (IDRiD lists 413 grading images, the fixture holds two)."""
    for dataset in CONVERTERS:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "records"
            manifest = data_prep.convert(dataset, clean_layouts[dataset], out, max_side=64,
                                         quiet=True)  # fmt: skip
            kinds = set(manifest["skipped_by_kind"])
            assert kinds <= {"missing"}, (dataset, manifest["skipped"][:3])
            assert manifest["total"] >= 3, dataset
