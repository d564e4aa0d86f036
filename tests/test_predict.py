"""``python -m drkeras.predict``: grades and probabilities in the CSV equal the exported model's,
lesion maps are mapped back onto the photograph's field of view, overlays paint the lesions,
unreadable files are skipped and counted, bad arguments exit 2 with a clear message."""

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.data import preprocess, synthetic
from drkeras.export import export_model, load_exported
from drkeras.predict import LESION_COLORS, OVERLAY_ALPHA, main, map_to_photo, read_image

SIZE = 32
# Constant lesion maps: each channel's probability is sigmoid(bias), whatever the image.
LESION_BIAS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32)


def _model():
    image = keras.Input((SIZE, SIZE, 3), name="image")
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    grade = keras.layers.Dense(5, activation="softmax", name=keys.GRADE_PROBS)(pooled)
    lesions = keras.layers.Conv2D(5, 1, activation="sigmoid", name=keys.LESION_PROBS)(features)
    model = keras.Model(image, {keys.GRADE_PROBS: grade, keys.LESION_PROBS: lesions})
    kernel, _ = model.get_layer(keys.LESION_PROBS).get_weights()
    model.get_layer(keys.LESION_PROBS).set_weights([np.zeros_like(kernel), LESION_BIAS])
    return model


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


def _photos(folder):
    """Two PNGs of one size in a sub-folder, a JPEG of another size, a corrupt file, a text."""
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i, (name, size) in enumerate([("sub/a.png", 48), ("sub/b.png", 48), ("c.jpg", 40)]):
        photo = synthetic.generate(i, size=size).image
        cv2.imwrite(str(folder / name), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
        paths.append(folder / name)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    return paths


def test_predict_writes_grades_maps_and_overlays(exported, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    assert main(["--model", str(exported), "--images", str(tmp_path / "photos"), "--out", str(out),
                 "--no-progress", "--batch-size", "4"]) == 0  # fmt: skip
    assert "3 image(s) predicted" in capsys.readouterr().out

    table = pd.read_csv(out / "predictions.csv")
    grade_columns = [f"p_grade_{k}" for k in range(5)]
    assert list(table.columns) == [
        "image", "width", "height", "quality", "fov_fraction", "grade", "grade_name"
    ] + grade_columns  # fmt: skip
    # 40-48 px synthetic photographs: smaller than the stated minimum, otherwise fine.
    assert set(table["quality"]) == {"too_small"}
    assert table["fov_fraction"].between(0.5, 0.8).all()
    # find_images: the corrupt file is tried (it has an image suffix), the text file is not.
    assert sorted(table["image"]) == sorted(str(p.resolve()) for p in photos)
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["image"]) == [str((tmp_path / "photos" / "broken.png").resolve())]
    assert "not a readable image" in skipped["reason"][0]

    model = load_exported(exported)
    for path in photos:
        row = table[table["image"] == str(path.resolve())].iloc[0]
        photo = read_image(path)
        assert (row["height"], row["width"]) == photo.shape[:2]
        probs = model.predict(photo[None])[keys.GRADE_PROBS][0]
        np.testing.assert_allclose(row[grade_columns].to_numpy(float), probs, atol=1e-6)
        assert row["grade"] == int(np.argmax(probs))
        assert row["grade_name"] == keys.GRADE_NAMES[row["grade"]]

        # Maps in the photograph's grid: sigmoid(bias) inside the field of view, 0 outside.
        y0, x0, y1, x1 = preprocess.fov_box(photo).numpy()
        inside = np.zeros(photo.shape[:2], bool)
        inside[y0:y1, x0:x1] = True
        assert 0 < inside.sum() < inside.size
        for lesion, bias in zip(keys.LESIONS, LESION_BIAS):
            grey = cv2.imread(str(out / "maps" / path.stem / f"lesion_probs_{lesion}.png"), 0)
            assert grey.shape == photo.shape[:2]
            expected = round(255 / (1 + np.exp(-bias)))
            assert np.all(np.abs(grey[inside].astype(int) - expected) <= 1), lesion
            assert np.all(grey[~inside] == 0)

        # Overlay: a caption banner above the photo; lesions with p >= 0.5 (EX, SE, OD) painted
        # inside the field of view, the photo untouched outside it.
        painted = cv2.cvtColor(cv2.imread(str(out / "overlays" / f"{path.stem}.png")), 4)
        banner = painted.shape[0] - photo.shape[0]
        assert banner > 0 and painted.shape[1:] == photo.shape[1:]
        body = painted[banner:].astype(float)
        expected_pixel = photo[(y0 + y1) // 2, (x0 + x1) // 2].astype(float)
        for lesion in ("EX", "SE", "OD"):
            expected_pixel = (1 - OVERLAY_ALPHA) * expected_pixel + OVERLAY_ALPHA * np.array(
                LESION_COLORS[lesion], float
            )
        np.testing.assert_allclose(body[(y0 + y1) // 2, (x0 + x1) // 2], expected_pixel, atol=1)
        np.testing.assert_array_equal(body[~inside], photo[~inside])


def test_map_to_photo_undoes_the_crop_and_padding():
    # A 2 x 4 box padded to a 4 x 4 square (rows 1-2 hold it), two channels.
    square = np.zeros((4, 4, 2), np.float32)
    square[1:3, :, 0] = [[1, 2, 3, 4], [5, 6, 7, 8]]
    square[1:3, :, 1] = 9
    square[0, :, :] = square[3, :, :] = -1  # padding: must not appear
    photo = map_to_photo(square, (1, 1, 3, 5), (4, 6), interpolation=cv2.INTER_NEAREST)
    assert photo.shape == (4, 6, 2)
    expected = np.zeros((4, 6))
    expected[1:3, 1:5] = [[1, 2, 3, 4], [5, 6, 7, 8]]
    np.testing.assert_array_equal(photo[..., 0], expected)
    np.testing.assert_array_equal(photo[..., 1], np.where(expected > 0, 9, 0))
    # Same geometry as the preprocessing: a box of the photo mapped forward and back.
    image = np.zeros((30, 50, 1), np.float32)
    image[5:25, 10:40] = 1.0
    forward = preprocess.crop_and_resize(image, [5, 10, 25, 40], 12, method="nearest").numpy()
    back = map_to_photo(forward[..., 0], (5, 10, 25, 40), (30, 50), interpolation=0)
    np.testing.assert_array_equal(back, image[..., 0])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "{tmp}/nowhere"], "is not a SavedModel folder"),
        (["--images", "{tmp}/missing.jpg"], "--images {tmp}/missing.jpg: no such file or folder"),
        (["--images", "{tmp}/empty"], "no image files found"),
        (["--images", "{tmp}/bad.png"], "none of the 1 file(s) could be read as an image"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(exported, tmp_path, capsys, arguments, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    cv2.imwrite(str(tmp_path / "ok.png"), synthetic.generate(0, size=32).image)
    argv = {"--model": str(exported), "--images": str(tmp_path / "ok.png")}
    argv.update(dict(zip(arguments[::2], (a.format(tmp=tmp_path) for a in arguments[1::2]))))
    flat = [x for pair in argv.items() for x in pair]
    assert main(flat + ["--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_predict_on_the_real_retina_photograph(exported, tmp_path, capsys):
    """README's first prediction: scikit-image's real fundus photograph (CC0), graded through
    the command line, its field of view found and its lesion maps mapped back onto it."""
    import skimage.data

    from drkeras.data import samples

    assert samples.main(["--out", str(tmp_path / "example")]) == 0
    path = tmp_path / "example" / "retina.jpg"
    assert path.read_bytes() == samples.retina_source().read_bytes()  # the file itself
    photo = read_image(path)
    np.testing.assert_array_equal(photo, skimage.data.retina())
    out = tmp_path / "pred"
    assert main(["--model", str(exported), "--images", str(path), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert "1 image(s) predicted" in capsys.readouterr().out
    row = pd.read_csv(out / "predictions.csv").iloc[0]
    assert (row["width"], row["height"]) == (1411, 1411)
    probs = row[[f"p_grade_{k}" for k in range(5)]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
    # The photograph's disc touches the frame but for thin black margins: the field-of-view box
    # is the frame less a few pixels on each side.
    y0, x0, y1, x1 = preprocess.fov_box(photo).numpy()
    assert 0 < y0 <= 14 and 0 < x0 <= 14 and 1397 <= y1 < 1411 and 1397 <= x1 < 1411
    overlay = cv2.imread(str(out / "overlays" / "retina.png"))
    assert overlay.shape[1] == 1411 and overlay.shape[0] > 1411  # photo + caption banner
    grey = cv2.imread(str(out / "maps" / "retina" / "lesion_probs_EX.png"), 0)
    assert grey.shape == (1411, 1411) and grey[(y0 + y1) // 2, (x0 + x1) // 2] > 0
