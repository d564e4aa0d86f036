"""Input quality flags (issue #20): ``drkeras.data.quality``, the ``quality`` column and overlay
warning of ``python -m drkeras.predict``, ``--strict``, and the exports' ``fov_fraction`` and
``quality`` outputs; the twelve-file folder of the issue."""

import io
import pathlib

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow import keras

from drkeras import keys
from drkeras.data import quality, samples, synthetic
from drkeras.export import export_model, load_exported
from drkeras.predict import WARNING_COLOR, main, read_photo

SIZE = 32
FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "idrid_mini"
PHOTOS = FIXTURE / "A. Segmentation" / "1. Original Images" / "a. Training Set"


def _model():
    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(image)
    grade = keras.layers.Dense(5, activation="softmax", name=keys.GRADE_PROBS)(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    lesions = keras.layers.Conv2D(5, 1, activation="sigmoid", name=keys.LESION_PROBS)(x)
    return keras.Model(image, {keys.GRADE_PROBS: grade, keys.LESION_PROBS: lesions})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("export") / "model"
    export_model(
        _model(),
        path,
        image_size=SIZE,
        preprocess={"fov_crop": True, "graham": False, "normalization": "unit"},
        output_names=[keys.GRADE_PROBS, keys.LESION_PROBS],
    )
    return path


def _rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _small_real(name, width):
    photo = _rgb(PHOTOS / name)
    height = round(photo.shape[0] * width / photo.shape[1])
    return cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)


def test_flags_of_typical_inputs():
    real = _small_real("IDRiD_01.jpg", 600)
    assert quality.assess(None, real).flags == []
    assert quality.assess(None, np.zeros((600, 800, 3), np.uint8)).flags == [
        "no_fov",
        "uniform",
        "no_colour",
    ]
    assert quality.assess(None, real[:5, 300:305]).flags[0] == "too_small"
    grey = np.repeat(cv2.cvtColor(real, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    assert quality.assess(None, grey).flags == ["no_colour"]
    flat = np.full((300, 300, 3), (150, 60, 20), np.uint8)
    assert quality.assess(None, flat).flags == ["uniform"]
    measures = quality.assess(None, real).measures
    assert 0.6 < measures["fov_fraction"] < 0.8 and measures["intensity_std"] > 20

    # Encoded checks: the end markers and the PNG bit depth, from the header and tail only.
    jpeg = (PHOTOS / "IDRiD_01.jpg").read_bytes()
    assert quality.assess(jpeg, real).flags == []
    for cut in (len(jpeg) // 3, len(jpeg) - 2, len(jpeg) - 1):
        assert quality.encoded_flags(jpeg[:cut]).numpy().tolist() == [True, False]
    assert quality.encoded_flags(jpeg + b"\x00" * 8).numpy().tolist() == [False, False]
    png8 = cv2.imencode(".png", real)[1].tobytes()
    png16 = cv2.imencode(".png", real.astype(np.uint16) * 257)[1].tobytes()
    assert quality.encoded_flags(png8).numpy().tolist() == [False, False]
    assert quality.encoded_flags(png16).numpy().tolist() == [False, True]
    assert quality.encoded_flags(png8[:-12]).numpy().tolist() == [True, False]
    for short in (b"", b"\xff", b"\xff\xd8\xff", b"BM"):
        assert quality.encoded_flags(short).numpy().shape == (2,)
    tiff16 = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tiff16, format="TIFF")
    assert quality.assess(tiff16.getvalue(), real).flags == ["bit_depth_converted"]


def test_describe_names_each_flag_with_its_measure():
    text = quality.describe(quality.assess(None, np.zeros((600, 800, 3), np.uint8)))
    assert text.startswith("no field of view found (0.0% of the image in it, minimum 10%)")
    assert "grey-level std 0.00, minimum 3.0" in text and "colour spread 0.00" in text


def _twelve_files(folder):
    """The issue's folder: two unreadable files, five photographs that used to get a grade
    without a word (black, tiny, truncated, grayscale, 16-bit), a flat grey frame and four real
    photographs (three IDRiD, scikit-image's retina)."""
    folder.mkdir(parents=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_bytes(b"shopping list: eggs, milk\n")
    _png(folder / "black.png", np.zeros((600, 800, 3), np.uint8))
    _png(folder / "tiny.png", _small_real("IDRiD_01.jpg", 600)[150:155, 300:305])
    jpeg = (PHOTOS / "IDRiD_01.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    _png(folder / "grayscale.png", cv2.cvtColor(_small_real("IDRiD_02.jpg", 600), 7))
    deep = _small_real("IDRiD_03.jpg", 600).astype(np.uint16) * 257
    cv2.imwrite(str(folder / "deep16.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    _png(folder / "flat.png", np.full((400, 400, 3), 128, np.uint8))
    for name in ("IDRiD_01.jpg", "IDRiD_02.jpg", "IDRiD_03.jpg"):
        (folder / name).write_bytes((PHOTOS / name).read_bytes())
    (folder / "retina.jpg").write_bytes(samples.retina_source().read_bytes())
    return folder


EXPECTED_FLAGS = {
    "black.png": "no_fov;uniform;no_colour",
    "tiny.png": "too_small;uniform",
    "truncated.jpg": "truncated",
    "grayscale.png": "no_colour",
    "deep16.png": "bit_depth_converted",
    "flat.png": "uniform;no_colour",
    "IDRiD_01.jpg": "ok",
    "IDRiD_02.jpg": "ok",
    "IDRiD_03.jpg": "ok",
    "retina.jpg": "ok",
}


def test_the_twelve_file_folder(exported, tmp_path, capsys):
    folder = _twelve_files(tmp_path / "photos")
    assert len(list(folder.iterdir())) == 12
    out = tmp_path / "out"
    argv = ["--model", str(exported), "--images", str(folder), "--no-progress", "--no-maps"]
    assert main(argv + ["--out", str(out), "--no-overlays"]) == 0
    printed = capsys.readouterr().out
    assert "10 image(s) predicted" in printed and "6 with quality flags" in printed
    table = pd.read_csv(out / "predictions.csv")
    got = {pathlib.Path(p).name: q for p, q in zip(table["image"], table["quality"])}
    assert got == EXPECTED_FLAGS
    assert (
        table.set_index(table["image"].map(lambda p: pathlib.Path(p).name)).loc[
            "black.png", "fov_fraction"
        ]
        == 0.0
    )
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(pathlib.Path(p).name for p in skipped["image"]) == ["empty.jpg", "notes.png"]
    assert set(skipped["flags"]) == {"unreadable"}
    for image, reason in zip(skipped["image"], skipped["reason"]):
        assert reason.startswith(f"{image}: not a readable image")

    strict = tmp_path / "strict"
    assert main(argv + ["--out", str(strict), "--strict"]) == 0
    table = pd.read_csv(strict / "predictions.csv")
    assert sorted(pathlib.Path(p).name for p in table["image"]) == [
        "IDRiD_01.jpg", "IDRiD_02.jpg", "IDRiD_03.jpg", "retina.jpg"
    ]  # fmt: skip
    assert set(table["quality"]) == {"ok"}
    skipped = pd.read_csv(strict / "skipped.csv", keep_default_na=False)
    flags = {pathlib.Path(p).name: f for p, f in zip(skipped["image"], skipped["flags"])}
    assert flags == {
        "empty.jpg": "unreadable",
        "notes.png": "unreadable",
        **{k: v for k, v in EXPECTED_FLAGS.items() if v != "ok"},
    }
    reason = skipped.set_index("flags").loc["truncated", "reason"]
    assert "quality flags (--strict): truncated or corrupt file (no end marker)" in reason
    overlays = sorted(p.name for p in (strict / "overlays").iterdir())
    assert overlays == ["IDRiD_01.png", "IDRiD_02.png", "IDRiD_03.png", "retina.png"]
    assert not [p for p in strict.iterdir() if p.name.endswith(".tmp")]


def test_overlay_caption_warns_of_flags_and_strict_with_nothing_left(exported, tmp_path, capsys):
    folder = tmp_path / "photos"
    _png(folder / "good.png", synthetic.generate(0, size=160).image)
    _png(folder / "black.png", np.zeros((200, 200, 3), np.uint8))
    out = tmp_path / "out"
    argv = ["--model", str(exported), "--images", str(folder), "--no-progress", "--no-maps"]
    assert main(argv + ["--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(table["quality"]) == ["no_fov;uniform;no_colour", "ok"]
    warning = np.array(WARNING_COLOR, np.uint8)
    for name, flagged in (("good", False), ("black", True)):
        painted = cv2.cvtColor(cv2.imread(str(out / "overlays" / f"{name}.png")), 4)
        banner = painted[: painted.shape[0] - 200 + (40 if name == "good" else 0)]
        red = np.all(banner == warning, axis=-1).sum()
        assert (red > 20) if flagged else (red == 0), (name, red)
    # --strict with only flagged photographs: exit 2, the reason in skipped.csv, no predictions.
    (folder / "good.png").unlink()
    strict = tmp_path / "strict"
    assert main(argv + ["--out", str(strict), "--strict"]) == 2
    assert "none of the 1 file(s) passed the quality checks (--strict)" in capsys.readouterr().err
    assert sorted(p.name for p in strict.iterdir()) == ["skipped.csv"]


def test_export_signatures_return_the_same_quality(exported):
    model = load_exported(exported)
    assert model.quality_outputs == ["fov_fraction", "quality"]
    assert model.meta["quality"]["flags"]["serve_bytes"] == list(quality.FLAGS)
    real = _small_real("IDRiD_01.jpg", 300)
    photos = [real, np.zeros_like(real), real // 40]
    served = model.predict(np.stack(photos))
    for i, photo in enumerate(photos):
        expected = quality.assess(None, photo)
        assert served["quality"][i] == expected.text
        assert served["fov_fraction"][i] == pytest.approx(expected.measures["fov_fraction"])
    assert list(served["quality"][:2]) == ["ok", "no_fov;uniform;no_colour"]

    # serve_bytes: a truncated JPEG is served and flagged (the batch does not fail), a 16-bit
    # PNG is flagged as converted; both as predict reports them for the same files.
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(real, cv2.COLOR_RGB2BGR))[1].tobytes()
    png16 = cv2.imencode(".png", cv2.cvtColor(real, 4).astype(np.uint16) * 257)[1].tobytes()
    blobs = [jpeg, jpeg[: len(jpeg) // 2], png16]
    served = model.predict_bytes(blobs)
    assert list(served["quality"]) == ["ok", "truncated", "bit_depth_converted"]
    assert served[keys.GRADE_PROBS].shape == (3, 5)
    for i, blob in enumerate(blobs):
        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), 1), 4)
        assert quality.assess(blob, image).text == served["quality"][i], i
        if i != 1:  # the decoders fill the missing half of a truncated JPEG differently
            assert served["fov_fraction"][i] == pytest.approx(
                quality.assess(blob, image).measures["fov_fraction"], abs=0.02
            )


def test_export_refuses_model_outputs_named_like_quality_outputs(tmp_path):
    image = keras.Input((SIZE, SIZE, 3))
    out = keras.layers.GlobalAveragePooling2D(name="quality")(image)
    with pytest.raises(ValueError, match=r"serving name\(s\) \['quality'\] are reserved"):
        export_model(
            keras.Model(image, out),
            tmp_path / "m",
            image_size=SIZE,
            preprocess={"fov_crop": True, "graham": False, "normalization": "unit"},
            output_names=["quality"],
        )


def test_read_photo_reports_empty_and_unreadable_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.png: not a readable image \(empty file"):
        read_photo(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="cannot read the file"):
        read_photo(tmp_path)
