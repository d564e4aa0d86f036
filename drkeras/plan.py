"""The resource plan of an experiment's preset without running it.

``python -m drkeras.plan --experiment NAME [--preset paper] [--published | --data ROOT]``
declares the experiment's stages as a run would, builds each network once, and prints and
writes ``plan.json`` (:mod:`drkeras.stages`): per stage, host RAM under the ``data.cache``
policy, accelerator memory per replica, checkpoint size, disk for file caches and the expected
time per epoch on ``train.accelerator``.

``--published`` plans for the datasets' published sizes (IDRiD 413 / 103 grading and 54 / 27
segmentation, EyePACS 35,126 / 10,906 / 42,670, DDR 6,835 / 2,733 / 4,105 grading and
383 / 149 / 225 segmentation, Messidor 1,200, ...: docs/datasets.md section 7) from label-only
records: the labels of every example and no image, written by :func:`write_published_records`.
No data has to be downloaded.

Example::

    python -m drkeras.plan --experiment collaborative --preset paper --published \\
        --set train.accelerators=4 --host-ram-gb 64
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import drkeras.startup  # (first: quiets TensorFlow start-up logs)

import numpy as np
import tensorflow as tf

from drkeras import keys
from drkeras.data import records

# split -> list of (part, count, grade counts 0..4 (or None: unknown), lesion-present counts in
# keys.LESIONS order (or None: no masks)) from docs/datasets.md (the converters' official counts).
_IDRID_SEG_TRAIN = (54, 53, 54, 26, 54)
_IDRID_SEG_TEST = (27, 27, 27, 14, 27)
PUBLISHED: Dict[str, Dict[str, List[Tuple[str, int, Optional[tuple], Optional[tuple]]]]] = {
    "idrid": {
        "train": [
            ("segmentation", 54, None, _IDRID_SEG_TRAIN),
            ("grading", 413, (134, 20, 136, 74, 49), None),
        ],
        "test": [
            ("segmentation", 27, None, _IDRID_SEG_TEST),
            ("grading", 103, (34, 5, 32, 19, 13), None),
        ],
    },
    "eyepacs": {
        "train": [("", 35126, (25810, 2443, 5292, 873, 708), None)],
        "val": [("", 10906, (8130, 720, 1579, 237, 240), None)],
        "test": [("", 42670, (31403, 3042, 6282, 977, 966), None)],
    },
    "ddr": {
        # grades per split in the proportions of all 13,673 (6,266/630/4,477/236/913, 1,151
        # ungradable, which the converter keeps with grade -1)
        "train": [
            ("grading", 6835, None, None),
            ("segmentation", 383, None, (383, 383, 383, 383, 0)),
        ],
        "val": [
            ("grading", 2733, None, None),
            ("segmentation", 149, None, (149, 149, 149, 149, 0)),
        ],
        "test": [
            ("grading", 4105, None, None),
            ("segmentation", 225, None, (225, 225, 225, 225, 0)),
        ],
    },
    "messidor": {"test": [("", 1200, (546, 153, 247, 254, 0), None)]},
    "messidor2": {"test": [("", 1744, (1017, 270, 347, 75, 35), None)]},
    "diaretdb1": {
        "train": [("", 28, None, (28, 28, 28, 28, 0))],
        "test": [("", 61, None, (61, 61, 61, 61, 0))],
    },
    "aptos": {
        "train": [("", 3662, (1805, 370, 999, 193, 295), None)],
        "test": [("", 1928, None, None)],
    },
}
_DDR_GRADES = (6266, 630, 4477, 236, 913, 1151)  # the last: ungradable (grade -1)


def _spread(counts: Sequence[int], total: int) -> np.ndarray:
    """``total`` labels in the proportions of ``counts`` (largest remainders)."""
    counts = np.asarray(counts, float)
    exact = counts / counts.sum() * total
    whole = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - whole))[: total - whole.sum()]:
        whole[i] += 1
    return np.repeat(np.arange(len(counts)), whole)


def _feature(values, kind: str) -> tf.train.Feature:
    if kind == "bytes":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Examples:
    """Serialised label-only ``tf.train.Example`` records. The fields shared by many examples
    are serialised once: a ``Features`` message is a map, and concatenated serialisations of
    two maps parse as their union, so each record costs one small message (its id)."""

    def __init__(self, dataset: str, split: str):
        self.dataset, self.split = dataset, split
        self._shared: Dict[tuple, bytes] = {}

    def __call__(self, name: str, grade: int, present: Sequence[bool]) -> bytes:
        key = (int(grade), tuple(bool(p) for p in present))
        if key not in self._shared:
            fields = {
                keys.DATASET: _feature([self.dataset.encode()], "bytes"),
                keys.SPLIT: _feature([self.split.encode()], "bytes"),
                keys.IMAGE: _feature([b""], "bytes"),
                keys.MASKS: _feature([b""] * keys.NUM_LESIONS, "bytes"),
                keys.MASK_PRESENT: _feature([int(p) for p in key[1]], "int"),
                keys.GRADE: _feature([key[0]], "int"),
                keys.DME: _feature([keys.UNKNOWN], "int"),
            }
            self._shared[key] = tf.train.Features(feature=fields).SerializeToString()
        own = tf.train.Features(feature={keys.ID: _feature([name.encode()], "bytes")})
        body = self._shared[key] + own.SerializeToString()
        return b"\n" + _varint(len(body)) + body


def write_published_records(root, datasets: Sequence[str] = tuple(PUBLISHED)) -> pathlib.Path:
    """Label-only records of ``datasets`` at their published sizes under ``root/<dataset>``
    (ids, grades and which lesion masks exist; empty images). Enough for everything that
    reads labels only (:func:`drkeras.data.pipeline.read_labels`); decoding an image fails."""
    root = pathlib.Path(root)
    for dataset in datasets:
        out = root / dataset
        out.mkdir(parents=True, exist_ok=True)
        counts = {}
        for split, parts in PUBLISHED[dataset].items():
            path = out / f"{split}-00000.tfrecord"
            n = 0
            example = _Examples(dataset, split)
            with tf.io.TFRecordWriter(str(path)) as writer:
                for part, count, grades, lesions in parts:
                    if grades is not None:
                        labels = _spread(grades, count)
                    elif lesions is None and dataset == "ddr":
                        labels = _spread(_DDR_GRADES, count)
                        labels[labels == 5] = keys.UNKNOWN
                    else:
                        labels = np.full(count, keys.UNKNOWN)
                    present = np.zeros((count, keys.NUM_LESIONS), bool)
                    if lesions is not None:
                        for lesion, annotated in enumerate(lesions):
                            present[:annotated, lesion] = True
                    prefix = "-".join(p for p in (dataset, part, split) if p)
                    for i in range(count):
                        name = f"{prefix}-{i:05d}"
                        if dataset == "messidor":
                            name = f"{prefix}-Base{11 + i // 100}-{i:05d}"
                        writer.write(example(name, labels[i], present[i]))
                    n += count
            counts[split] = n
        manifest = {
            "dataset": dataset,
            "source": "published sizes (label-only records written by drkeras.plan)",
            "label_only": True,
            "total": sum(counts.values()),
            "counts": counts,
        }
        (out / records.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


def plan_preset(
    experiment,
    preset: str,
    *,
    data_root,
    overrides: Sequence[str] = (),
    out_dir,
    host_ram_gb: float = 0.0,
    networks: bool = True,
) -> dict:
    """Declare ``experiment``'s stages for ``preset`` on ``data_root`` and plan them (no
    training; each network is built once, with random weights). ``host_ram_gb`` states the
    machine's RAM (default: this machine's); ``networks=False`` plans the data side only."""
    from drkeras import weights
    from drkeras.config import apply_overrides, resolve_preset
    from drkeras.experiment import RunContext, plan_stages

    config = resolve_preset(experiment.presets, preset, list(overrides))
    # The plan reads shapes only: the networks are built with random weights (no download).
    random = weights.random_weight_overrides(experiment, config)
    config = apply_overrides(config, [f"data.source={data_root}", *random])
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    strategy = tf.distribute.get_strategy()
    ctx = RunContext(config, out_dir, strategy)
    declared = list(experiment.prepare(ctx).stages())
    machine = _plan_machine(config, host_ram_gb)
    return plan_stages(ctx, declared, machine, networks=networks)


def _plan_machine(config, host_ram_gb: float):
    from drkeras import stages as staging

    train = config.train
    host = int(host_ram_gb * staging.GB) if host_ram_gb else staging.machine_memory_bytes()
    budget = (
        int(config.data.host_memory_gb * staging.GB)
        if config.data.host_memory_gb
        else staging.default_host_budget(host)
    )
    memory = train.accelerator_memory_gb or staging.ACCELERATORS[train.accelerator]["memory_gb"]
    return staging.Machine(
        host_bytes=host,
        accelerator=train.accelerator,
        accelerator_bytes=int(memory * staging.GB),
        replicas=train.accelerators or 1,
        mixed_precision=train.mixed_precision,
        cache_budget_bytes=budget,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    from drkeras.config import ConfigError
    from drkeras.experiment import EXPERIMENTS, load_experiment

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", required=True, choices=sorted(EXPERIMENTS))
    parser.add_argument("--preset", default="paper")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--published", action="store_true", help="the datasets' published sizes")
    source.add_argument("--data", help="a folder of converted datasets (ROOT/idrid, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--host-ram-gb", type=float, default=0.0, help="state the host's RAM")
    parser.add_argument("--out", default=None, help="folder for plan.json (default runs/plan_NAME)")
    drkeras.startup.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    experiment = load_experiment(args.experiment)
    if args.preset not in experiment.presets:
        parser.error(f"--preset {args.preset}: choose among {sorted(experiment.presets)}")
    out = pathlib.Path(args.out or f"runs/plan_{args.experiment}_{args.preset}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data or (write_published_records(tmp) if args.published else None)
            if root is None:
                parser.error("give --published or --data ROOT")
            plan = plan_preset(
                experiment,
                args.preset,
                data_root=root,
                overrides=args.overrides,
                out_dir=out,
                host_ram_gb=args.host_ram_gb,
            )
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"peak host RAM {plan['peak_host_ram_gb']:.1f} GB, peak accelerator memory "
        f"{plan['peak_accelerator_gb_per_replica']:.1f} GB per replica; {out / 'plan.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
