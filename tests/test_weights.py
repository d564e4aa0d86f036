"""Offline pretrained weights (drkeras.weights): the list of files each experiment declares is the
set its builders request, the check lists missing files offline, a run stops naming every missing
file, cached files count as present where the libraries read them, and the ``KEY=none``
overrides build without any download.

Nothing is downloaded: Keras' ``get_file`` and kagglehub's ``model_download`` are intercepted
(recorded, then they fail as offline or stop the build), and every socket connection fails.
``HOME`` and ``KAGGLEHUB_CACHE`` point at temporary folders, so the caches are empty ones.
"""

import hashlib
import inspect
import json
import re
import socket

import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import weights
from drkeras.config import apply_overrides, resolve_preset
from drkeras.models import baselines
from drkeras.models.cooperative import build_reference_grader
from drkeras.models.mtunet import build_vgg16_unet
from drkeras.models.ssl_gan import build_resnet_image_classifier, build_resnet_patch_classifier
from experiments import cooperative as cooperative_exp
from experiments import mtunet as mtunet_exp
from experiments import pldmlt as pldmlt_exp
from experiments import ssl_gan as ssl_gan_exp
from experiments.collaborative import Collaborative

KEY = "model.encoder_weights"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection fails: whatever is not intercepted cannot download."""

    def refuse(self, *args, **kwargs):
        raise OSError("network disabled in tests/test_weights.py")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty caches: HOME (Keras reads ~/.keras/models) and KAGGLEHUB_CACHE in tmp_path."""
    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KERAS_HOME", str(home / ".keras"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    return {"keras": home / ".keras" / "models", "kaggle": tmp_path / "kagglehub"}


def _patch_get_file(monkeypatch, get_file):
    import keras.src.utils.data_utils as data_utils

    monkeypatch.setattr(data_utils, "get_file", get_file)
    monkeypatch.setattr(tf.keras.utils, "get_file", get_file)


@pytest.fixture
def offline(monkeypatch):
    """Keras' and kagglehub's downloads fail as they do offline; returns what was requested."""
    import kagglehub

    requested = []

    def get_file(fname=None, origin=None, *args, **kwargs):
        requested.append(fname)
        raise Exception(f"URL fetch failure on {origin}: None -- offline (test)")

    def model_download(handle, path=None, **kwargs):
        requested.append(path)
        raise ConnectionError(f"kaggle.com unreachable for {handle} {path} (test)")

    _patch_get_file(monkeypatch, get_file)
    monkeypatch.setattr(kagglehub, "model_download", model_download)
    return requested


# ---------------------------------------------------------------------------------------------
# The list is what the builders request


class _Requested(Exception):
    """Raised by the intercepted downloaders once the request is recorded: stops the build."""


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    """Records every weight file requested, as ``(store, file, origin, hash)``. keras-cv presets
    get a served ``config.json`` (a small ResNetV2 backbone) so the build goes on to request the
    weights file; every weights request then stops the build."""
    import kagglehub

    requests = []
    served = tmp_path / "served_config.json"

    def serve_config():
        import keras_cv

        backbone = keras_cv.models.ResNetV2Backbone(
            stackwise_filters=[8, 8, 8, 8],
            stackwise_blocks=[2, 2, 2, 2],
            stackwise_strides=[1, 2, 2, 2],
            block_type="block",
            include_rescaling=False,
        )
        config = keras.saving.serialize_keras_object(backbone)
        config["weights"] = "model.weights.h5"
        served.write_text(json.dumps(config))
        return str(served)

    def get_file(fname=None, origin=None, *args, cache_subdir="datasets", **kwargs):
        file_hash = kwargs.get("file_hash") or kwargs.get("md5_hash")
        requests.append(("keras", f"{cache_subdir}/{fname}", origin, file_hash))
        raise _Requested(fname)

    def model_download(handle, path=None, **kwargs):
        requests.append(("kagglehub", f"kaggle://{handle}/{path}", f"kaggle://{handle}", None))
        if path == "config.json":
            return serve_config()
        raise _Requested(path)

    _patch_get_file(monkeypatch, get_file)
    monkeypatch.setattr(kagglehub, "model_download", model_download)
    return requests


def _build(builder):
    with pytest.raises(_Requested):
        builder()


# Graders whose construction takes 6-25 s on a CPU: their request is read from the builder's
# code path instead (the keras.applications constructor's get_file call, image-classifiers'
# weights table, which its load_model_weights reads). Every library still has real builds below.
SLOW_GRADERS = {
    "nasnet_large",
    "nasnet_mobile",
    "densenet201",
    "inception_resnet_v2",
    "resnext50",
    "resnext101",
}


def _norm(text: str) -> str:
    return text.lower().replace("-", "").replace("_", "")


def _applications_request(constructor: str):
    """``(location, origin, hash)`` of the no-top get_file call of keras.applications'
    ``constructor``, read from its module: the no-top file name given to get_file (named after
    the constructor), the first ``file_hash`` after it, and the module's URL constants."""
    module = inspect.getmodule(getattr(keras.applications, constructor))
    # adjacent string literals split over lines are one literal
    source = re.sub(r'"\s*\n\s*"', "", inspect.getsource(module))
    token = _norm(constructor)
    pairs = []
    for match in re.finditer(r'"([a-z0-9_]+(?:notop|no_top)\.h5)"', source):
        fname, before = match.group(1), source[max(0, match.start() - 60) : match.start()]
        # the literal passed to get_file, or assigned to the fname it is then passed
        in_call = "get_file(" in before or re.search(r"fname\s*=\s*\(?\s*$", before)
        if in_call and _norm(fname).startswith(token):
            file_hash = re.search(r'file_hash="([0-9a-f]+)"', source[match.end() :]).group(1)
            pairs.append((fname, file_hash))
    assert len(set(pairs)) == 1, (constructor, pairs)
    fname, file_hash = pairs[0]
    constants = [v for v in vars(module).values() if isinstance(v, str) and "://" in v]
    # a module constant holding the no-top URL, else a base URL joined with the file name
    origins = {
        c
        for c in constants
        if c.endswith(".h5")
        and "notop" in _norm(c)
        and _norm(c.rsplit("/", 1)[1]).startswith(token)
    } or {c + fname for c in constants if c.endswith("/")}
    assert len(origins) == 1, (constructor, origins)
    return f"models/{fname}", origins.pop(), file_hash


def _grader_request(name, requests):
    """The request of ``baselines.build_grader(name, encoder_weights='imagenet')`` from its code
    path: the constructor its registry entry calls, then that constructor's no-top file."""
    captured = inspect.getclosurevars(baselines.GRADERS[name].build_base).nonlocals
    if "constructor" in captured:  # keras.applications
        requests.append(("keras",) + _applications_request(captured["constructor"]))
    else:  # image-classifiers: load_model_weights looks its file up in WEIGHTS_COLLECTION
        from classification_models import weights as ic

        source = inspect.getsource(ic.load_model_weights)
        assert "_find_weights(model_name, dataset, include_top)" in source
        (entry,) = ic._find_weights(captured["name"], "imagenet", False)
        requests.append(("keras", f"models/{entry['name']}", entry["url"], entry["md5"]))


def _build_grader(name, w, requests, size=32):
    if w is None:
        return  # without weights the builders request nothing (tests/test_offline_weights.py)
    if name in SLOW_GRADERS:
        _grader_request(name, requests)
    else:
        _build(lambda: baselines.build_grader(name, input_shape=(size, size, 3), encoder_weights=w))


def _build_segmenter(name, backbone, w, width, num_classes=2):
    if w is None:
        return  # without weights the builders request nothing (tests/test_offline_weights.py)
    options = {"width": width} if name == "deeplabv3plus" else {}
    _build(
        lambda: baselines.build_segmenter(
            name,
            input_shape=(32, 32, 3),
            num_classes=num_classes,
            backbone=backbone,
            encoder_weights=w,
            **options,
        )
    )


def _build_vgg16_unet(w, width):
    if w is not None:
        _build(
            lambda: build_vgg16_unet(
                input_shape=(32, 32, 3), num_seg_classes=2, encoder_weights=w, width=width
            )
        )


def _builds_pldmlt(config, requests):
    """What PLDMLT builds with ``model.encoder_weights`` (experiments/pldmlt.py ``_Run``)."""
    w, m = config.model.encoder_weights, config.method
    for arch in [*pldmlt_exp.PSEUDO_GRADERS.values(), m.nasnet, "densenet201"]:
        _build_grader(arch, w, requests)
    for name in pldmlt_exp.SEGMENTER_ROWS.values():
        backbone = getattr(m, pldmlt_exp._SEGMENTER_BACKBONE[name])
        _build_segmenter(name, backbone, w, config.model.width)
    _build_vgg16_unet(w, config.model.width)


def _builds_mtunet(config, requests):
    """What MTUnet builds (experiments/mtunet.py ``_Run.vgg16_unet/grader/segmenter``)."""
    w, m = config.model.encoder_weights, config.method
    _build_vgg16_unet(w, config.model.width)
    for name in m.graders:
        if name != mtunet_exp.VGG16_GRADER:
            _build_grader(name, w, requests, size=96)
    for name in mtunet_exp.SEGMENTER_ROWS.values():
        backbone = m.deeplab_backbone if name == "deeplabv3plus" else m.segmenter_backbone
        _build_segmenter(name, backbone, w, config.model.width)


def _builds_cooperative(config, requests):
    w = config.model.encoder_weights
    if w is not None:
        for name in config.method.graders:
            _build(
                lambda n=name: build_reference_grader(n, input_shape=(75, 75, 3), encoder_weights=w)
            )


def _builds_ssl_gan(config, requests):
    m = config.method
    for w, build in (
        (
            m.resnet34_weights,
            lambda: build_resnet_patch_classifier(
                input_shape=(32, 32, 3),
                encoder_weights=m.resnet34_weights,
                weights_option=ssl_gan_exp.RESNET34_WEIGHTS,
            ),
        ),
        (
            m.pretrained_weights,
            lambda: build_resnet_image_classifier(
                input_shape=(32, 32, 3),
                encoder_weights=m.pretrained_weights,
                weights_option=ssl_gan_exp.PRETRAINED_WEIGHTS,
            ),
        ),
    ):
        if w is not None:
            _build(build)


def _builds_collaborative(config, requests):
    """Zhou et al.'s networks have no pretrained weights (the run refuses model.encoder_weights)."""


CASES = [
    (pldmlt_exp.PLDMLT, "paper", (), _builds_pldmlt),
    (pldmlt_exp.PLDMLT, "smoke", (), _builds_pldmlt),
    (mtunet_exp.MTUnetExperiment, "paper", (), _builds_mtunet),
    (mtunet_exp.MTUnetExperiment, "smoke", (), _builds_mtunet),
    (ssl_gan_exp.SSLGAN, "paper", (), _builds_ssl_gan),
    (ssl_gan_exp.SSLGAN, "smoke", (), _builds_ssl_gan),
    (
        ssl_gan_exp.SSLGAN,
        "smoke",
        (f"{ssl_gan_exp.RESNET34_WEIGHTS}=imagenet", f"{ssl_gan_exp.PRETRAINED_WEIGHTS}=imagenet"),
        _builds_ssl_gan,
    ),
    (cooperative_exp.JointSegExperiment, "paper", (), _builds_cooperative),
    (cooperative_exp.JointSegExperiment, "paper", (f"{KEY}=imagenet",), _builds_cooperative),
    (Collaborative, "paper", (), _builds_collaborative),
    (Collaborative, "smoke", (), _builds_collaborative),
]


@pytest.mark.parametrize(
    "experiment, preset, overrides, builds",
    CASES,
    ids=[f"{c[0].name}-{c[1]}{'-imagenet' if c[2] else ''}" for c in CASES],
)
def test_pretrained_weights_are_exactly_what_the_builders_request(
    caches, recorder, experiment, preset, overrides, builds
):
    config = resolve_preset(experiment.presets, preset, overrides)
    listed = experiment().pretrained_weights(config)
    builds(config, recorder)

    def ident(store, location, file_hash):
        return (store, location, file_hash)

    requested = {ident(s, loc, h) for s, loc, _, h in recorder}
    expected = {
        ident(f.store, f"{f.cache_subdir}/{f.fname}" if f.store == "keras" else
              f"{f.origin}/{f.fname}", f.file_hash)
        for f in listed
    }  # fmt: skip
    assert expected == requested
    # One row per file and key, each naming a URL a builder requested it from.
    assert len(listed) == len({(f.location, f.key) for f in listed})
    for f in listed:
        origins = {o for s, loc, o, _ in recorder if loc.endswith("/" + f.fname)}
        assert f.origin in origins, (f.fname, f.origin, origins)
    if experiment is ssl_gan_exp.SSLGAN:
        keys = {
            "resnet34": ssl_gan_exp.RESNET34_WEIGHTS,
            "resnet50": ssl_gan_exp.PRETRAINED_WEIGHTS,
        }
        for f in listed:
            assert f.key == keys[f.fname[:8]], f
    else:
        assert {f.key for f in listed} <= {KEY}
    # The paper presets of the ImageNet papers do need files; the smoke presets none.
    if preset == "paper" and experiment in (pldmlt_exp.PLDMLT, mtunet_exp.MTUnetExperiment):
        assert {f.library for f in listed} >= {"keras.applications", "image-classifiers"}
        assert any(f.store == "kagglehub" for f in listed)
    if preset == "smoke" and not overrides:
        assert listed == []


def test_every_registered_grader_has_a_known_file():
    for name in baselines.GRADERS:
        (f,) = weights.grader(name, "imagenet")
        assert f.fname.endswith(".h5") and f.file_hash, f
    with pytest.raises(ValueError, match=r"model\.encoder_weights='imagenet21k'"):
        weights.grader("densenet201", "imagenet21k")
    with pytest.raises(ValueError, match=r"set model\.encoder_weights=none"):
        weights.segmenter("deeplabv3plus", "resnet18_v2", "imagenet")
    with pytest.raises(ValueError, match="segmentation-models backbone 'mobilenet'"):
        weights.segmenter("unet", "mobilenet", "imagenet")


# ---------------------------------------------------------------------------------------------
# Offline


def _pldmlt_paper():
    return pldmlt_exp.PLDMLT(), resolve_preset(pldmlt_exp.PLDMLT.presets, "paper")


def test_check_offline_lists_every_missing_file_and_exits_1(caches, offline, capsys):
    experiment, config = _pldmlt_paper()
    files = experiment.pretrained_weights(config)
    assert weights.main(["--experiment", "pldmlt", "--preset", "paper", "--check"]) == 1
    out = capsys.readouterr().out
    assert not offline, "--check downloaded"
    rows = [line for line in out.splitlines() if line.startswith("missing ")]
    assert len(rows) == len(files) == 9
    for f in files:
        assert any(f.fname in row and f.key in row for row in rows), f.fname
        assert str(f.path) in out and f.origin in out
    assert str(caches["keras"]) in out and str(caches["kaggle"]) in out
    assert f"0 of {len(files)} file(s) present, {len(files)} missing" in out
    # Without --check it tries every download, fails offline and still exits 1.
    assert weights.main(["--experiment", "pldmlt", "--preset", "paper"]) == 1
    assert sorted(offline) == sorted(f.fname for f in files)


def test_ensure_available_offline_names_every_missing_file(caches, offline):
    experiment, config = _pldmlt_paper()
    files = experiment.pretrained_weights(config)
    with pytest.raises(weights.MissingWeights) as err:
        weights.ensure_available(experiment, config, preset="paper")
    message = str(err.value)
    assert [f.fname for f in err.value.files] == [f.fname for f in files]
    for f in files:
        assert f.fname in message and str(f.path) in message
    assert f"{len(files)} pretrained weight file(s) of pldmlt" in message
    assert "python -m drkeras.weights --experiment pldmlt --preset paper" in message
    assert "--set model.encoder_weights=none" in message
    assert "URL fetch failure" in message and "ConnectionError" in message
    # every file was tried, not only the first
    assert sorted(offline) == sorted(f.fname for f in files)
    assert err.value.option == KEY
    # the preset is found from the files when the caller does not give it
    with pytest.raises(weights.MissingWeights, match="--experiment pldmlt --preset paper"):
        weights.ensure_available(experiment, config)


def test_ssl_gan_missing_weights_name_both_keys(caches, offline):
    experiment = ssl_gan_exp.SSLGAN()
    sets = [
        f"{ssl_gan_exp.RESNET34_WEIGHTS}=imagenet",
        f"{ssl_gan_exp.PRETRAINED_WEIGHTS}=imagenet",
    ]
    config = resolve_preset(experiment.presets, "smoke", sets)
    with pytest.raises(weights.MissingWeights) as err:
        weights.ensure_available(experiment, config, preset="smoke", overrides=sets)
    message = str(err.value)
    assert (
        f"--set {ssl_gan_exp.PRETRAINED_WEIGHTS}=none --set {ssl_gan_exp.RESNET34_WEIGHTS}=none"
        in message
    )
    assert "--preset smoke " + " ".join(f"--set {s}" for s in sets) in message
    assert KEY not in message
    assert sorted(offline) == [
        "resnet34_imagenet_1000_no_top.h5",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ]


# ---------------------------------------------------------------------------------------------
# Present files


def _fake(path, content: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return hashlib.md5(content).hexdigest()  # noqa: S324


def test_cached_files_count_as_present_where_the_libraries_read_them(caches, monkeypatch):
    import kagglehub
    from kagglehub.cache import Cache

    experiment = ssl_gan_exp.SSLGAN()
    config = resolve_preset(experiment.presets, "paper")
    (f,) = experiment.pretrained_weights(config)
    assert f.path == caches["keras"] / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert f.status() == "missing"
    # A file of other contents is not the library's: Keras would download it again.
    _fake(f.path, b"not the ImageNet weights")
    assert f.status() == "bad hash"
    # With the hash the library checks it is present (the registry's hash made to match a
    # small stand-in file), and Keras' own get_file finds it there without a network.
    md5 = _fake(f.path, b"stand-in ResNet50 weights")
    fname, origin, _ = weights._APPLICATIONS_NOTOP["ResNet50"]
    monkeypatch.setitem(weights._APPLICATIONS_NOTOP, "ResNet50", (fname, origin, md5))
    (f,) = experiment.pretrained_weights(config)
    assert f.status() == "present"
    assert keras.utils.get_file(fname, origin, cache_subdir="models", file_hash=md5) == str(f.path)
    assert weights.ensure_available(experiment, config) == [f]
    assert weights.main(["--experiment", "ssl_gan", "--preset", "paper", "--check"]) == 0

    # keras-cv's preset files: present once kagglehub's cache holds them (file + marker), and
    # kagglehub then serves them offline.
    deeplab = weights.segmenter("deeplabv3plus", "resnet50_v2", "imagenet")
    assert [d.fname for d in deeplab] == ["config.json", "model.weights.h5"]
    assert all(str(d.path).startswith(str(caches["kaggle"])) for d in deeplab)
    assert [d.status() for d in deeplab] == ["missing", "missing"]
    for d in deeplab:
        _fake(d.path, b"{}")
        assert d.status() == "missing"  # no completion marker: kagglehub would download it
        Cache().mark_as_complete(weights._kaggle_handle(d.origin), d.fname)
        assert d.status() == "present"
        assert kagglehub.model_download(weights._kaggle_slug(d.origin), d.fname) == str(d.path)
    # config.json names the weights file; the list follows it.
    deeplab[0].path.write_text(json.dumps({"weights": "other.weights.h5"}))
    names = [d.fname for d in weights.segmenter("deeplabv3plus", "resnet50_v2", "imagenet")]
    assert names == ["config.json", "other.weights.h5"]


def test_download_fetches_into_the_cache_the_library_reads(caches, tmp_path, monkeypatch):
    # A file:// origin: Keras' own get_file copies it into the cache without a network.
    source = tmp_path / "vgg19_notop.h5"
    md5 = _fake(source, b"stand-in VGG19 weights")
    fname, _, _ = weights._APPLICATIONS_NOTOP["VGG19"]
    monkeypatch.setitem(weights._APPLICATIONS_NOTOP, "VGG19", (fname, source.as_uri(), md5))
    experiment = cooperative_exp.JointSegExperiment()
    config = resolve_preset(experiment.presets, "paper", [f"{KEY}=imagenet"])
    vgg19 = [f for f in experiment.pretrained_weights(config) if f.fname == fname]
    assert vgg19[0].status() == "missing"
    files = weights.ensure_files(vgg19, experiment=experiment)
    assert files[0].status() == "present"
    assert (caches["keras"] / fname).read_bytes() == b"stand-in VGG19 weights"


# ---------------------------------------------------------------------------------------------
# Random weights instead


def test_random_weight_overrides_build_without_any_download(caches, offline):
    experiment, config = _pldmlt_paper()
    files = experiment.pretrained_weights(config)
    overrides = weights.random_weight_overrides(experiment, config)
    assert overrides == [f"{KEY}=none"]
    warning = weights.random_weights_warning(files)
    assert "RANDOM" in warning and f"{KEY}=none" in warning
    for f in files:
        for network in f.network.split(", "):
            assert network in warning
    random_config = apply_overrides(config, overrides)
    assert experiment.pretrained_weights(random_config) == []
    assert weights.ensure_available(experiment, random_config) == []

    gan = ssl_gan_exp.SSLGAN()
    sets = [f"{ssl_gan_exp.RESNET34_WEIGHTS}=imagenet"]
    gan_config = resolve_preset(gan.presets, "paper", sets)
    gan_overrides = weights.random_weight_overrides(gan, gan_config)
    assert gan_overrides == [
        f"{ssl_gan_exp.PRETRAINED_WEIGHTS}=none",
        f"{ssl_gan_exp.RESNET34_WEIGHTS}=none",
    ]
    m = apply_overrides(gan_config, gan_overrides).method
    model = build_resnet_patch_classifier(
        input_shape=(32, 32, 3),
        encoder_weights=m.resnet34_weights,
        weights_option=ssl_gan_exp.RESNET34_WEIGHTS,
    )
    assert model.count_params() > 0
    assert not offline, "a random-weights build requested a download"
    assert "no pretrained weights" in weights.random_weights_warning([])
