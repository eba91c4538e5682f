"""ITM re-ranking of ITC retrieval candidates against a dense single-device reference."""
import numpy as np
import pytest

from vljax import sharding
from vljax.configlib import ConfigError
from vljax.evals import rerank, retrieval


def _unit(rng, n, d=8):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dense_reference(itc, itm, relevant, k, recall_at=(1, 5, 10)):
  """Per query: the k best keys by ITC, ranked by ITM, then every other key; recall@K counts a
  query whose best relevant key has fewer than K wrong keys ranked at or above it."""
  hits = {at: 0 for at in recall_at}
  for q in range(itc.shape[0]):
    cand = np.argsort(-itc[q], kind="stable")[:k]
    score = np.full(itc.shape[1], -np.inf)
    score[cand] = itm[q, cand]
    rel = relevant[q]
    if not rel[cand].any():
      continue
    best = score[rel].max()
    rank = np.sum((score >= best) & ~rel)
    for at in recall_at:
      hits[at] += rank < at
  return {at: hits[at] / itc.shape[0] for at in recall_at}


@pytest.fixture(scope="module")
def mesh8():
  return sharding.make_mesh({"data": 4, "fsdp": 2})


def test_reranked_recalls_match_dense_reference(mesh8):
  rng = np.random.default_rng(0)
  n_img, k = 23, 12  # 23 does not divide 8 devices: padded query rows must not count
  # Two captions per image, a few texts shared by two images (equivalent answers).
  caption_image = np.repeat(np.arange(n_img), 2)
  captions = [f"caption {i}" for i in range(2 * n_img)]
  captions[5] = captions[30]  # images 2 and 15 share a caption text
  captions[8] = captions[9]  # image 4's two captions are one text
  zimg, ztxt = _unit(rng, n_img), _unit(rng, 2 * n_img)
  itm = rng.normal(size=(n_img, 2 * n_img)).astype(np.float32)  # any pair score
  got = rerank.reranked_recall_metrics(lambda i, t: itm[i, t], zimg, ztxt, caption_image, k,
                                       mesh8, captions=captions)
  text_ids = retrieval.caption_text_ids(captions)
  image_texts = retrieval.image_text_ids(caption_image, text_ids, n_img)
  rel_i2t = np.array([[t in set(image_texts[i]) for t in text_ids] for i in range(n_img)])
  want_i2t = _dense_reference(zimg @ ztxt.T, itm, rel_i2t, k)
  want_t2i = _dense_reference(ztxt @ zimg.T, itm.T, rel_i2t.T, k)
  for at in (1, 5, 10):
    assert got[f"eval/i2t_recall@{at}"] == pytest.approx(want_i2t[at])
    assert got[f"eval/t2i_recall@{at}"] == pytest.approx(want_t2i[at])
  # The re-ranking really changed something: differs from the ITC-only recall.
  itc = retrieval.recall_metrics(zimg, ztxt, caption_image, mesh8, captions=captions)
  assert any(got[key] != itc[key] for key in itc)


def test_itc_scores_as_itm_give_the_itc_recalls(mesh8):
  # Re-ranking the candidates by their own ITC similarity changes nothing at K <= k.
  rng = np.random.default_rng(1)
  zimg, ztxt = _unit(rng, 40), _unit(rng, 40)
  sims = zimg @ ztxt.T
  got = rerank.reranked_recall_metrics(lambda i, t: sims[i, t], zimg, ztxt, None, 10, mesh8)
  want = retrieval.recall_metrics(zimg, ztxt, None, mesh8)
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key


def test_perfect_itm_recovers_any_candidate_and_k_is_capped(mesh8):
  rng = np.random.default_rng(2)
  zimg, ztxt = _unit(rng, 16), _unit(rng, 16)
  perfect = lambda i, t: (i == t).astype(np.float32)
  # k = the whole set (capped at 16 keys): a perfect ITM head finds every pair at rank 0.
  got = rerank.reranked_recall_metrics(perfect, zimg, ztxt, None, 1000, mesh8)
  assert all(v == 1.0 for v in got.values()), got
  # With k = 10 only queries whose positive is an ITC candidate can be found.
  got = rerank.reranked_recall_metrics(perfect, zimg, ztxt, None, 10, mesh8)
  in_top10 = np.mean([i in np.argsort(-(zimg @ ztxt.T)[i])[:10] for i in range(16)])
  assert got["eval/i2t_recall@1"] == pytest.approx(in_top10)


def test_ties_with_a_wrong_candidate_are_misses():
  scores = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
  relevant = np.array([[False, True, False], [False, False, False]])
  assert rerank.ranked_recalls(scores, relevant, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 0.5}


def test_k_below_the_largest_recall_is_refused():
  with pytest.raises(ConfigError, match="itm_rerank_k=5"):
    rerank.check_k(5)
  assert rerank.check_k(10) == 10
