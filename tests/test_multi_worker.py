"""``--strategy multi_worker``: two worker processes on 127.0.0.1 train the tiny experiment with
MultiWorkerMirroredStrategy; both end with identical weights, equal to a one-process run on the
same global batches."""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
from tiny_experiment import Tiny

from drkeras.experiment import main

SCRIPT = os.path.join(os.path.dirname(__file__), "tiny_experiment.py")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_workers_end_with_identical_weights(tmp_path):
    out, reference = tmp_path / "cluster", tmp_path / "single"
    # No dropout: one process and two workers then draw no random numbers and must agree.
    # Few steps, checkpoints at epoch ends only: collective checkpointing is slow on CPU.
    small = ["--set", "method.dropout=0", "--set", "method.checkpoint_steps=0"]
    small += ["--set", "method.samples=32", "--set", "train.epochs=2"]
    argv = ["--out", str(out), "--strategy", "multi_worker"] + small
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    processes, logs = [], []
    for index in range(2):
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="2",
            CUDA_VISIBLE_DEVICES="-1",
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        logs.append(open(tmp_path / f"worker{index}.log", "w"))
        processes.append(
            subprocess.Popen(
                [sys.executable, SCRIPT] + argv, env=env, stdout=logs[-1], stderr=subprocess.STDOUT
            )
        )
    try:
        # The one-process reference runs meanwhile (same global batch of 8).
        assert main(Tiny(), ["--out", str(reference)] + small) == 0
        codes = [p.wait(timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        for handle in logs:
            handle.close()
    worker_logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in worker_logs)
    assert "2 replica(s) on 2 worker(s)" in worker_logs[0]

    chief = np.load(out / "weights.npz")
    worker_dir = out / "workers" / "worker_1"
    worker = np.load(worker_dir / "weights.npz")
    single = np.load(reference / "weights.npz")
    assert sorted(chief) == sorted(worker) == sorted(single)
    for key in chief:
        np.testing.assert_array_equal(worker[key], chief[key], err_msg=key)
        # All-reduced gradients of the same global batches: equal up to summation order.
        np.testing.assert_allclose(chief[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # The worker checkpoints in its own folder and logs the same (global-batch) losses.
    assert (worker_dir / "checkpoints" / "joint" / "done.json").exists()
    assert (out / "checkpoints" / "joint" / "done.json").exists()
    for row_chief, row_worker, row_single in zip(
        _rows(out / "history.csv"),
        _rows(worker_dir / "history.csv"),
        _rows(reference / "history.csv"),
    ):
        assert row_chief == row_worker
        np.testing.assert_allclose(float(row_chief["loss"]), float(row_single["loss"]), rtol=1e-5)
