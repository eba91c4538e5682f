"""Train-step samples/s of vljax against open_clip, the same SigLIP at the laptop size.

Side by side on one machine: vljax's jitted SigLIP step (configs/siglip.py:scale=laptop: ViT and
text tower of width 128, 4 layers, 4 heads, MLP 512, 32 px at patch 8, MAP image pooling, text
pooled at its last token, batch 128, sigmoid loss, AdamW) and open_clip's CLIP model built with
the same sizes (attentional pooling with one query for the image, 'last' text pooling, no causal
mask, init logit scale log 10 and bias -10), its SigLipLoss and torch.optim.AdamW, in eager
PyTorch. Both train on one fixed random batch (no data loading). Parameter counts are printed
for both.

The two run in separate processes (open_clip needs a PyTorch environment, never vljax's core
install): `--torch_python` names that environment's python (default /work/side_venv/bin/python,
which has torch and open_clip_torch). Each worker builds and warms up its step, then the driver
alternates rounds (`--steps` steps each) between them and prints the median step time of each,
the samples/s and the ratio vljax / open_clip, with the machine's load average before and after:
the machine is shared, so run it when it is quiet and read the load.

Usage: python benchmarks/vs_open_clip.py [--rounds 7] [--steps 5] [--torch_python PATH]
       [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import step_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP, TEXT_LEN, EMBED = 128, 32, 8, 128, 4, 4, 512, 24, 128


def vljax_worker(threads: int) -> None:
  """Builds the vljax step, then times `steps` steps per 'go <steps>' line on stdin."""
  del threads  # XLA's CPU client uses the machine's cores
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from vljax import configlib, sharding, train  # pylint: disable=g-import-not-at-top
  from vljax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from train_helpers import random_batch  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizer_lib.get_tokenizer(None)
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py:scale=laptop"))
  assert config.batch_size == BATCH and config.data.max_len == TEXT_LEN
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  setup = train.build(config, tokenizer, mesh, epoch_size=None)
  state = train.init_state(setup, 0)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  batch = sharding.global_batch_from_host(random_batch(config, setup.objective), mesh,
                                          setup.batch_shardings)
  step = train.make_train_step(setup)
  key = jax.random.key(0)

  def run(n):
    nonlocal state
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      for _ in range(n):
        state, metrics = step(state, batch, key)
      jax.block_until_ready(metrics)

  run(3)  # compile and warm up
  step_workers.serve(run, {"params": params, "vocab": tokenizer.vocab_size})


def torch_worker(threads: int, vocab: int) -> None:
  """Builds the open_clip model, loss and optimizer, then serves 'go <steps>' like vljax's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from open_clip.loss import SigLipLoss  # pylint: disable=g-import-not-at-top
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  vision = CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS,
                         mlp_ratio=MLP / WIDTH, patch_size=PATCH, image_size=IMAGE,
                         attentional_pool=True, attn_pooler_queries=1,
                         attn_pooler_heads=HEADS, pool_type="tok")
  text = CLIPTextCfg(context_length=TEXT_LEN, vocab_size=vocab, width=WIDTH, heads=HEADS,
                     layers=DEPTH, mlp_ratio=MLP / WIDTH, no_causal_mask=True, pool_type="last")
  model = CLIP(EMBED, vision, text, init_logit_scale=float(np.log(10.0)), init_logit_bias=-10.0,
               output_dict=True)
  model.train()
  params = sum(p.numel() for p in model.parameters())
  loss_fn = SigLipLoss()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=1e-4)
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.uniform(-1, 1, (BATCH, 3, IMAGE, IMAGE)), dtype=torch.float32)
  tokens = torch.tensor(rng.integers(3, 40, (BATCH, TEXT_LEN)), dtype=torch.long)

  def run(n):
    step_workers.torch_siglip_steps(model, model, loss_fn, optimizer, images, tokens, n)

  run(3)
  step_workers.serve(run, {"params": params, "torch": torch.__version__,
                           "open_clip": open_clip.__version__})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--torch_python", default="/work/side_venv/bin/python")
  parser.add_argument("--worker", choices=["vljax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == "vljax":
    return vljax_worker(args.threads)
  if args.worker == "torch":
    return torch_worker(args.threads, args.vocab)

  load_before = os.getloadavg()
  me = os.path.abspath(__file__)
  jx, jx_info = step_workers.start([sys.executable, me, "--worker", "vljax"], ROOT)
  pt, pt_info = step_workers.start([args.torch_python, me, "--worker", "torch", "--vocab",
                                    str(jx_info.get("vocab")), "--threads", str(args.threads)],
                                   ROOT)
  for proc, info in ((jx, jx_info), (pt, pt_info)):
    if proc is None:
      raise SystemExit(f"a worker failed to start: {info['failed']}")
  times = {"vljax": [], "open_clip": []}
  try:
    for _ in range(args.rounds):
      times["vljax"].append(step_workers.timed_round(jx, args.steps)["seconds_per_step"])
      times["open_clip"].append(step_workers.timed_round(pt, args.steps)["seconds_per_step"])
  finally:
    step_workers.stop(jx)
    step_workers.stop(pt)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} cores); torch {pt_info['torch']}, open_clip {pt_info['open_clip']}, "
        f"{args.threads} torch threads")
  print(f"parameters: vljax {jx_info['params'] / 1e6:.3f}M, open_clip "
        f"{pt_info['params'] / 1e6:.3f}M; batch {BATCH}")
  for name in ("vljax", "open_clip"):
    print(f"{name:9s} median {med[name] * 1e3:7.1f} ms/step  {BATCH / med[name]:7.1f} samples/s"
          f"  (rounds: {', '.join(f'{t * 1e3:.0f}' for t in times[name])} ms)")
  print(f"vljax / open_clip samples/s: {med['open_clip'] / med['vljax']:.2f}x")


if __name__ == "__main__":
  main()
