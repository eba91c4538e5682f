"""Evaluation metrics against numpy references, sharded over 8 devices."""
import jax
import numpy as np
import pytest

from vljax import sharding
from vljax.evals import common, retrieval, zeroshot


def _normalised(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_recall(q, k, at, q_ids=None, k_ids=None):
  """Loop-by-loop: rank of the best relevant key among the wrong ones (ties count against)."""
  q_ids = np.arange(len(q)) if q_ids is None else q_ids
  k_ids = np.arange(len(k)) if k_ids is None else k_ids
  hits = []
  for i in range(len(q)):
    sims = [float(np.dot(q[i], k[j])) for j in range(len(k))]
    best = max(s for s, kid in zip(sims, k_ids) if kid == q_ids[i])
    rank = sum(1 for s, kid in zip(sims, k_ids) if kid != q_ids[i] and s >= best)
    hits.append(rank < at)
  return float(np.mean(hits))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 4})


def test_recall_matches_numpy_reference(mesh):
  rng = np.random.default_rng(0)
  zimg = _normalised(rng, 64, 8)
  ztxt = _normalised(rng, 64, 8) + 0.8 * zimg  # correlated so recall is not trivial
  ztxt /= np.linalg.norm(ztxt, axis=-1, keepdims=True)
  got = retrieval.recall_metrics(zimg, ztxt, None, mesh)
  for k in (1, 5, 10):
    assert got[f"eval/i2t_recall@{k}"] == pytest.approx(_reference_recall(zimg, ztxt, k))
    assert got[f"eval/t2i_recall@{k}"] == pytest.approx(_reference_recall(ztxt, zimg, k))
  assert 0 < got["eval/i2t_recall@1"] < got["eval/i2t_recall@10"] <= 1


def test_constant_embeddings_get_zero_recall(mesh):
  z = np.ones((16, 4), np.float32) / 2
  got = retrieval.recall_metrics(z, z, None, mesh)
  assert got["eval/i2t_recall@10"] == 0.0 and got["eval/t2i_recall@1"] == 0.0


def test_recall_with_several_captions_per_image(mesh):
  rng = np.random.default_rng(2)
  zimg = _normalised(rng, 24, 8)
  caption_image = np.repeat(np.arange(24), [1, 2, 3] * 8)  # 48 captions, 1 to 3 per image
  ztxt = _normalised(rng, len(caption_image), 8) + 0.7 * zimg[caption_image]
  ztxt /= np.linalg.norm(ztxt, axis=-1, keepdims=True)
  got = retrieval.recall_metrics(zimg, ztxt, caption_image, mesh)
  for k in (1, 5, 10):
    assert got[f"eval/i2t_recall@{k}"] == pytest.approx(
        _reference_recall(zimg, ztxt, k, np.arange(24), caption_image))
    assert got[f"eval/t2i_recall@{k}"] == pytest.approx(
        _reference_recall(ztxt, zimg, k, caption_image, np.arange(24)))
  assert 0 < got["eval/t2i_recall@1"] < 1
  with pytest.raises(ValueError, match="one image index"):
    retrieval.recall_metrics(zimg, ztxt, caption_image + 1, mesh)


def test_zeroshot_top1_matches_reference():
  rng = np.random.default_rng(1)
  prompts = _normalised(rng, 5 * 3, 8)  # 5 classes x 3 templates
  zcls = zeroshot.class_embeddings(prompts, 5)
  ref_cls = prompts.reshape(5, 3, 8).mean(1)
  ref_cls /= np.linalg.norm(ref_cls, axis=-1, keepdims=True)
  np.testing.assert_allclose(zcls, ref_cls, rtol=1e-5, atol=1e-6)
  zimg = _normalised(rng, 40, 8)
  labels = rng.integers(0, 5, size=40)
  expected = np.mean(np.argmax(zimg @ ref_cls.T, axis=1) == labels)
  assert zeroshot.top1(zimg, zcls, labels) == pytest.approx(expected)


def test_embed_all_pads_and_trims(mesh):
  x = np.arange(21 * 3, dtype=np.float32).reshape(21, 3)
  fn = jax.jit(lambda p, v: v * p)
  out = common.embed_all(fn, 2.0, x, mesh, batch_size=16)
  np.testing.assert_array_equal(np.asarray(out), 2 * x)
  with pytest.raises(ValueError, match="empty"):
    common.embed_all(fn, 2.0, x[:0], mesh, batch_size=16)
