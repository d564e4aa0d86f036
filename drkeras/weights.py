"""Pretrained weight files: which ones a run needs, where the libraries cache them, and fetching
them before training (issue 15, item 5: offline compute nodes).

Every experiment lists the files its networks load with ``Experiment.pretrained_weights(config)``
(a list of :class:`WeightFile`), built from the helpers here (:func:`grader`, :func:`segmenter`,
:func:`vgg16_encoder`, :func:`keras_application`, :func:`image_classifier`). Each file names the
config key that asks for it, so ``--set KEY=none`` builds that network from random weights.

Command line (on a machine with a network, e.g. the login node of a cluster whose compute nodes
are offline and share its home directory)::

    python -m drkeras.weights --experiment pldmlt --preset paper           # list + download
    python -m drkeras.weights --experiment pldmlt --preset paper --check   # list only; exit 1
                                                                           # when one is missing

Where the files live (the places the libraries read them from later):

- ``keras.applications``, image-classifiers, segmentation-models (through keras_applications)
  and our VGG16 encoder download with Keras' ``get_file`` into ``~/.keras/models``. Keras 2.15
  takes that folder from ``HOME`` (falling back to ``/tmp/.keras`` when ``~/.keras`` is not
  writable), NOT from ``KERAS_HOME``, which it reads only for ``keras.json``: to move the cache,
  set ``HOME`` (the command prints a note when ``KERAS_HOME`` points elsewhere).
  A file counts as present when its MD5/SHA-256 matches the hash the library checks (a file that
  does not match would be downloaded again by the library, i.e. fail offline).
- keras-cv 0.8.2 presets (DeepLabv3+'s ImageNet ResNet50V2) download through kagglehub into
  ``$KAGGLEHUB_CACHE`` (default ``~/.cache/kagglehub``); present means kagglehub's own cache
  lookup finds the file (the file and kagglehub's completion marker).

The runner calls :func:`ensure_available` before the first stage of a run: missing files are
downloaded, and when that fails (offline) :class:`MissingWeights` lists every missing file, the
command that prepares them and the ``--set KEY=none`` alternative. :func:`random_weight_overrides`
gives the ``KEY=none`` overrides that replace every pretrained file by random initialisation, and
:func:`random_weights_warning` the line to log when a run uses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import drkeras.startup

from drkeras.models.blocks import WEIGHTS_OPTION, PretrainedWeightsUnavailable

__all__ = [
    "IMAGE_CLASSIFIERS",
    "KERAS_APPLICATIONS",
    "KERAS_CV",
    "MissingWeights",
    "WeightFile",
    "collect",
    "ensure_available",
    "ensure_files",
    "grader",
    "image_classifier",
    "keras_application",
    "keras_cache_dir",
    "main",
    "prepare_command",
    "random_weight_overrides",
    "random_weights_warning",
    "reference_grader",
    "segmenter",
    "vgg16_encoder",
    "weights_table",
]

KERAS_APPLICATIONS = "keras.applications"
IMAGE_CLASSIFIERS = "image-classifiers"
SEGMENTATION_MODELS = "segmentation-models"
KERAS_CV = "keras-cv"

# Where a file is cached: Keras' get_file, or kagglehub (keras-cv presets).
KERAS_STORE = "keras"
KAGGLE_STORE = "kagglehub"

IMAGENET = "imagenet"
_KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

# The no-top ImageNet files of the keras.applications constructors the experiments use:
# constructor -> (file name, URL, hash), exactly as Keras 2.15's constructors pass them to
# get_file (tests/test_weights.py checks them against the library).
_APPLICATIONS_NOTOP: Dict[str, Tuple[str, str, str]] = {
    "NASNetLarge": (
        "nasnet_large_no_top.h5",
        _KERAS_APPLICATIONS_URL + "nasnet/NASNet-large-no-top.h5",
        "d81d89dc07e6e56530c4e77faddd61b5",
    ),
    "NASNetMobile": (
        "nasnet_mobile_no_top.h5",
        _KERAS_APPLICATIONS_URL + "nasnet/NASNet-mobile-no-top.h5",
        "1ed92395b5b598bdda52abe5c0dbfd63",
    ),
    "DenseNet201": (
        "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL
        + "densenet/densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "c13680b51ded0fb44dff2d8f86ac8bb1",
    ),
    "InceptionResNetV2": (
        "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL
        + "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "d19885ff4a710c122648d3b5c3b684e4",
    ),
    "InceptionV3": (
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL
        + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "bcbd6486424b2319ff4ef7d526e38f63",
    ),
    "VGG16": (
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    "VGG19": (
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "253f8cb515780f3b799900260a226db6",
    ),
    "ResNet50": (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
}

# drkeras.models.baselines.GRADERS -> (library, constructor or image-classifiers name).
_GRADER_SOURCES: Dict[str, Tuple[str, str]] = {
    "nasnet_large": (KERAS_APPLICATIONS, "NASNetLarge"),
    "nasnet_mobile": (KERAS_APPLICATIONS, "NASNetMobile"),
    "densenet201": (KERAS_APPLICATIONS, "DenseNet201"),
    "inception_resnet_v2": (KERAS_APPLICATIONS, "InceptionResNetV2"),
    "resnext50": (IMAGE_CLASSIFIERS, "resnext50"),
    "resnext101": (IMAGE_CLASSIFIERS, "resnext101"),
}

# segmentation-models backbones that keras_applications 1.0.8 builds: the same file names and
# hashes as keras.applications (one cached copy serves both; keras_applications downloads it from
# the fchollet/deep-learning-models releases, keras.applications from Google storage).
_SM_APPLICATIONS = {"vgg16": "VGG16", "vgg19": "VGG19"}

# keras-cv 0.8.2's only ResNetV2 preset with ImageNet weights (drkeras.models.baselines).
_DEEPLAB_PRESET = "resnet50_v2_imagenet"
_DEEPLAB_PRESET_BACKBONE = "resnet50_v2"
# The weights file name keras-cv writes into a preset (save_to_preset's default); the preset's
# config.json names the real one, read once config.json is cached.
_KERAS_CV_WEIGHTS = "model.weights.h5"


# ---------------------------------------------------------------------------------------------
# One file


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One pretrained file a run needs.

    Attributes:
        network: the network(s) that load it (``", "``-joined when several share the file).
        library: the library that downloads it (``keras.applications``, ``image-classifiers``,
            ``segmentation-models``, ``keras-cv``).
        fname: the file's name in the cache (keras-cv: its path in the preset).
        origin: the URL it comes from (keras-cv: the ``kaggle://`` preset handle).
        key: the config key that asks for it (``--set KEY=none`` builds without it).
        file_hash: the MD5 (32 hex digits) or SHA-256 (64) the library checks; ``None``: none.
        store: ``"keras"`` (Keras' ``get_file`` cache) or ``"kagglehub"``.
        cache_subdir: the sub-folder of the Keras cache (``models``).

    Example::

        f = keras_application("VGG19", "imagenet", network="VGG-19 grader")[0]
        f.path, f.status()   # (PosixPath('/home/me/.keras/models/vgg19_..._notop.h5'), 'missing')
    """

    network: str
    library: str
    fname: str
    origin: str
    key: str = WEIGHTS_OPTION
    file_hash: Optional[str] = None
    store: str = KERAS_STORE
    cache_subdir: str = "models"

    @property
    def location(self) -> Tuple[str, str]:
        """What identifies the cached file (two rows with the same location are one file)."""
        if self.store == KAGGLE_STORE:
            return (self.store, f"{self.origin}/{self.fname}")
        return (self.store, f"{self.cache_subdir}/{self.fname}")

    @property
    def path(self) -> pathlib.Path:
        """Where the library reads the file from (and where downloads put it)."""
        if self.store == KAGGLE_STORE:
            from kagglehub.cache import get_cached_path

            return pathlib.Path(get_cached_path(_kaggle_handle(self.origin), self.fname))
        return keras_cache_dir() / self.cache_subdir / self.fname

    def status(self) -> str:
        """``"present"``, ``"missing"`` or ``"bad hash"`` (cached but not the library's file:
        the library would download it again)."""
        if self.store == KAGGLE_STORE:
            from kagglehub.cache import Cache

            found = Cache().load_from_cache(_kaggle_handle(self.origin), self.fname)
            return "present" if found else "missing"
        path = self.path
        if not path.is_file():
            return "missing"
        if self.file_hash and not _hash_matches(path, self.file_hash):
            return "bad hash"
        return "present"

    @property
    def present(self) -> bool:
        return self.status() == "present"

    def download(self) -> pathlib.Path:
        """Fetch the file into the library's cache through the library's own downloader (Keras'
        ``get_file`` with the library's hash; kagglehub for keras-cv). Raises what they raise."""
        if self.store == KAGGLE_STORE:
            import kagglehub

            return pathlib.Path(kagglehub.model_download(_kaggle_slug(self.origin), self.fname))
        from tensorflow import keras

        return pathlib.Path(
            keras.utils.get_file(
                self.fname, self.origin, cache_subdir=self.cache_subdir, file_hash=self.file_hash
            )
        )


def keras_cache_dir() -> pathlib.Path:
    """The folder Keras' ``get_file`` caches downloads in when given no ``cache_dir``.

    Keras 2.15 (and tf_keras): ``~/.keras``, or ``/tmp/.keras`` when ``~/.keras`` is not
    writable; ``KERAS_HOME`` is not read there. Every library used here calls ``get_file``
    without a ``cache_dir``.
    """
    base = os.path.expanduser(os.path.join("~", ".keras"))
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return pathlib.Path(base)


_HASHES: Dict[tuple, bool] = {}


def _hash_matches(path: pathlib.Path, expected: str) -> bool:
    # Checked once per file version per process (a run may check twice: runner and experiment).
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns, expected)
    if memo not in _HASHES:
        digest = hashlib.sha256() if len(expected) == 64 else hashlib.md5()  # noqa: S324
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[memo] = digest.hexdigest() == expected.lower()
    return _HASHES[memo]


def _kaggle_slug(origin: str) -> str:
    return origin[len("kaggle://") :] if origin.startswith("kaggle://") else origin


def _kaggle_handle(origin: str):
    from kagglehub.handle import parse_model_handle

    return parse_model_handle(_kaggle_slug(origin))


# ---------------------------------------------------------------------------------------------
# What each builder loads (used by Experiment.pretrained_weights)


def _wants(weights: Optional[str], key: str, what: str, allow_path: bool = False) -> bool:
    """True for ``"imagenet"``, False for ``None`` (and for a local file where one is allowed)."""
    if weights is None:
        return False
    if weights == IMAGENET:
        return True
    if allow_path and os.path.isfile(str(weights)):
        return False  # a local file: nothing to download (the builder checks its contents)
    expected = (
        "None, 'imagenet' or the path of a weights file" if allow_path else "None or 'imagenet'"
    )
    raise ValueError(f"{key}={weights!r} ({what}): expected {expected}")


def keras_application(
    constructor: str,
    weights: Optional[str],
    *,
    key: str = WEIGHTS_OPTION,
    network: Optional[str] = None,
    library: str = KERAS_APPLICATIONS,
) -> List[WeightFile]:
    """The no-top ImageNet file of ``keras.applications.<constructor>`` (``[]`` for ``None``).

    Example: ``keras_application("ResNet50", "imagenet", key="method.pretrained_weights")``.
    """
    if constructor not in _APPLICATIONS_NOTOP:
        raise ValueError(
            f"{key}: drkeras.weights does not know the ImageNet file of keras.applications."
            f"{constructor}; known: {sorted(_APPLICATIONS_NOTOP)}"
        )
    if not _wants(weights, key, constructor):
        return []
    fname, origin, file_hash = _APPLICATIONS_NOTOP[constructor]
    return [WeightFile(network or constructor, library, fname, origin, key, file_hash)]


def image_classifier(
    name: str,
    weights: Optional[str],
    *,
    key: str = WEIGHTS_OPTION,
    network: Optional[str] = None,
    library: str = IMAGE_CLASSIFIERS,
) -> List[WeightFile]:
    """The no-top ImageNet file of image-classifiers' ``name`` (``resnet34``, ``resnext101``, ...),
    from the library's own table of weight files (``classification_models.weights``)."""
    from classification_models import weights as ic_weights

    found = ic_weights._find_weights(name, IMAGENET, False)
    if not found:
        raise ValueError(f"{key}: image-classifiers has no ImageNet no-top weights for {name!r}")
    if not _wants(weights, key, name):
        return []
    entry = found[0]
    return [WeightFile(network or name, library, entry["name"], entry["url"], key, entry["md5"])]


def vgg16_encoder(
    weights: Optional[str], *, key: str = WEIGHTS_OPTION, network: str = "VGG16-UNet"
) -> List[WeightFile]:
    """The file of our VGG16 encoder (:func:`drkeras.models.blocks.vgg16_weights_file`): the
    keras.applications VGG16 no-top file for ``"imagenet"``; nothing for ``None`` or a path."""
    if not _wants(weights, key, network, allow_path=True):
        return []
    return keras_application("VGG16", IMAGENET, key=key, network=network)


def grader(name: str, weights: Optional[str], *, key: str = WEIGHTS_OPTION) -> List[WeightFile]:
    """The file of :func:`drkeras.models.baselines.build_grader` ``(name, encoder_weights=...)``."""
    if name not in _GRADER_SOURCES:
        raise ValueError(f"{key}: unknown grader {name!r}; known: {sorted(_GRADER_SOURCES)}")
    library, source = _GRADER_SOURCES[name]
    network = f"{name} grader"
    if library == KERAS_APPLICATIONS:
        return keras_application(source, weights, key=key, network=network)
    return image_classifier(source, weights, key=key, network=network)


def reference_grader(
    name: str, weights: Optional[str], *, key: str = WEIGHTS_OPTION
) -> List[WeightFile]:
    """The file of :func:`drkeras.models.cooperative.build_reference_grader`."""
    from drkeras.models.cooperative import REFERENCE_GRADERS

    if name not in REFERENCE_GRADERS:
        raise ValueError(f"{key}: unknown grader {name!r}; known: {sorted(REFERENCE_GRADERS)}")
    constructor = REFERENCE_GRADERS[name][0]
    return keras_application(constructor, weights, key=key, network=f"{name} grader")


def segmenter(
    name: str,
    backbone: str,
    weights: Optional[str],
    *,
    key: str = WEIGHTS_OPTION,
    width: float = 1.0,
) -> List[WeightFile]:
    """The files of :func:`drkeras.models.baselines.build_segmenter` ``(name, backbone=...)``.

    UNet / LinkNet / FPN: segmentation-models' encoder (VGG through keras_applications, ResNet,
    ResNeXt, SE-ResNet through image-classifiers). DeepLabv3+: keras-cv's ``resnet50_v2_imagenet``
    preset (its ``config.json`` and weights); like the builder, ImageNet weights need
    ``backbone=resnet50_v2`` and ``width=1.0``.
    """
    network = f"{name} encoder {backbone}"
    if name == "deeplabv3plus":
        if not _wants(weights, key, network):
            return []
        if backbone != _DEEPLAB_PRESET_BACKBONE or width != 1.0:
            raise ValueError(
                f"{key}={weights!r}: DeepLabv3+ has ImageNet weights for backbone "
                f"{_DEEPLAB_PRESET_BACKBONE!r} at width 1.0 only (got {backbone!r}, width "
                f"{width}); set {key}=none or change the backbone"
            )
        return _keras_cv_preset(_DEEPLAB_PRESET, network, key)
    if backbone in _SM_APPLICATIONS:
        return keras_application(
            _SM_APPLICATIONS[backbone],
            weights,
            key=key,
            network=network,
            library=SEGMENTATION_MODELS,
        )
    try:
        return image_classifier(
            backbone, weights, key=key, network=network, library=SEGMENTATION_MODELS
        )
    except ValueError:
        raise ValueError(
            f"{key}: drkeras.weights does not know the ImageNet file of the segmentation-models "
            f"backbone {backbone!r} ({name}); known: {sorted(_SM_APPLICATIONS)} and "
            "image-classifiers' ResNet/ResNeXt/SE-ResNet names"
        ) from None


def _keras_cv_preset(preset: str, network: str, key: str) -> List[WeightFile]:
    from keras_cv.src.models.backbones.resnet_v2.resnet_v2_backbone_presets import (
        backbone_presets_with_weights,
    )

    handle = backbone_presets_with_weights[preset]["kaggle_handle"]
    config = WeightFile(network, KERAS_CV, "config.json", handle, key, store=KAGGLE_STORE)
    weights_name = _KERAS_CV_WEIGHTS
    if config.present:
        weights_name = json.loads(config.path.read_text()).get("weights")
    files = [config]
    if weights_name:
        files.append(WeightFile(network, KERAS_CV, weights_name, handle, key, store=KAGGLE_STORE))
    return files


def _join(a: str, b: str) -> str:
    parts = a.split(", ")
    return a if b in parts else f"{a}, {b}"


def collect(*groups: Iterable[WeightFile]) -> List[WeightFile]:
    """One list of the files of ``groups``, one row per (file, key), the networks that share a
    file joined (``"UNet encoder vgg16, VGG16-UNet"``), in first-seen order."""
    rows: Dict[tuple, WeightFile] = {}
    for group in groups:
        for f in group:
            ident = (f.location, f.key)
            if ident in rows:
                old = rows[ident]
                f = dataclasses.replace(
                    old,
                    network=_join(old.network, f.network),
                    library=_join(old.library, f.library),
                )
            rows[ident] = f
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Before a run


class MissingWeights(PretrainedWeightsUnavailable):
    """Pretrained files are neither cached nor downloadable (offline).

    Attributes:
        files: every missing :class:`WeightFile`.
        errors: ``fname -> download error`` for each of them.
        option: the key of the first missing file (``PretrainedWeightsUnavailable``'s contract).
    """

    def __init__(self, message: str, files: Sequence[WeightFile], errors: Dict[str, str]):
        super().__init__(message, files[0].key)
        self.files = list(files)
        self.errors = dict(errors)


def prepare_command(
    experiment_name: str, preset: Optional[str], overrides: Sequence[str] = ()
) -> str:
    """The command that downloads the files of a run (``python -m drkeras.weights ...``)."""
    parts = ["python -m drkeras.weights", f"--experiment {experiment_name}"]
    parts.append(f"--preset {preset or '<the preset of the run>'}")
    parts += [f"--set {item}" for item in overrides]
    return " ".join(parts)


def _guess_preset(experiment, files: Sequence[WeightFile]) -> Optional[str]:
    wanted = {(f.location, f.key) for f in files}
    for name, config in getattr(experiment, "presets", {}).items():
        try:
            listed = {(f.location, f.key) for f in experiment.pretrained_weights(config)}
        except ValueError:
            continue
        if wanted <= listed:
            return name
    return None


def ensure_files(
    files: Sequence[WeightFile],
    *,
    experiment,
    preset: Optional[str] = None,
    overrides: Sequence[str] = (),
    log=None,
) -> List[WeightFile]:
    """Download the files of ``files`` that are not cached; see :func:`ensure_available`."""
    missing, errors = [], {}
    for f in collect(files):
        if f.status() == "present":
            continue
        if log:
            log(f"downloading {f.fname} ({f.network}) from {f.origin}")
        try:
            f.download()
        except Exception as err:  # offline: URL errors, OSError, kagglehub's errors ...
            errors[f.location] = f"{type(err).__name__}: {err}"
        if f.status() != "present":
            errors.setdefault(f.location, f"still {f.status()} after downloading")
            missing.append(f)
    if missing:
        name = getattr(experiment, "name", str(experiment))
        preset = preset or _guess_preset(experiment, missing)
        lines = [
            f"{len(missing)} pretrained weight file(s) of {name} are not in the cache and could "
            "not be downloaded (no network?):"
        ]
        for f in missing:
            lines.append(
                f"  - {f.fname} ({f.network}; {f.library}; asked for by {f.key}) from {f.origin} "
                f"into {f.path}: {errors[f.location]}"
            )
        keys = sorted({f.key for f in missing})
        lines.append(
            "Prepare them on a machine with a network whose caches this one reads (same home "
            f"directory): {prepare_command(name, preset, overrides)} (or copy the files to the "
            "paths above)"
        )
        lines.append(
            "or build these networks from random weights instead (their results then do not "
            "reproduce the pretrained rows): " + " ".join(f"--set {k}=none" for k in keys)
        )
        raise MissingWeights(
            "\n".join(lines), missing, {f.fname: errors[f.location] for f in missing}
        )
    return collect(files)


def ensure_available(
    experiment,
    config,
    *,
    preset: Optional[str] = None,
    overrides: Sequence[str] = (),
    log=None,
) -> List[WeightFile]:
    """Make sure every pretrained file of ``experiment`` under ``config`` is cached.

    Downloads the missing ones into the libraries' caches; run it before the first stage, so
    an offline node stops at once rather than hours in.

    Args:
        experiment: an :class:`drkeras.experiment.Experiment` (its ``pretrained_weights``).
        config: the resolved config of the run.
        preset, overrides: the run's ``--preset`` and ``--set`` values, repeated in the command
            of the error message (the preset is guessed from the files when not given).
        log: a function receiving one line per download (e.g. ``logging.info``).

    Returns:
        The files, all present.

    Raises:
        MissingWeights: files that could not be downloaded; the message lists ALL of them, the
            ``python -m drkeras.weights`` command that prepares them and ``--set KEY=none``.

    Example: ``ensure_available(PLDMLT(), config, preset="paper")``.
    """
    options = dict(experiment=experiment, preset=preset, overrides=overrides, log=log)
    files = ensure_files(experiment.pretrained_weights(config), **options)
    # A keras-cv preset names its weights file in its config.json: listed again once cached.
    again = collect(experiment.pretrained_weights(config))
    if {f.location for f in again} != {f.location for f in files}:
        files = ensure_files(again, **options)
    return files


def random_weight_overrides(experiment, config) -> List[str]:
    """The ``KEY=none`` overrides that replace every pretrained file of ``config`` by random
    initialisation (apply them with :func:`drkeras.config.apply_overrides`).

    Example: ``random_weight_overrides(PLDMLT(), paper)  # ['model.encoder_weights=none']``.
    """
    return [f"{key}=none" for key in sorted({f.key for f in experiment.pretrained_weights(config)})]


def random_weights_warning(files: Sequence[WeightFile]) -> str:
    """The line a run logs when ``--random-weights`` replaced ``files`` by random weights."""
    files = collect(files)
    if not files:
        return "--random-weights: this run loads no pretrained weights; nothing was replaced"
    networks: List[str] = []
    for f in files:
        for name in f.network.split(", "):
            if name not in networks:
                networks.append(name)
    keys = sorted({f.key for f in files})
    return (
        f"RANDOM WEIGHTS: {len(networks)} network(s) start from RANDOM initialisation instead of "
        f"their pretrained (ImageNet) weights: {', '.join(networks)} "
        f"({', '.join(f'{k}=none' for k in keys)}). Their results do not reproduce the paper's "
        "pretrained rows."
    )


# ---------------------------------------------------------------------------------------------
# Command line


def weights_table(files: Sequence[WeightFile]) -> str:
    """A readable table of ``files``: status, network, library, key and file, then where each
    comes from and where it is cached."""
    if not files:
        return "no pretrained weight files (every network starts from random weights)"
    head = ("status", "network", "library", "config key", "file")
    rows = [(f.status(), f.network, f.library, f.key, f.fname) for f in files]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("")
    for f in files:
        out.append(f"{f.fname}\n    from  {f.origin}\n    cache {f.path}")
    missing = sum(1 for r in rows if r[0] != "present")
    out.append("")
    out.append(f"{len(files) - missing} of {len(files)} file(s) present, {missing} missing")
    return "\n".join(out)


def _import_experiments() -> None:
    try:
        import experiments  # noqa: F401
    except ImportError:
        # drkeras installed outside the repository: experiments/ lies beside the package.
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def build_parser(names: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.weights",
        description="List the pretrained weight files an experiment's preset needs and download "
        "the missing ones into the libraries' caches (run it where there is a network, e.g. on "
        "a login node, before training on offline compute nodes).",
    )
    parser.add_argument("--experiment", required=True, choices=names)
    parser.add_argument("--preset", default="paper", help="preset (default: paper)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value as the run will (e.g. --set method.nasnet=nasnet_mobile)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only report; exit 1 when a file is missing (nothing is downloaded)",
    )
    drkeras.startup.add_verbose_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; exit code 0 when every file is present, 1 when some are
    missing (``--check``) or could not be downloaded, 2 on bad arguments."""
    from drkeras.config import ConfigError, resolve_preset
    from drkeras.experiment import EXPERIMENTS, load_experiment

    _import_experiments()
    parser = build_parser(sorted(EXPERIMENTS))
    args = parser.parse_args(argv)
    experiment = load_experiment(args.experiment)
    try:
        config = resolve_preset(experiment.presets, args.preset, args.overrides)
        files = collect(experiment.pretrained_weights(config))
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    print(f"pretrained weights of {experiment.name}, preset {args.preset}:")
    print(f"(Keras cache {keras_cache_dir() / 'models'})")
    keras_home = os.environ.get("KERAS_HOME")
    if keras_home and pathlib.Path(keras_home).resolve() != keras_cache_dir().resolve():
        print(
            f"note: KERAS_HOME={keras_home} is not where Keras 2.15 caches downloads; it reads "
            f"{keras_cache_dir()} (from HOME): set HOME to move the cache"
        )
    if not args.check:
        try:
            files = ensure_available(
                experiment,
                config,
                preset=args.preset,
                overrides=args.overrides,
                log=lambda text: print(text, flush=True),
            )
        except MissingWeights as err:
            print(weights_table(collect(experiment.pretrained_weights(config))))
            print(f"\nerror: {err}", file=sys.stderr)
            return 1
    print(weights_table(files))
    if any(f.status() != "present" for f in files):
        print(
            f"\nto download them: {prepare_command(experiment.name, args.preset, args.overrides)}"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
