"""Evaluation metrics against numpy references, sharded over 8 devices (and over one)."""
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


def _reference_text_recall(q, k, q_texts, k_texts, at):
  """Loop-by-loop with text equivalence: key j is relevant to query i when they share a text.

  q_texts[i] / k_texts[j] are sets of caption strings; ties with a wrong key count against.
  """
  hits = []
  for i in range(len(q)):
    sims = [float(np.dot(q[i], k[j])) for j in range(len(k))]
    relevant = [bool(q_texts[i] & k_texts[j]) for j in range(len(k))]
    best = max(s for s, r in zip(sims, relevant) if r)
    rank = sum(1 for s, r in zip(sims, relevant) if not r and s >= best)
    hits.append(rank < at)
  return float(np.mean(hits))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 4})


@pytest.fixture(scope="module")
def one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


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


def _quantised(rng, shape):
  # Multiples of 1/4 in [-1, 1]: every dot product is exact in float32, so ties are real ties
  # both here and on the devices, whatever the summation order.
  return (rng.integers(-4, 5, size=shape) / 4).astype(np.float32)


def _duplicate_caption_set(seed):
  """13 images with 1 to 3 captions each from a small vocabulary: texts repeat within and
  across images; images 3 and 4 are identical (ties), and captions share embeddings by text."""
  rng = np.random.default_rng(seed)
  vocab = [f"text {t}" for t in range(9)]
  text_emb = _quantised(rng, (len(vocab), 6))
  caption_image, captions = [], []
  for image in range(13):
    for _ in range(1 + image % 3):
      caption_image.append(image)
      captions.append(vocab[int(rng.integers(len(vocab)))])
  caption_image = np.asarray(caption_image)
  first_text = [vocab.index(captions[list(caption_image).index(i)]) for i in range(13)]
  zimg = text_emb[first_text] + _quantised(rng, (13, 6))
  zimg[4] = zimg[3]
  ztxt = text_emb[[vocab.index(c) for c in captions]]
  return zimg, ztxt, caption_image, captions


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("which_mesh", ["mesh", "one_device_mesh"])
def test_recall_with_duplicate_captions_matches_numpy_reference(seed, which_mesh, request):
  mesh = request.getfixturevalue(which_mesh)
  zimg, ztxt, caption_image, captions = _duplicate_caption_set(seed)
  image_texts = [{c for c, i in zip(captions, caption_image) if i == image}
                 for image in range(len(zimg))]
  caption_texts = [{c} for c in captions]
  got = retrieval.recall_metrics(zimg, ztxt, caption_image, mesh, captions=captions)
  for k in (1, 5, 10):
    assert got[f"eval/i2t_recall@{k}"] == pytest.approx(
        _reference_text_recall(zimg, ztxt, image_texts, caption_texts, k))
    assert got[f"eval/t2i_recall@{k}"] == pytest.approx(
        _reference_text_recall(ztxt, zimg, caption_texts, image_texts, k))
  assert 0 < got["eval/i2t_recall@1"] < 1 and 0 < got["eval/t2i_recall@1"] < 1
  # Without the texts every caption is its own answer: the per-image rule of before.
  plain = retrieval.recall_metrics(zimg, ztxt, caption_image, mesh)
  for k in (1, 5, 10):
    assert plain[f"eval/i2t_recall@{k}"] == pytest.approx(
        _reference_recall(zimg, ztxt, k, np.arange(len(zimg)), caption_image))


def test_perfect_model_with_shared_captions_gets_full_recall(mesh):
  # Four identical images all captioned "a dog", four "a cat": a perfect model. By image
  # identity alone, i2t@1 would be 0 (the other copies tie and count as wrong).
  rng = np.random.default_rng(3)
  dog, cat = _quantised(rng, (2, 5))
  zimg = np.stack([dog] * 4 + [cat] * 4)
  captions = ["a dog"] * 4 + ["a cat"] * 4
  got = retrieval.recall_metrics(zimg, zimg.copy(), None, mesh, captions=captions)
  assert got["eval/i2t_recall@1"] == 1.0 and got["eval/t2i_recall@1"] == 1.0
  by_image = retrieval.recall_metrics(zimg, zimg.copy(), None, mesh)
  assert by_image["eval/i2t_recall@1"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicate_caption_count_matches_loop(seed):
  _, _, caption_image, captions = _duplicate_caption_set(seed)
  expected = sum(
      1 for j in range(len(captions))
      if any(captions[l] == captions[j] and caption_image[l] != caption_image[j]
             for l in range(len(captions))))
  got = retrieval.duplicate_captions(caption_image, retrieval.caption_text_ids(captions))
  assert got == expected and 0 < got < len(captions)
  assert retrieval.duplicate_captions(np.arange(3), retrieval.caption_text_ids("abc")) == 0


def test_embed_all_prepares_each_batch(mesh):
  x = np.arange(21 * 2 * 2 * 3, dtype=np.uint8).reshape(21, 2, 2, 3)
  seen = []

  def prepare(chunk):
    seen.append(len(chunk))
    return chunk.astype(np.float32) / 2

  out = common.embed_all(jax.jit(lambda p, v: v * p), 2.0, x, mesh, batch_size=16,
                         prepare=prepare)
  np.testing.assert_array_equal(np.asarray(out), x.astype(np.float32))
  assert seen == [16, 16]  # one full batch, one padded one: never the whole set at once
