"""Per-device temporary memory of the contrastive losses' forward + backward, by compilation only.

For 8 fake CPU devices and growing per-device batches, lowers and compiles
`jax.value_and_grad` of the sigmoid loss (chunked ring and all-gather) and of the softmax loss,
and prints the `temp_size_in_bytes` of each compiled executable. Nothing is executed, so global
batches of 32k take seconds.

Usage: python benchmarks/loss_memory.py [--width 256] [--batches 512,1024,2048,4096]
"""
from __future__ import annotations

import os

# Must precede the first jax import.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vljax import sharding  # noqa: E402
from vljax.losses import sigmoid_loss, softmax_loss  # noqa: E402

MIB = 2**20


def temp_bytes(loss_fn, mesh: jax.sharding.Mesh, global_batch: int, width: int) -> int:
  """Compiles value_and_grad(loss_fn) for abstract sharded inputs; returns temp bytes/device."""
  emb = jax.ShapeDtypeStruct((global_batch, width), jnp.float32,
                             sharding=NamedSharding(mesh, P(sharding.BATCH_AXES, None)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
  with jax.set_mesh(mesh):
    compiled = step.lower(emb, emb, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=256, help="embedding width d")
  parser.add_argument("--batches", default="512,1024,2048,4096", help="per-device batches")
  args = parser.parse_args()

  # The trainer's mesh: Auto axes, the whole batch over ("data", "fsdp") = (8, 1).
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  num_devices = mesh.size
  losses = {
      "chunked": lambda zi, zt, s, b: sigmoid_loss(zi, zt, s, b, chunked=True),
      "all-gather": lambda zi, zt, s, b: sigmoid_loss(zi, zt, s, b, chunked=False),
      "softmax": lambda zi, zt, s, b: softmax_loss(zi, zt, s),
  }
  print(f"{num_devices} devices ({jax.devices()[0].platform}), width {args.width}, fp32; "
        "temp MiB per device of jit(value_and_grad(loss)), compiled, not run")
  print("| per-device b | global N | sigmoid chunked | sigmoid all-gather | "
        "all-gather / chunked | softmax |")
  print("|---:|---:|---:|---:|---:|---:|")
  start = time.perf_counter()
  for b in (int(x) for x in args.batches.split(",")):
    n = b * num_devices
    mib = {k: temp_bytes(f, mesh, n, args.width) / MIB for k, f in losses.items()}
    print(f"| {b} | {n} | {mib['chunked']:.1f} | {mib['all-gather']:.1f} | "
          f"{mib['all-gather'] / mib['chunked']:.2f} | {mib['softmax']:.1f} |", flush=True)
  print(f"(compiled in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
