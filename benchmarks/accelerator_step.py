"""Train-step throughput and MFU of a paper recipe on the accelerator of this machine.

Each run builds the config's one train step (configs/siglip.py:scale=paper by default: SigLIP
B/16 at 224 px, 64 text tokens, a 32k vocabulary stand-in) on a mesh of the first device, with
a memory option combination and a global batch, and times it on one fixed random batch (no data
loading: this measures the step, not the input). Each run is its own process, one at a time
(each takes the accelerator's memory), so one that runs out of memory leaves nothing behind: it
compiles, warms up, then times `--rounds` rounds of `--steps` steps; the median round is
reported, with

- examples/s and MFU: `vljax.flops`' analytic training FLOPs per example (matmuls, forward x3)
  over the device's dense peak from `vljax.flops.peak_flops` (bf16 peak for a bf16 run; the
  TF32 peak for a float32 run at JAX's default matmul precision);
- the device's peak bytes in use (`memory_stats`) and XLA's temporary bytes for the step;
- the compile time.

`--open_clip` adds open_clip's ViT-B-16-SigLIP (the same architecture, 203M parameters) trained
in PyTorch on the same device: bf16 autocast, fused AdamW, gradient clipping at 1 as vljax,
torch.compile'd, its SigLipLoss. It needs torch and open_clip in `--torch_python` (never in
vljax's install).

Usage (one accelerator):
  python benchmarks/accelerator_step.py --runs bfloat16,scan,full,512 float32,loop,none,256 \
      [--config configs/siglip.py:scale=paper] [--rounds 5] [--steps 10] [--open_clip 512]
A run is DTYPE,LAYERS,REMAT,BATCH: dtype float32|bfloat16, layers scan|loop, remat one of
config.layers.remat's names (none, full, dots, block_inputs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import step_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_run(spec: str) -> dict:
  dtype, layers, remat, batch = spec.split(",")
  if layers not in ("scan", "loop"):
    raise SystemExit(f"--runs {spec}: layers must be scan or loop")
  return dict(dtype=dtype, scan=layers == "scan", remat=remat, batch=int(batch))


def vljax_worker(config_spec: str, run: dict, vocab: int, attention: str) -> None:
  """Builds and compiles one run's step, then times `n` steps per 'go n' line on stdin."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vljax import configlib, flops, sharding, train  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from train_helpers import random_batch  # pylint: disable=g-import-not-at-top

  config = configlib.load_config_file(os.path.join(ROOT, config_spec))
  config = configlib.apply_overrides(config, [
      f"batch_size={run['batch']}", f"dtype={run['dtype']}", f"layers.scan={run['scan']}",
      f"layers.remat={run['remat']}", f"layers.attention={attention}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
  config = train.resolved_for_compile(config)
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  tokenizer = train.VocabularyStandIn(vocab)
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  step, cost = train.compile_step(setup, train.make_train_step(setup), config.batch_size)
  state = train.init_state(setup, 0)
  batch = sharding.global_batch_from_host(random_batch(config, setup.objective), mesh,
                                          setup.batch_shardings)
  key = jax.random.key(0)
  losses = []

  def go(n):
    nonlocal state
    for _ in range(n):
      state, metrics = step(state, batch, key)
    losses.append(float(metrics["train/loss"]))  # waits for the last step

  go(3)  # warm up
  per_example = flops.train_flops_per_example(config, vocab)
  peak = flops.peak_flops(devices[0].device_kind, config.dtype,
                          jax.config.jax_default_matmul_precision)
  stats = devices[0].memory_stats() or {}
  step_workers.serve(go, {
      "device": devices[0].device_kind,
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "flops_per_example": per_example, "peak_flops": peak, "compile_s": cost.compile_seconds,
      "temp_bytes": cost.temp_bytes, "jax": jax.__version__,
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "bytes_limit": stats.get("bytes_limit")},
      lambda: {"loss": losses[-1], "peak_bytes_in_use":
               (devices[0].memory_stats() or {}).get("peak_bytes_in_use")})


def check_attention() -> None:
  """layers.attend through cuDNN and through XLA against a float32 reference, bf16 inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vljax.models import layers, stacks  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  b, l, h, d = 8, 197, 12, 64
  q, k, v, cot = (jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32) for _ in range(4))
  lengths = rng.integers(1, l + 1, b)
  key_mask = jnp.asarray(np.arange(l)[None, :] < lengths[:, None])[:, None, None, :]

  def loss(q, k, v, mask, dtype):  # (loss, the attention output): grads of the loss, out too
    out = layers.attend(q, k, v, mask, dtype).astype(jnp.float32)
    return jnp.sum(out * cot), out

  for mask_name, mask in (("no mask", None), ("key padding", key_mask)):
    with jax.default_matmul_precision("highest"):
      stacks.set_attention_implementation("xla")
      ref = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True), static_argnums=4)(
          q, k, v, mask, jnp.float32)
    for impl in ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",):
      stacks.set_attention_implementation(impl)
      fn = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True), static_argnums=4)
      got = fn(q, k, v, mask, jnp.bfloat16)
      hlo = fn.lower(q, k, v, mask, jnp.bfloat16).compile().as_text()
      errs = [float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
              for g, r in zip([got[1], *got[0]], [ref[1], *ref[0]])]
      print(f"attention {mask_name:11s} {impl:5s} bf16 vs float32: relative error out "
            f"{errs[0]:.2e}, dq {errs[1]:.2e}, dk {errs[2]:.2e}, dv {errs[3]:.2e}; "
            f"cudnn custom call in the program: {'__cudnn$fmha' in hlo}", flush=True)
  stacks.set_attention_implementation("xla")


def torch_worker(batch: int, compile_model: bool) -> None:
  """open_clip's ViT-B-16-SigLIP on the GPU, serving 'go n' like the vljax worker."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from open_clip.loss import SigLipLoss  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True
  model = open_clip.create_model("ViT-B-16-SigLIP", device="cuda", output_dict=True)
  model.train()
  params = sum(p.numel() for p in model.parameters())
  loss_fn = SigLipLoss()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                weight_decay=1e-4, fused=True)
  images = torch.rand(batch, 3, 224, 224, device="cuda") * 2 - 1
  tokens = torch.randint(3, 32000, (batch, 64), device="cuda")
  forward = torch.compile(model) if compile_model else model
  losses = []

  def go(n):
    loss = step_workers.torch_siglip_steps(forward, model, loss_fn, optimizer, images, tokens,
                                           n, autocast_dtype=torch.bfloat16)
    losses.append(float(loss))  # waits for the last step

  start = time.perf_counter()
  go(3)
  compile_s = time.perf_counter() - start
  step_workers.serve(go, {"device": torch.cuda.get_device_name(), "params": params, "compile_s": compile_s,
              "torch": torch.__version__, "open_clip": open_clip.__version__,
              "peak_bytes_in_use": torch.cuda.max_memory_allocated()},
         lambda: {"loss": losses[-1], "peak_bytes_in_use": torch.cuda.max_memory_allocated()})


HEADER = (f"{'run':34s} {'batch':>6s} {'ms/step':>8s} {'ex/s':>8s} {'MFU':>6s} {'peak GiB':>8s} "
          f"{'compile s':>9s}  loss")


def _summarise(name: str, res: dict, flush: bool = False) -> None:
  """Prints one run's row (median step time, examples/s, MFU, peak memory) and stores them."""
  info = res["info"]
  if "failed" in info:
    print(f"{name:34s} failed: {info['failed']}", flush=flush)
    return
  batch = int(name.split(",")[-1]) if name.startswith("vljax") else int(name.split()[2])
  times = [r["seconds_per_step"] * 1e3 for r in res["rounds"]]
  ms = statistics.median(times)
  ex_s = batch / ms * 1e3
  mfu = (f"{ex_s * info['flops_per_example'] / info['peak_flops']:.1%}"
         if info.get("peak_flops") and info.get("flops_per_example") else "-")
  peak = max(r["peak_bytes_in_use"] or 0 for r in res["rounds"]) / 2**30
  res.update(ms_per_step=ms, examples_per_s=ex_s, mfu=mfu, peak_gib=peak)
  print(f"{name:34s} {batch:6d} {ms:8.1f} {ex_s:8.0f} {mfu:>6s} {peak:8.1f} "
        f"{info['compile_s']:9.1f}  {res['rounds'][-1]['loss']:.4f}  "
        f"(rounds {min(times):.1f}-{max(times):.1f} ms)", flush=flush)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/siglip.py:scale=paper")
  parser.add_argument("--runs", nargs="+", default=["bfloat16,scan,full,512"])
  parser.add_argument("--vocab", type=int, default=32_000)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--open_clip", type=int, nargs="*", default=[],
                      help="batch sizes for open_clip's ViT-B-16-SigLIP (compiled)")
  parser.add_argument("--open_clip_eager", action="store_true",
                      help="run open_clip without torch.compile")
  parser.add_argument("--attention", default="xla", help="config.layers.attention")
  parser.add_argument("--check_attention", action="store_true",
                      help="first compare cuDNN's and XLA's attention (values, gradients)")
  parser.add_argument("--torch_python", default=sys.executable)
  parser.add_argument("--json", help="also write every result to this file")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == "torch":
    return torch_worker(int(args.runs[0]), not args.open_clip_eager)
  if args.worker:
    return vljax_worker(args.config, parse_run(args.worker), args.vocab, args.attention)
  if args.check_attention:
    check_attention()

  me = os.path.abspath(__file__)
  jobs = [(f"vljax {spec}", [sys.executable, me, "--worker", spec, "--config", args.config,
                             "--vocab", str(args.vocab), "--attention", args.attention]) for spec in args.runs
          if parse_run(spec)]
  jobs += [(f"open_clip bf16 {b}" + (" eager" if args.open_clip_eager else " compiled"),
            [args.torch_python, me, "--worker", "torch", "--runs", str(b)]
            + (["--open_clip_eager"] if args.open_clip_eager else []))
           for b in args.open_clip]
  results = {}
  for name, cmd in jobs:
    proc, info = step_workers.start(cmd, ROOT)
    print(f"[{time.strftime('%H:%M:%S')}] {name} {json.dumps(info)}", flush=True)
    results[name] = {"info": info, "rounds": []}
    if proc is None:
      continue
    for _ in range(args.rounds):
      results[name]["rounds"].append(step_workers.timed_round(proc, args.steps))
    step_workers.stop(proc)
    _summarise(name, results[name], flush=True)  # now, in case a later run never ends

  print(HEADER)
  for name, res in results.items():
    _summarise(name, res)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
