"""Device strategies, mixed precision and determinism for every trainer and experiment.

The runner (:func:`drkeras.experiment.main`) calls :func:`make_strategy` before anything else
touches TensorFlow, then :func:`seed_everything` and :func:`set_precision`; experiments build
models, optimizers and metrics inside ``strategy.scope()`` (:func:`check_built_in_scope` rejects
a model or optimizer built outside it, which would otherwise train silently on one device).

Contract of every custom ``train_step`` (docs/design.md section 4):

- Batch sizes in configs are GLOBAL: with N replicas each one gets ``batch_size / N`` examples.
- Losses that make gradients are reduced over the global batch
  (``tf.nn.compute_average_loss(per_example, global_batch_size=...)``), so one replica and N
  replicas compute the same update; logged values are plain means (Keras ``Mean`` trackers of
  the per-example losses), never loss-scaled.
- Randomness inside a step (GAN noise) comes from a ``tf.random.Generator`` created in the
  strategy scope and stored on the trainer: each replica then draws its own stream, and the
  generator's state is part of the stage checkpoints (:mod:`drkeras.training.checkpoint`).
- Under ``mixed_float16`` every optimizer is a ``LossScaleOptimizer``
  (:func:`loss_scale_optimizer`), losses are scaled before differentiation and gradients
  unscaled after (:func:`scale_loss`, :func:`unscale_gradients`); ``apply_gradients`` then skips
  steps with overflowing gradients and adapts the scale.

Multi-worker training (``--strategy multi_worker``) reads the cluster from ``TF_CONFIG``; every
worker runs the same command, :func:`worker_role` tells the chief (which owns the run
directory) from the other workers (which write to ``<run>/workers/<type>_<index>``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

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
    """Set the global Keras dtype policy: ``mixed_float16`` on GPU, ``mixed_bfloat16`` on CPU,
    or (``mixed=False``) the default policy of ``keras.backend.floatx()``.

    Returns the policy name. Models keep float32 outputs (builders give their last activations a
    float32 dtype), and custom train steps wrap their optimizers in ``LossScaleOptimizer`` when the
    policy is ``mixed_float16``.
    """
    if not mixed:
        # The default policy (follows keras.backend.floatx()), not an explicit float32 one.
        tf.keras.mixed_precision.set_global_policy(None)
        return tf.keras.mixed_precision.global_policy().name
    policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    tf.keras.mixed_precision.set_global_policy(policy)
    return policy


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TensorFlow ops deterministic."""
    tf.keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's place in a (multi-worker) run.

    Attributes:
        is_chief: the process that owns the run directory (always True without a cluster).
        task_type: ``chief``/``worker`` from ``TF_CONFIG`` (``chief`` without a cluster).
        task_id: the index of this task within its type.
        num_workers: processes taking part in training.
    """

    is_chief: bool = True
    task_type: str = "chief"
    task_id: int = 0
    num_workers: int = 1


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole:
    """The :class:`WorkerRole` of this process under ``strategy``.

    The chief is the ``chief`` task when ``TF_CONFIG`` has one, else ``worker`` 0 (the
    convention of ``MultiWorkerMirroredStrategy``).

    Example::

        role = worker_role(make_strategy("multi_worker"))
        out_dir = run_dir if role.is_chief else run_dir / "workers" / f"worker_{role.task_id}"
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return WorkerRole()
    cluster = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type or "worker", int(resolver.task_id or 0)
    is_chief = task_type == "chief" or (
        task_type == "worker" and task_id == 0 and "chief" not in cluster
    )
    workers = sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))
    return WorkerRole(is_chief, task_type, task_id, max(workers, 1))


def check_built_in_scope(model: tf.keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Raise a clear error when ``model`` or one of its optimizers was built outside ``strategy``.

    Keras would otherwise train such a model with the default (one-device) strategy, silently
    ignoring ``--strategy``.
    """
    from drkeras.training.checkpoint import optimizers_of

    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return
    owners = [(f"model {model.name!r}", getattr(model, "_distribution_strategy", None))]
    for name, optimizer in optimizers_of(model).items():
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        if isinstance(inner, tf.keras.optimizers.Optimizer):
            owners.append((f"optimizer {name!r}", getattr(inner, "_distribution_strategy", None)))
    outside = [what for what, owner in owners if owner is not strategy]
    if outside:
        raise ValueError(
            f"{', '.join(outside)} of {model.name!r} were not built inside the run's strategy "
            f"scope ({type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s)); "
            "build models, optimizers and metrics under `with ctx.strategy.scope():`"
        )


def loss_scale_optimizer(optimizer, policy: Optional[str] = None):
    """``optimizer`` wrapped in a ``LossScaleOptimizer`` when the policy is ``mixed_float16``.

    Args:
        optimizer: a Keras optimizer (returned unchanged when already loss-scaled).
        policy: a dtype policy or its name (default: the global policy).

    Example::

        opt = loss_scale_optimizer(tf.keras.optimizers.Adam(1e-4))  # LSO under mixed_float16
    """
    name = getattr(policy, "name", policy) or tf.keras.mixed_precision.global_policy().name
    if name != "mixed_float16" or isinstance(
        optimizer, tf.keras.mixed_precision.LossScaleOptimizer
    ):
        return optimizer
    return tf.keras.mixed_precision.LossScaleOptimizer(optimizer)


def scale_loss(optimizer, loss):
    """``loss`` times the optimizer's loss scale (unchanged for an optimizer without one).

    Differentiate the scaled loss, then :func:`unscale_gradients`; float16 gradients then do not
    underflow. Log the unscaled loss.
    """
    if isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
        return optimizer.get_scaled_loss(loss)
    return loss


def unscale_gradients(optimizer, gradients: Sequence):
    """Divide gradients of a :func:`scale_loss` loss by the scale (differentiable; ``None`` kept).

    Example::

        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = scale_loss(opt, loss)
        grads = unscale_gradients(opt, tape.gradient(scaled, variables))
        opt.apply_gradients(zip(grads, variables))
    """
    if isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
        return optimizer.get_unscaled_gradients(list(gradients))
    return list(gradients)
