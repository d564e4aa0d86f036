"""Experiment configuration: frozen dataclasses, named presets, ``--set a.b=value`` overrides.

A run is fully described by one :class:`Config`. Each ``experiments/<paper>.py`` declares its
presets (at least ``smoke``: tiny, minutes on a laptop CPU; and ``paper``: the paper's own sizes,
epochs, learning rates and batch sizes) as ``Config`` values, and the runner resolves
``--preset NAME --set key=value ...`` into the config of the run, which it saves as
``config.json`` in the run directory.

Overrides are checked: the key must exist (the error lists the keys that do) and the value must
parse as the field's type (``bool``: true/false/1/0/yes/no; ``int``; ``float``; ``str``;
``Optional[...]``: ``none``/``null``; tuples: comma-separated). ``optimizers`` is a mapping from
optimizer name (``model``, ``label``, ``generator``, ...) to :class:`OptimizerConfig`;
``method`` holds the paper-specific hyper-parameters as the experiment's own frozen dataclass.

Example::

    >>> cfg = Config(method=None)
    >>> cfg = apply_overrides(cfg, ["train.epochs=3", "data.image_size=64"])
    >>> cfg.train.epochs, cfg.data.image_size
    (3, 64)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
import typing
from typing import Any, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributeConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TrainConfig",
    "MINI_CHANGE_KINDS",
    "PUBLISHED_IDRID_S",
    "PresetChange",
    "RANDOM_WEIGHTS",
    "apply_overrides",
    "config_to_dict",
    "derive_preset",
    "preset_differences",
    "resolve_preset",
    "save_config",
]


class ConfigError(ValueError):
    """A preset name, override key or override value that does not fit the config."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how examples become model inputs.

    Attributes:
        source: ``"synthetic"`` (procedural fundus images generated into the run directory and
            converted by the real converters) or a directory holding one converted dataset per
            sub-folder (``ROOT/idrid``, ``ROOT/ddr``, ...), as written by ``python -m data_prep``.
        image_size: side of the square network input, in pixels.
        normalization: a mode of ``drkeras.data.preprocess.normalize``.
        fov_crop: crop to the field of view before resizing.
        graham: apply Graham's local-average subtraction.
        augment: paired image+mask augmentation on training batches.
        batch_size: the GLOBAL batch size (split across replicas).
        synthetic_size: resolution of generated synthetic photographs.
        synthetic_scale: multiplies the default per-split image counts of synthetic layouts.
        synthetic_label_noise: rate of grader label noise in synthetic grades.
        max_examples: cap on examples per split read from records (0 = all); for quick runs.
        cache: where decoded examples are cached (:func:`drkeras.stages.cache_plan`):
            ``auto`` (in memory while the datasets alive together fit ``host_memory_gb``, else
            in files under ``<out>/cache``, else not at all), ``memory``, ``disk`` or ``none``.
        host_memory_gb: the in-memory cache budget of ``auto`` (0 = half the machine's RAM).
    """

    source: str = "synthetic"
    image_size: int = 64
    normalization: str = "unit"
    fov_crop: bool = True
    graham: bool = False
    augment: bool = True
    batch_size: int = 4
    synthetic_size: int = 128
    synthetic_scale: float = 1.0
    synthetic_label_noise: float = 0.0
    max_examples: int = 0
    cache: str = "auto"
    host_memory_gb: float = 0.0

    def __post_init__(self):
        if self.cache not in ("auto", "memory", "disk", "none"):
            raise ConfigError(
                f"data.cache: expected 'auto', 'memory', 'disk' or 'none', got {self.cache!r}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Network choices shared by the papers' builders.

    Attributes:
        encoder_weights: ``None`` (random) or ``"imagenet"`` (downloads through
            ``keras.applications``; needs a network).
        width: filter multiplier of the builders (1.0 = the paper's widths).
        num_grades: number of DR grades predicted.
        dropout: dropout rate of grading heads.
    """

    encoder_weights: Optional[str] = None
    width: float = 1.0
    num_grades: int = 5
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer and its learning-rate schedule.

    Attributes:
        name: ``adam``, ``sgd`` (``momentum``/``nesterov`` apply) or ``rmsprop``.
        learning_rate: initial learning rate.
        schedule: ``constant``, ``polynomial`` (to ``end_learning_rate`` over ``decay_steps``,
            ``power``) or ``linear_to_zero`` (constant for ``hold_steps`` then linear to zero at
            ``decay_steps``; the patch-GAN paper's schedule).
        clipnorm: gradient-norm clipping (0 = off).
    """

    name: str = "adam"
    learning_rate: float = 1e-4
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    momentum: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"
    decay_steps: int = 0
    hold_steps: int = 0
    end_learning_rate: float = 0.0
    power: float = 1.0
    clipnorm: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to train.

    Attributes:
        epochs: epochs of the main stage (experiments may scale it per stage; they document it).
        steps_per_epoch: steps per epoch (0 = one pass over the training split).
        runs: independent repetitions (seeds ``seed, seed+1, ...``) for mean ± std.
        folds: cross-validation folds (1 = the official split).
        mixed_precision: ``mixed_float16`` on GPUs, ``mixed_bfloat16`` on CPUs.
        jit_compile: compile train steps with XLA.
        deterministic: TensorFlow op determinism: ``auto`` (on for CPUs, where the tests and
            the resume guarantee rely on it; off on GPUs, with one log line, since TensorFlow
            2.15 has no deterministic GPU kernel for some ops the papers' networks use, e.g. the
            gradient of ``UpSampling2D``), ``true`` (on everywhere; on a GPU each stage's train
            step is checked before training and the run stops naming the op and layer that
            cannot be deterministic there) or ``false``.
        verbose: Keras progress output (1 = progress bar, 2 = one line per epoch, 0 = silent).
        checkpoint_steps: save a resumable checkpoint every this many steps of a stage, besides
            every epoch end (0 = epoch ends only); see ``RunContext.fit``.
        keep_checkpoints: ``final`` (a finished stage keeps its final weights only; its
            resumable checkpoints are deleted), ``all`` (every checkpoint is kept, with the
            optimizer states) or ``none`` (as ``final`` while the run goes on; when the whole
            run has completed, its checkpoints are deleted: results, figures and exports stay,
            and running the same command again trains again). Smoke presets use ``none``.
        accelerator: the accelerator the resource plan estimates time for (a key of
            :data:`drkeras.stages.ACCELERATORS`, e.g. ``a100-40gb``).
        accelerator_memory_gb: memory of one accelerator, checked by the plan before training
            (0 = the detected GPU's; without a GPU and at 0 the CPU trains in host memory and
            the plan checks host RAM).
        accelerators: number of accelerators the plan is written for (0 = this run's replicas).
    """

    epochs: int = 1
    steps_per_epoch: int = 0
    runs: int = 1
    folds: int = 1
    mixed_precision: bool = False
    jit_compile: bool = False
    deterministic: str = "auto"
    verbose: int = 1
    checkpoint_steps: int = 500
    keep_checkpoints: str = "final"
    accelerator: str = "a100-40gb"
    accelerator_memory_gb: float = 0.0
    accelerators: int = 0

    def __post_init__(self):
        if isinstance(self.deterministic, bool):  # TrainConfig(deterministic=False) in code
            object.__setattr__(self, "deterministic", str(self.deterministic).lower())
        if self.deterministic not in ("auto", "true", "false"):
            raise ConfigError(
                "train.deterministic: expected 'auto', 'true' or 'false', got "
                f"{self.deterministic!r}"
            )
        if self.keep_checkpoints not in ("final", "all", "none"):
            raise ConfigError(
                "train.keep_checkpoints: expected 'final', 'all' or 'none', got "
                f"{self.keep_checkpoints!r}"
            )
        from drkeras.stages import ACCELERATORS

        if self.accelerator not in ACCELERATORS:
            raise ConfigError(
                f"train.accelerator: expected one of {sorted(ACCELERATORS)}, got "
                f"{self.accelerator!r}"
            )


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """Device placement.

    Attributes:
        strategy: ``auto`` (MirroredStrategy when more than one GPU is visible, else one device),
            ``one_device``, ``mirrored`` or ``multi_worker`` (``TF_CONFIG`` describes the cluster).
        cpu_replicas: on a machine without GPUs, split the CPU into this many logical devices so
            ``mirrored`` has several replicas (for testing the distributed code paths).
    """

    strategy: str = "auto"
    cpu_replicas: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration of one run."""

    method: Any
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizers: Mapping[str, OptimizerConfig] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({"model": OptimizerConfig()})
    )
    train: TrainConfig = TrainConfig()
    distribute: DistributeConfig = DistributeConfig()
    seed: int = 0

    def __post_init__(self):
        # A read-only view, so a frozen Config cannot be changed through its optimizers mapping.
        object.__setattr__(self, "optimizers", types.MappingProxyType(dict(self.optimizers)))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(text, inner[0], key)
    if origin in (tuple, Tuple) or annotation is tuple:
        element = args[0] if args else str
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return tuple(_parse_value(p, element, key) for p in parts)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if annotation is str:
        return text
    if annotation is Any:
        return json.loads(text) if text[:1] in "[{0123456789-" else text
    raise ConfigError(f"{key}: cannot override a field of type {annotation!r}")


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _keys_of(node: Any, prefix: str = "") -> list:
    if dataclasses.is_dataclass(node):
        out = []
        for f in dataclasses.fields(node):
            out += _keys_of(getattr(node, f.name), f"{prefix}{f.name}.") or [prefix + f.name]
        return out
    if isinstance(node, Mapping):
        out = []
        for name, value in node.items():
            out += _keys_of(value, f"{prefix}{name}.") or [prefix + name]
        return out
    return []


def _set(node: Any, path: Sequence[str], text: str, full_key: str, root: Any) -> Any:
    head, rest = path[0], path[1:]
    if isinstance(node, Mapping):
        if head not in node:
            raise ConfigError(_unknown(full_key, root))
        value = node[head]
        if not rest:
            raise ConfigError(f"{full_key}: name a field of it, e.g. {full_key}.learning_rate")
        updated = dict(node)
        updated[head] = _set(value, rest, text, full_key, root)
        return types.MappingProxyType(updated)
    if not dataclasses.is_dataclass(node) or head not in {f.name for f in dataclasses.fields(node)}:
        raise ConfigError(_unknown(full_key, root))
    value = getattr(node, head)
    if rest:
        return dataclasses.replace(node, **{head: _set(value, rest, text, full_key, root)})
    if dataclasses.is_dataclass(value) or isinstance(value, Mapping):
        raise ConfigError(
            f"{full_key} is a section; set one of its fields, e.g. {full_key}.<field>"
        )
    annotation = _field_types(type(node))[head]
    return dataclasses.replace(node, **{head: _parse_value(text, annotation, full_key)})


def _unknown(key: str, root: Any) -> str:
    known = _keys_of(root)
    section = key.split(".")[0]
    near = [k for k in known if k.split(".")[0] == section] or known
    return f"unknown config key {key!r}; keys are: {', '.join(near)}"


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Return ``config`` with ``key=value`` overrides applied, in order.

    Args:
        config: the starting configuration (usually a preset).
        overrides: strings ``"section.field=value"``; nested keys use dots
            (``optimizers.model.learning_rate=1e-4``, ``method.beta=0.9``).

    Raises:
        ConfigError: naming the key, when it does not exist or the value does not parse.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        path = [p for p in key.split(".") if p]
        if not path:
            raise ConfigError(f"override {item!r} has an empty key")
        config = _set(config, path, text.strip(), key, config)
    return config


def resolve_preset(presets: Mapping[str, Config], name: str, overrides: Sequence[str] = ()):
    """Look up preset ``name`` and apply ``overrides``; a clear error for an unknown preset."""
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; this experiment has: {', '.join(presets)}")
    return apply_overrides(presets[name], overrides)


# What a ``mini`` preset may change from its experiment's ``paper`` preset, by kind: it keeps the
# paper's topology, losses, update rules, optimizers and batch sizes, and only scales the run
# down to a CPU. Each experiment's ``MINI_CHANGES`` names every changed key with its kind and why;
# ``tests/test_config.py`` checks that nothing else differs.
MINI_CHANGE_KINDS = {
    "width": "narrower networks: a filter multiplier, or the smaller member of the same family",
    "resolution": "smaller images, crops and patches",
    "steps": "fewer epochs, steps, runs or folds, or fewer images per epoch",
    "rate": "a learning rate (or its schedule) scaled to the far shorter training",
    "offline": "random initialisation instead of ImageNet files (none can be downloaded here)",
    "stand-in": "another dataset or split where the paper's has no synthetic layout",
    "data": "more synthetic images per split (the generator's lesions and grade rules unchanged)",
}


@dataclasses.dataclass(frozen=True)
class PresetChange:
    """One documented difference of a derived preset: ``kind`` (a key of
    :data:`MINI_CHANGE_KINDS`), the ``value`` as ``--set`` would write it, and ``why``."""

    kind: str
    value: str
    why: str

    def __post_init__(self):
        if self.kind not in MINI_CHANGE_KINDS:
            raise ConfigError(
                f"preset change kind {self.kind!r}: expected one of {sorted(MINI_CHANGE_KINDS)}"
            )


# Changes several mini presets make alike.
RANDOM_WEIGHTS = PresetChange(
    "offline", "none", "random initialisation: no ImageNet files can be downloaded here"
)
# ImageNet input scaling means nothing to random weights; the caffe one (0-255 less the mean
# pixel) made the He-normal VGG16 encoder's first grading logits ~100 (measured: MTUnet's
# multi-task loss 93 at its first epoch) and its segmentation collapsed to background.
SYMMETRIC_INPUTS = PresetChange(
    "offline",
    "symmetric",
    "inputs in [-1, 1]: without ImageNet weights there is no ImageNet "
    "scaling to match (caffe's 0-255 less the mean pixel blew up the first logits)",
)
PUBLISHED_IDRID_S = PresetChange(
    "data", "6.75", "the published IDRiD-S counts, 54 train / 27 test (default 8 / 4)"
)


def derive_preset(base: Config, changes: Mapping[str, PresetChange]) -> Config:
    """``base`` with every change applied (``{key: PresetChange}``), as ``--set`` would."""
    return apply_overrides(base, [f"{key}={change.value}" for key, change in changes.items()])


def _value_at(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def preset_differences(a: Config, b: Config) -> dict:
    """``{key: (value in a, value in b)}`` for every leaf key whose values differ (a key only
    one of them has, e.g. an optimizer of one preset only, maps to ``None`` on the other side)."""
    keys_a, keys_b = _keys_of(a), _keys_of(b)
    out = {}
    for key in keys_a + [k for k in keys_b if k not in keys_a]:
        va = _value_at(a, key) if key in keys_a else None
        vb = _value_at(b, key) if key in keys_b else None
        if va != vb:
            out[key] = (va, vb)
    return out


def config_to_dict(config: Any) -> Any:
    """A JSON-ready nested dict of ``config`` (dataclasses, mappings and tuples unfolded)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (tuple, list)):
        return [config_to_dict(v) for v in config]
    return config


def save_config(config: Config, path) -> pathlib.Path:
    """Write the resolved ``config`` as indented JSON to ``path`` and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=False) + "\n")
    return path
