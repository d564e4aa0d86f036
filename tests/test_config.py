"""Config presets and ``--set`` overrides: good values land, bad ones fail with clear messages."""

import dataclasses
import json

import pytest

from drkeras.config import (
    Config,
    ConfigError,
    OptimizerConfig,
    PresetChange,
    apply_overrides,
    config_to_dict,
    derive_preset,
    preset_differences,
    resolve_preset,
    save_config,
)


@dataclasses.dataclass(frozen=True)
class Method:
    beta: float = 0.8
    lesions: tuple = ("MA", "HE")
    label_update: bool = True


BASE = Config(
    method=Method(),
    optimizers={"model": OptimizerConfig(learning_rate=5e-5), "label": OptimizerConfig()},
)


def test_overrides_of_every_kind_land_with_their_types():
    cfg = apply_overrides(
        BASE,
        [
            "train.epochs=7",
            "data.image_size=96",
            "data.augment=false",
            "optimizers.model.learning_rate=1e-3",
            "method.beta=0.95",
            "method.lesions=EX, SE",
            "method.label_update=no",
            "model.encoder_weights=none",
            "model.encoder_weights=imagenet",
            "seed=3",
        ],
    )
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.data.image_size == 96
    assert cfg.data.augment is False
    assert cfg.optimizers["model"].learning_rate == pytest.approx(1e-3)
    assert cfg.optimizers["label"] == OptimizerConfig()
    assert cfg.method == Method(beta=0.95, lesions=("EX", "SE"), label_update=False)
    assert cfg.model.encoder_weights == "imagenet"
    assert cfg.seed == 3
    # The preset itself is untouched (frozen values, new objects).
    assert BASE.train.epochs == 1 and BASE.method.beta == 0.8
    assert BASE.optimizers["model"].learning_rate == pytest.approx(5e-5)


def test_later_override_wins_and_none_is_parsed():
    cfg = apply_overrides(BASE, ["train.epochs=2", "train.epochs=4", "model.encoder_weights=null"])
    assert cfg.train.epochs == 4
    assert cfg.model.encoder_weights is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; keys are: train.epochs,"),
        ("trian.epochs=3", "unknown config key 'trian.epochs'"),
        ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
        ("data.augment=maybe", "data.augment: expected a boolean (true/false), got 'maybe'"),
        ("optimizers.model.learning_rate=fast", "expected a number, got 'fast'"),
        (
            "optimizers.critic.learning_rate=1",
            "unknown config key 'optimizers.critic.learning_rate'",
        ),
        ("train=3", "train is a section"),
        ("train.epochs", "is not of the form key=value"),
        ("=3", "has an empty key"),
    ],
)
def test_bad_overrides_name_the_key_and_what_was_expected(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(BASE, [override])
    assert message in str(err.value)


def test_unknown_key_lists_the_keys_of_its_section():
    with pytest.raises(ConfigError) as err:
        apply_overrides(BASE, ["method.gamma=2"])
    assert "method.beta, method.lesions, method.label_update" in str(err.value)


def test_config_is_frozen_including_its_optimizers():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASE.seed = 1
    with pytest.raises(TypeError):
        BASE.optimizers["model"] = OptimizerConfig()


def test_resolve_preset_and_unknown_preset():
    presets = {"smoke": BASE, "paper": apply_overrides(BASE, ["train.epochs=100"])}
    assert resolve_preset(presets, "paper", ["seed=2"]).train.epochs == 100
    with pytest.raises(
        ConfigError, match="unknown preset 'full'; this experiment has: smoke, paper"
    ):
        resolve_preset(presets, "full")


def test_saved_config_is_the_resolved_one(tmp_path):
    cfg = apply_overrides(BASE, ["method.beta=0.5", "data.batch_size=8"])
    path = save_config(cfg, tmp_path / "run" / "config.json")
    saved = json.loads(path.read_text())
    assert saved == config_to_dict(cfg)
    assert saved["method"] == {"beta": 0.5, "lesions": ["MA", "HE"], "label_update": True}
    assert saved["data"]["batch_size"] == 8
    assert saved["optimizers"]["model"]["learning_rate"] == 5e-5
    assert list(saved) == ["method", "data", "model", "optimizers", "train", "distribute", "seed"]


def test_preset_differences_and_derived_presets():
    changes = {
        "data.image_size": PresetChange("resolution", "32", "smaller"),
        "optimizers.label.learning_rate": PresetChange("rate", "0.01", "shorter"),
        "method.lesions": PresetChange("stand-in", "MA", "one lesion"),
    }
    derived = derive_preset(BASE, changes)
    assert preset_differences(BASE, derived) == {
        "data.image_size": (64, 32),
        "optimizers.label.learning_rate": (1e-4, 0.01),
        "method.lesions": (("MA", "HE"), ("MA",)),
    }
    assert preset_differences(derived, derived) == {}
    only_model = dataclasses.replace(BASE, optimizers={"model": BASE.optimizers["model"]})
    assert preset_differences(only_model, BASE)["optimizers.label.name"] == (None, "adam")
    with pytest.raises(ConfigError, match="preset change kind 'speed'"):
        PresetChange("speed", "1", "faster")


@pytest.mark.parametrize("paper", ["mtunet", "pldmlt", "collaborative", "ssl_gan", "cooperative"])
def test_mini_preset_differs_from_paper_only_in_its_documented_keys(paper):
    import importlib

    module = importlib.import_module(f"experiments.{paper}")
    experiment = next(
        v
        for v in vars(module).values()
        if isinstance(v, type)
        and getattr(v, "presets", None) is not None
        and v.__module__ == module.__name__
    )
    presets = experiment.presets
    assert list(presets) == ["smoke", "mini", "paper"]
    mini = resolve_preset(presets, "mini")
    differences = preset_differences(presets["paper"], mini)
    # every documented change takes effect and nothing undocumented differs
    assert sorted(differences) == sorted(module.MINI_CHANGES)
    for key, change in module.MINI_CHANGES.items():
        assert change.why.strip(), key
        assert apply_overrides(presets["paper"], [f"{key}={change.value}"]) != presets["paper"]
    # the mini preset never changes the losses, the batch sizes or the optimizer kinds
    kinds = {change.kind for change in module.MINI_CHANGES.values()}
    assert kinds <= {"width", "resolution", "steps", "rate", "offline", "stand-in", "data"}
    assert not any(key.startswith("data.batch_size") for key in differences)
    assert not any(key.endswith((".name", ".beta_1", ".beta_2")) for key in differences)
