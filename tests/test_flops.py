"""vljax.flops: analytic training FLOPs against a hand count, the traced programs and XLA."""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import pytest
from jax.extend import core as jax_core

from vljax import configlib, flops, optim, sharding, train
from vljax.data import tokenizer as tokenizer_lib
from vljax.objectives import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec: str, *overrides: str):
  config = configlib.load_config_file(os.path.join(ROOT, "configs", spec))
  return configlib.apply_overrides(config, ["eval.every_steps=-1", *overrides])


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.get_tokenizer(None)


# ------------------------------------------------------------------ a hand count


def _siglip_tiny_image_side_macs() -> tuple[int, int, int]:
  """(ViT without its pooling, MAP head, projection head) multiply-adds of one example of
  configs/siglip.py:scale=tiny: 16 px images, patch 8, width 32, depth 1, MLP 64."""
  patches = (16 // 8) ** 2  # 4 tokens
  patch_embedding = patches * (8 * 8 * 3) * 32  # 24,576
  block = (4 * patches * 32 * 32  # q, k, v, out projections: 16,384
           + patches * patches * 32  # QK^T: 512
           + patches * patches * 32  # PV: 512
           + 2 * patches * 32 * 64)  # MLP, two matrices: 16,384
  map_head = (1 * 32 * 32  # the probe's query: 1,024
              + 2 * patches * 32 * 32  # keys and values of the 4 tokens: 8,192
              + 2 * 1 * patches * 32  # QK^T and PV of one query: 256
              + 1 * 32 * 32  # out: 1,024
              + 2 * 1 * 32 * 64)  # MLP on the probe: 4,096
  head = 32 * 32  # width -> embed_dim
  return patch_embedding + block, map_head, head  # 58,368, 14,592 and 1,024


def _siglip_tiny_text_side_macs() -> int:
  """The text tower of configs/siglip.py:scale=tiny: 8 tokens, width 32, depth 1, MLP 64, pooled
  at the last token (no matmul), projected to embed_dim 32."""
  block = (4 * 8 * 32 * 32  # q, k, v, out: 32,768
           + 8 * 8 * 32  # QK^T: 2,048
           + 8 * 8 * 32  # PV: 2,048
           + 2 * 8 * 32 * 64)  # MLP: 32,768
  return block + 32 * 32  # 70,656


def test_siglip_tiny_equals_a_hand_count(tokenizer):
  config = _config("siglip.py:scale=tiny")
  # The sizes the hand count assumes (model_sizes.SMALL_TWO_TOWERS['tiny']).
  assert (config.data.image_size, config.data.max_len, config.batch_size) == (16, 8, 16)
  assert dict(config.model.image)["patch_size"] in ((8, 8), [8, 8])
  assert config.model.embed_dim == 32 and config.model.image.pool_type == "map"

  vit, map_head, image_head = _siglip_tiny_image_side_macs()
  contrastive = 16 * 32  # this example's row of the 16 x 16 logits: batch x embed_dim
  forward_macs = (vit + map_head + image_head + _siglip_tiny_text_side_macs()
                  + contrastive)  # 145,152
  assert flops.train_flops_per_example(config, tokenizer.vocab_size) == 3 * 2 * forward_macs


def test_frozen_towers_drop_their_backward_pass(tokenizer):
  vit, map_head, image_head = _siglip_tiny_image_side_macs()
  # LiT ('^img/' frozen): the whole image side runs forward only, i.e. loses 2 of its 3 passes.
  whole = flops.train_flops_per_example(
      _config("lit.py:scale=tiny,init=/unused", "optim.freeze=[]"), tokenizer.vocab_size)
  locked = flops.train_flops_per_example(_config("lit.py:scale=tiny,init=/unused"),
                                         tokenizer.vocab_size)
  assert whole - locked == 2 * 2 * (vit + map_head + image_head)

  # PaLI stage 1 ('^img/encoder/' frozen): the ViT (no MAP head in PaLI) only; the projection
  # to the text width still trains. Its ViT is the SigLIP tiny one.
  pali = _config("pali.py:scale=tiny")
  assert pali.data.image_size == 16 and dict(pali.model.image)["patch_size"] in ((8, 8), [8, 8])
  assert (pali.model.image.width, pali.model.image.depth, pali.model.image.mlp_dim) == (32, 1, 64)
  whole = flops.train_flops_per_example(pali, tokenizer.vocab_size)
  locked = flops.train_flops_per_example(_config("pali.py:scale=tiny,init=/unused"),
                                         tokenizer.vocab_size)
  assert whole - locked == 2 * 2 * vit


# ------------------------------------------------------------------ the traced programs


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _traced_matmul_flops(jaxpr) -> int:
  """2 x the multiply-adds of every dot_general and convolution in a jaxpr, nested ones
  included (a scan's body counts `length` times)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * out * math.prod(lhs[d] for d in lhs_contracting)
    elif name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) axis indices
      per_output = math.prod(kernel[d] for d in spec[1:])
      total += 2 * out * per_output // eqn.params["feature_group_count"]
    else:
      repeat = eqn.params.get("length", 1) if name == "scan" else 1
      total += repeat * sum(_traced_matmul_flops(sub) for sub in _subjaxprs(eqn.params))
  return total


def _abstract_inputs(config, tokenizer, batch_size: int):
  objective = make_objective(config, tokenizer)
  batch = train.batch_dummy(objective.batch_fields(), batch_size)
  params = nn.meta.unbox(jax.eval_shape(objective.init, jax.random.key(0), batch))
  return objective, params, batch


@pytest.mark.parametrize("spec", [
    "siglip.py:scale=tiny", "clip.py:scale=tiny", "coca.py:scale=tiny", "pali.py:scale=tiny",
    "pali.py:scale=tiny,arch=prefix_lm",
    # Named sizes: a ViT 'B/16' variant, and PaLI's T5 'xl' text variant.
    "siglip.py:scale=paper", "pali.py:scale=paper,variant=B/16"])
def test_forward_count_equals_the_matmuls_of_the_traced_loss(spec, tokenizer):
  # Tracing only (nothing compiles or runs), so paper sizes are cheap; a batch of 4 keeps the
  # contrastive logits' share exact for the count's batch too.
  config = _config(spec, "batch_size=4")
  objective, params, batch = _abstract_inputs(config, tokenizer, 4)
  jaxpr = jax.make_jaxpr(objective.loss_fn)(params, batch, jax.random.key(0))
  traced = _traced_matmul_flops(jaxpr.jaxpr) / 4
  forward = flops.forward_flops_per_example(config, tokenizer.vocab_size)
  assert sum(forward.values()) == traced


@pytest.mark.parametrize("spec, skipped", [
    # Pixels need no gradient: autodiff skips the patch embedding's input gradient, which the
    # 3 x forward convention counts (4 patches x 192 pixel values x width 32, 2 FLOPs each).
    ("siglip.py:scale=tiny", 2 * 4 * 192 * 32),
    ("coca.py:scale=tiny", 2 * 4 * 192 * 32),
    # LiT: nothing in the frozen tower needs the image embeddings' gradient, so the contrastive
    # logits' backward computes only the text side's (batch 16 x embed_dim 32).
    ("lit.py:scale=tiny,init=/unused", 2 * 16 * 32),
    # PaLI with the ViT frozen: the projection's weights train, its input needs no gradient
    # (4 tokens x 32 x 32).
    ("pali.py:scale=tiny,init=/unused", 2 * 4 * 32 * 32),
])
def test_training_count_is_what_autodiff_computes_but_the_unneeded_input_gradients(
    spec, skipped, tokenizer):
  config = _config(spec)
  objective, params, batch = _abstract_inputs(config, tokenizer, config.batch_size)
  frozen = optim.frozen_mask(config.optim, params)

  def gradient(p, b, rng):
    return train.value_and_trainable_grad(objective.loss_fn, p, frozen, b, rng)

  jaxpr = jax.make_jaxpr(gradient)(params, batch, jax.random.key(0))
  traced = _traced_matmul_flops(jaxpr.jaxpr) / config.batch_size
  assert flops.train_flops_per_example(config, tokenizer.vocab_size) - traced == skipped


# ------------------------------------------------------------------ XLA's cost analysis


@pytest.mark.parametrize("spec", ["siglip.py:scale=tiny", "coca.py:scale=tiny"])
def test_xla_cost_analysis_is_the_count_plus_elementwise_work(spec, tokenizer):
  # XLA also counts norms, softmax, GELU, the loss and the optimizer update: at width 32 that is
  # about 10% on top of the matmuls (the tiny configs measured 0.895-0.91; SigLIP at the laptop
  # size 0.98), so the count must be below XLA's figure but within 20% of it.
  config = _config(spec)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  xla = train.compiled_step_flops(config, tokenizer, mesh) / config.batch_size
  analytic = flops.train_flops_per_example(config, tokenizer.vocab_size)
  assert 0.8 * xla <= analytic <= xla, (analytic, xla)


# ------------------------------------------------------------------ errors


def test_configuration_errors_name_the_key(tokenizer):
  with pytest.raises(configlib.ConfigError, match="config.objective"):
    flops.train_flops_per_example(_config("siglip.py:scale=tiny", "objective=mae"), 256)
  with pytest.raises(configlib.ConfigError, match="config.data.image_size"):
    flops.train_flops_per_example(_config("siglip.py:scale=tiny", "data.image_size=20"), 256)
  with pytest.raises(configlib.ConfigError, match="config.model.image.variant"):
    flops.train_flops_per_example(
        _config("siglip.py:scale=paper", "model.image.variant=Q/16"), tokenizer.vocab_size)


# ------------------------------------------------------------------ peaks and MFU


@pytest.mark.parametrize("device_kind, dtype, precision, expected", [
    ("TPU v4", "bfloat16", None, 275e12),
    ("TPU v5 lite", "bfloat16", None, 197e12),  # v5e
    ("TPU v5", "bfloat16", None, 459e12),  # v5p, not taken for v5e
    ("TPU v5p", "bfloat16", None, 459e12),
    ("TPU v6 lite", "bfloat16", None, 918e12),  # v6e / Trillium
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, 989e12),  # SXM
    ("NVIDIA H100 PCIe", "bfloat16", None, 756e12),
    ("NVIDIA H200", "bfloat16", None, 989e12),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", None, 312e12),
    # float32 at JAX's default precision: TF32 tensor cores on GPUs, one bf16 pass on TPUs.
    ("NVIDIA A100-SXM4-40GB", "float32", None, 156e12),
    ("NVIDIA H100 80GB HBM3", "float32", None, 494.5e12),
    ("TPU v4", "float32", None, 275e12),
    # True float32 when asked for: CUDA cores on GPUs, no published rate on TPUs.
    ("NVIDIA A100-SXM4-40GB", "float32", "highest", 19.5e12),
    ("NVIDIA H100 80GB HBM3", "float32", "float32", 67e12),
    ("TPU v4", "float32", "highest", None),
    ("cpu", "float32", None, None),
    ("cpu", "bfloat16", None, None),
    ("TPU v4 lite", "bfloat16", None, None),  # the inference chip v4i is no v4
    ("Some Future Accelerator", "bfloat16", None, None),
])
def test_peak_flops_by_device_kind(device_kind, dtype, precision, expected):
  assert flops.peak_flops(device_kind, dtype, precision) == expected


def test_peak_flops_rejects_an_unknown_dtype():
  with pytest.raises(configlib.ConfigError, match="config.dtype"):
    flops.peak_flops("TPU v4", "float16")


def test_mfu_is_achieved_over_peak_flops():
  # 140 GFLOP per example at 2,000 examples/s per device is 280 TFLOP/s of the 989 peak.
  assert flops.mfu(140e9, 2000.0, 989e12) == pytest.approx(280e12 / 989e12)
  with pytest.raises(ValueError, match="peak"):
    flops.mfu(140e9, 2000.0, 0.0)


def test_the_log_line_reports_model_tflops_and_mfu_where_the_peak_is_known(monkeypatch):
  from vljax import metrics, train  # pylint: disable=g-import-not-at-top
  config = configlib.load_config_file(os.path.join(ROOT, "configs", "siglip.py:scale=tiny"))
  example_flops, peak = train.model_flops(config, 256)
  assert example_flops == flops.train_flops_per_example(config, 256)
  assert peak is None  # a CPU has no entry: TFLOP/s only

  class FakeDevice:
    device_kind = "NVIDIA H100 80GB HBM3"

  monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice()])
  config.dtype = "bfloat16"
  _, peak = train.model_flops(config, 256)
  assert peak == 989e12  # H100 SXM, dense bf16 (NVIDIA's datasheet)
  line = metrics.progress_line(5, 10, {"perf/tflops_per_device": 400.0, "perf/mfu": 0.4044})
  assert "TFLOP/s/dev 400.0000" in line and "MFU 40.4%" in line
