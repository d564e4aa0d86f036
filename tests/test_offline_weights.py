"""Offline pretrained weights: each experiment's error names a config key that ``--set`` accepts
and that the experiment reads, and ``--set <key>=none`` then builds without any download.

Offline is simulated: every Keras download (``get_file``) raises as Keras does without a network
(tests never download). The runner checks every experiment's weights before any data or training
(:func:`drkeras.weights.ensure_available`); SSL-GAN and collaborative run through ``main`` here
(collaborative refuses pretrained weights at once). With the key at ``none`` they proceed to the
data, which a ``--data`` folder without records stops with its own error. For PLDMLT, MTUnet and
cooperative the builder they call is run with the value their preset's key holds.
"""

import pytest
import tensorflow as tf

from drkeras.config import ConfigError, resolve_preset
from drkeras.experiment import main
from drkeras.models import blocks
from drkeras.models.baselines import build_grader
from drkeras.models.cooperative import build_reference_grader
from drkeras.models.mtunet import build_vgg16_unet
from drkeras.weights import MissingWeights, ensure_available
from experiments.collaborative import Collaborative
from experiments.cooperative import JointSegExperiment
from experiments.mtunet import MTUnetExperiment
from experiments.pldmlt import PLDMLT
from experiments.ssl_gan import (
    PRETRAINED_WEIGHTS,
    RESNET34_WEIGHTS,
    SSLGAN,
)


@pytest.fixture
def offline(monkeypatch):
    """Every Keras download fails as it does offline; returns the URLs that were requested."""
    import keras.src.utils.data_utils as data_utils

    requested = []

    def get_file(fname=None, origin=None, *args, **kwargs):
        requested.append(origin or fname)
        raise Exception(f"URL fetch failure on {origin}: None -- offline (test)")

    monkeypatch.setattr(data_utils, "get_file", get_file)
    monkeypatch.setattr(tf.keras.utils, "get_file", get_file)
    return requested


def _key_works(experiment, key):
    """``--set key=none`` is accepted by every preset of ``experiment`` and reads back None."""
    for preset in experiment.presets:
        config = resolve_preset(experiment.presets, preset, [f"{key}=none"])
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        assert node is None, (preset, key)


def _names_key(err, key):
    assert err.option == key
    assert f"--set {key}=none" in str(err)


def _argv(tmp_path, *sets):
    (tmp_path / "empty").mkdir(exist_ok=True)
    argv = ["--preset", "smoke", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]
    for item in sets:
        argv += ["--set", item]
    return argv


@pytest.mark.parametrize("key", [PRETRAINED_WEIGHTS, RESNET34_WEIGHTS])
def test_ssl_gan_offline_error_names_the_method_key_it_reads(tmp_path, offline, capsys, key):
    # The run stops before any stage (exit code 2) with drkeras.weights' message.
    assert main(SSLGAN(), _argv(tmp_path, f"{key}=imagenet")) == 2
    assert offline, "the weights were not requested"
    error = capsys.readouterr().err.split("error: ", 1)[1]
    assert f"--set {key}=none" in error
    assert "model.encoder_weights" not in error
    # The error itself (the shared mechanism the runner calls before the first stage).
    offline.clear()
    config = resolve_preset(SSLGAN.presets, "smoke", [f"{key}=imagenet"])
    with pytest.raises(blocks.PretrainedWeightsUnavailable) as err:
        ensure_available(SSLGAN(), config)
    _names_key(err.value, key)
    assert isinstance(err.value, MissingWeights)
    assert [f.key for f in err.value.files] == [key]
    assert offline == [err.value.files[0].origin]
    _key_works(SSLGAN, key)
    # With the key at none nothing is downloaded and the run goes on to read its data.
    offline.clear()
    with pytest.raises(FileNotFoundError, match="no converted idrid records"):
        main(SSLGAN(), _argv(tmp_path, f"{key}=none", "train.keep_checkpoints=none"))
    assert not offline


def test_ssl_gan_refuses_model_encoder_weights_it_does_not_read(tmp_path, offline):
    with pytest.raises(ValueError, match=f"{PRETRAINED_WEIGHTS}.*{RESNET34_WEIGHTS}"):
        main(SSLGAN(), _argv(tmp_path, "model.encoder_weights=imagenet"))
    assert not offline


def test_collaborative_has_no_pretrained_weights_and_says_which_key(tmp_path, offline):
    with pytest.raises(ValueError, match="set model.encoder_weights=none"):
        main(Collaborative(), _argv(tmp_path, "model.encoder_weights=imagenet"))
    _key_works(Collaborative, "model.encoder_weights")
    with pytest.raises(FileNotFoundError, match="no converted"):
        main(Collaborative(), _argv(tmp_path, "model.encoder_weights=none"))
    assert not offline


@pytest.mark.parametrize(
    "experiment, build",
    [
        # stage 1 of PLDMLT: a ResNeXt pseudo grader (image-classifiers weights; ResNeXt-50 is
        # built with ResNeXt-101's code path in a fraction of its time)
        (
            PLDMLT,
            lambda weights: build_grader(
                "resnext50", input_shape=(32, 32, 3), encoder_weights=weights
            ),
        ),
        # MTUnet's VGG16 encoder (the first network it builds)
        (
            MTUnetExperiment,
            lambda weights: build_vgg16_unet(
                input_shape=(32, 32, 3), num_seg_classes=2, encoder_weights=weights
            ),
        ),
        # the VGG-19 row of the cooperative paper's Tables III-IV
        (
            JointSegExperiment,
            lambda weights: build_reference_grader(
                "vgg19", input_shape=(32, 32, 3), encoder_weights=weights
            ),
        ),
    ],
    ids=["pldmlt", "mtunet", "cooperative"],
)
def test_model_encoder_weights_experiments_name_the_key_they_read(offline, experiment, build):
    key = "model.encoder_weights"
    with pytest.raises(blocks.PretrainedWeightsUnavailable) as err:
        build("imagenet")
    assert offline
    _names_key(err.value, key)
    _key_works(experiment, key)
    offline.clear()
    paper = resolve_preset(experiment.presets, "paper", [f"{key}=none"])
    assert build(paper.model.encoder_weights) is not None
    assert not offline


def test_a_key_named_in_an_error_is_one_set_accepts():
    # The guard is given the key; an unknown key would be refused by --set, as here.
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve_preset(SSLGAN.presets, "smoke", ["method.encoder_weights=none"])
