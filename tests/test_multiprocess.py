"""Two processes (2 CPU devices each, gloo over loopback) train like one process with 4 devices.

This is the multi-host path: per-process data shards assembled into global arrays, collectives
across processes, checkpoints and metrics written once, evaluation readable on every host.
"""
import os
import socket
import subprocess
import sys

import pytest

from vljax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, *extra):
  return [sys.executable, "-m", "vljax.main",
          f"--config={os.path.join(ROOT, 'configs', 'siglip.py')}:scale=tiny",
          f"--workdir={workdir}", "--config.total_steps=4", "--config.eval.every_steps=0",
          "--config.eval.max_examples.zeroshot=64", "--config.eval.max_examples.retrieval=64",
          "--config.tensorboard=false", *extra]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def test_two_processes_match_one_process(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  procs = [subprocess.Popen(
      _command(multi, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"), env=_env(2), cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "over 4 devices" in outputs[0]
  subprocess.run(_command(single), env=_env(4), cwd=ROOT, check=True, capture_output=True,
                 timeout=300)

  rows_multi, rows_single = metrics.read_metrics(multi), metrics.read_metrics(single)
  # Only process 0 writes metrics: one line per step plus one evaluation line.
  assert [r["step"] for r in rows_multi] == [r["step"] for r in rows_single] == [1, 2, 3, 4, 4]
  for a, b in zip(rows_multi, rows_single):
    for key in b:
      if key.startswith(("train/", "eval/")):
        # Each process reads the interleaved half of the same examples; the losses are sums
        # over the same pairs in another order.
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2", "4"]
