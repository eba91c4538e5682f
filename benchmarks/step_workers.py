"""The protocol between a benchmark's driver and its timing workers (one process each).

A worker builds and warms up its step, prints one JSON line {"ready": info}, then for each
'go N' line on its stdin runs N steps and prints {"seconds_per_step": ..., **after()}. The
driver starts workers (`start`) and asks them for rounds (`timed_round`), so variants that
need different environments (vljax, PyTorch) or the whole accelerator each run in their own.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import Callable


def serve(go: Callable[[int], None], info: dict, after: Callable[[], dict] = dict) -> None:
  """The worker's side: announces `info`, then times `go(n)` for each 'go n' request."""
  print(json.dumps({"ready": info}), flush=True)
  for line in sys.stdin:
    n = int(line.split()[1])
    start = time.perf_counter()
    go(n)
    print(json.dumps({"seconds_per_step": (time.perf_counter() - start) / n, **after()}),
          flush=True)


def start(cmd: list[str], cwd: str) -> tuple[subprocess.Popen | None, dict]:
  """Starts a worker; (process, its info) once ready, or (None, {"failed": why}) if it exited
  first (an out-of-memory line of its log where there is one, else the log's last line)."""
  # The worker's log goes to a file: an unread pipe would fill and stall it.
  log = tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                          text=True, cwd=cwd)
  for line in proc.stdout:
    if line.startswith("{"):
      msg = json.loads(line)
      if "ready" in msg:
        return proc, msg["ready"]
  proc.wait()
  log.seek(0)
  err = log.read().strip().splitlines()
  why = next((l for l in reversed(err) if "RESOURCE_EXHAUSTED" in l or "out of memory" in l
              or "OutOfMemory" in l), err[-1] if err else f"exit {proc.returncode}")
  return None, {"failed": why[:300]}


def timed_round(proc: subprocess.Popen, steps: int) -> dict:
  """Asks a ready worker for `steps` steps; its reply ({"seconds_per_step", ...})."""
  proc.stdin.write(f"go {steps}\n")
  proc.stdin.flush()
  for line in proc.stdout:
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"worker exited with {proc.wait()}")


def stop(proc: subprocess.Popen | None) -> None:
  if proc is not None:
    proc.stdin.close()
    proc.wait()


def torch_siglip_steps(forward, model, loss_fn, optimizer, images, tokens, n: int,
                       autocast_dtype=None):
  """n open_clip SigLIP training steps (as vljax's: gradient clipping at norm 1); the last
  loss. `forward` is the model or its torch.compile'd version; autocast_dtype runs the forward
  under CUDA autocast."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  for _ in range(n):
    optimizer.zero_grad(set_to_none=True)
    with (torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype
          else contextlib.nullcontext()):
      out = forward(images, tokens)
      loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                     out["logit_bias"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
  return loss
