"""Device strategies, mixed precision and determinism for every trainer and experiment.

The runner calls :func:`setup_devices` once, before any model is built, then builds models,
optimizers and metrics inside ``strategy.scope()``. Batch sizes in configs are GLOBAL: a
``MirroredStrategy`` with N replicas gives each replica ``batch_size / N`` examples, and custom
train steps reduce their losses over the global batch (``tf.nn.compute_average_loss``), so one
replica and N replicas compute the same update.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def split_cpu(n: int) -> None:
    """Split the first physical CPU into ``n`` logical devices (before TensorFlow initialises).

    Lets ``MirroredStrategy`` run with several replicas on a machine without GPUs, which is how
    the distributed code paths are tested here. A no-op for ``n <= 1`` or when the split exists.
    """
    if n <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"distribute.cpu_replicas={n} must be set before TensorFlow initialises its devices "
            f"(it already has {len(tf.config.list_logical_devices('CPU'))} CPU devices): {err}"
        ) from None


def make_strategy(name: str = "auto", *, cpu_replicas: int = 1) -> tf.distribute.Strategy:
    """Return the ``tf.distribute`` strategy named by ``distribute.strategy``.

    Args:
        name: ``auto`` (MirroredStrategy over all GPUs when there is more than one, else the
            default one-device strategy), ``one_device``, ``mirrored`` (all GPUs, or the logical
            CPUs when there is no GPU) or ``multi_worker`` (MultiWorkerMirroredStrategy; the
            cluster comes from the ``TF_CONFIG`` environment variable).
        cpu_replicas: logical CPU devices to create when no GPU is visible.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy multi_worker needs TF_CONFIG describing the cluster, e.g. "
                + json.dumps(
                    {
                        "cluster": {"worker": ["host1:2222", "host2:2222"]},
                        "task": {"type": "worker", "index": 0},
                    }
                )
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        split_cpu(cpu_replicas)
    if name == "one_device" or (name == "auto" and len(gpus) <= 1 and cpu_replicas <= 1):
        device = "/gpu:0" if gpus else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(cpus)


def set_precision(mixed: bool) -> str:
    """Set the global Keras dtype policy: ``mixed_float16`` on GPU, ``mixed_bfloat16`` on CPU.

    Returns the policy name. Models keep float32 outputs (builders give their last activations a
    float32 dtype), and custom train steps wrap their optimizers in ``LossScaleOptimizer`` when the
    policy is ``mixed_float16``.
    """
    if not mixed:
        policy = "float32"
    elif tf.config.list_physical_devices("GPU"):
        policy = "mixed_float16"
    else:
        policy = "mixed_bfloat16"
    tf.keras.mixed_precision.set_global_policy(policy)
    return policy


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TensorFlow ops deterministic."""
    tf.keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
