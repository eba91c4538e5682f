"""Tests for vljax.evals.captioning against the COCO toolkit (pycocoevalcap)."""

import math
import random
import shutil

import pytest

from vljax.evals import captioning

# The reference toolkit is a test dependency (setup.py extra "test"): a missing install fails.
from pycocoevalcap.bleu import bleu as bleu_module  # noqa: E402
from pycocoevalcap.cider import cider as cider_module  # noqa: E402

_TOL = 1e-9


def _toolkit_scores(references, candidates):
  """BLEU-1..4 and CIDEr-D from the toolkit on pre-tokenised captions."""
  gts = {i: list(refs) for i, refs in enumerate(references)}
  res = {i: [cand] for i, cand in enumerate(candidates)}
  bleus, _ = bleu_module.Bleu(4).compute_score(gts, res, verbose=0)
  cider, cider_per_image = cider_module.Cider().compute_score(gts, res)
  return bleus, cider, cider_per_image


def _random_corpus(num_images, seed):
  """Random captions over a small vocabulary (lots of shared n-grams)."""
  rng = random.Random(seed)
  words = ("a the man woman dog cat sitting on table with red blue two "
           "riding wave surfboard near street of in").split()

  def sentence():
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))

  references = [[sentence() for _ in range(rng.randint(1, 5))]
                for _ in range(num_images)]
  candidates = [sentence() if rng.random() > 0.05 else ""
                for _ in range(num_images)]
  return references, candidates


_CASES = {
    "identical": ([["a man riding a wave on a surfboard"],
                   ["two dogs playing in the snow"]],
                  ["a man riding a wave on a surfboard",
                   "two dogs playing in the snow"]),
    "no_overlap": ([["a man riding a wave"], ["two dogs in snow"]],
                   ["purple elephants fly", "green cars"]),
    "different_lengths": ([["a cat", "a small cat sitting on a red chair"],
                           ["a dog running"]],
                          ["a small cat sitting on a chair near a window",
                           "dog"]),
    "multiple_references": (
        [["a man riding a wave on top of a surfboard",
          "a surfer riding a large wave in the ocean",
          "a person on a surfboard riding a wave",
          "man surfing a wave",
          "a surfer in a black wetsuit rides a wave"],
         ["a cat sitting on a laptop keyboard",
          "a cat lying on a computer",
          "a kitten on a laptop"],
         ["a red bus driving down a street"]],
        ["a surfer riding a wave", "a cat on a laptop", "a bus on a street"]),
    "repeated_ngrams": ([["the cat is on the mat", "there is a cat on the mat"],
                         ["the the dog", "a dog"]],
                        ["the the the the the the the",
                         "the the the dog dog"]),
    "empty_candidate": ([["a man riding a wave"], ["two dogs in snow"],
                         ["a cat"]],
                        ["", "two dogs in the snow", "cat"]),
    "random_50": _random_corpus(50, seed=0),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_matches_toolkit(name):
  references, candidates = _CASES[name]
  want_bleu, want_cider, want_per_image = _toolkit_scores(
      references, candidates)
  got_bleu = captioning.bleu(references, candidates, n=4)
  got_cider, got_per_image = captioning.cider_d(references, candidates)
  assert got_bleu == pytest.approx(want_bleu, abs=_TOL, rel=0)
  assert got_cider == pytest.approx(want_cider, abs=_TOL, rel=0)
  assert got_per_image.shape == (len(candidates),)
  assert list(got_per_image) == pytest.approx(
      list(want_per_image), abs=_TOL, rel=0)


def test_bleu4_worked_example():
  # Candidate "the cat sat on" (c = 4), one reference "the cat sat on the
  # mat" (r = 6). Every candidate n-gram occurs in the reference:
  #   p1 = 4/4, p2 = 3/3, p3 = 2/2, p4 = 1/1  -> geometric mean = 1.
  # Brevity penalty: c < r -> exp(1 - r/c) = exp(1 - 6/4) = exp(-0.5).
  # BLEU-4 = 1 * exp(-0.5) = 0.60653066 (smoothing constants change it by
  # ~1e-9 relative).
  scores = captioning.bleu([["the cat sat on the mat"]], ["the cat sat on"])
  assert scores[3] == pytest.approx(math.exp(-0.5), rel=1e-8)


def test_bleu1_clipping_worked_example():
  # Candidate "the the the the" vs reference "the cat is on the mat":
  # "the" occurs 4 times but only 2 times in the reference -> clipped
  # p1 = 2/4. BP = exp(1 - 6/4). BLEU-1 = 0.5 * exp(-0.5) = 0.30326533.
  # No candidate bigram matches, so BLEU-2..4 are ~0 (p2 = 1e-15/3).
  scores = captioning.bleu([["the cat is on the mat"]], ["the the the the"])
  assert scores[0] == pytest.approx(0.5 * math.exp(-0.5), rel=1e-8)
  assert scores[3] < 1e-6


def test_cider_worked_example():
  # Two images: refs ["a dog"] / ["a cat"], candidates equal to the refs.
  # log(#images) = log 2. df("a") = 2 -> idf weight log2 - log2 = 0;
  # df("dog") = df("a dog") = 1 -> weight log 2. Unigram and bigram tf-idf
  # vectors of candidate and reference coincide -> cosine 1 for n = 1, 2;
  # no 3/4-grams -> 0. Equal lengths -> penalty 1.
  # CIDEr-D = 10 * mean([1, 1, 0, 0]) = 5 for each image.
  mean, per_image = captioning.cider_d([["a dog"], ["a cat"]],
                                       ["a dog", "a cat"])
  assert mean == pytest.approx(5.0, abs=1e-12)
  assert list(per_image) == pytest.approx([5.0, 5.0], abs=1e-12)


def test_cider_single_image_is_zero():
  # With one image log(#images) = log(1) = 0 and every df is 1 -> all
  # weights are 0, a known property of the definition.
  mean, _ = captioning.cider_d([["a dog runs"]], ["a dog runs"])
  assert mean == 0.0


def test_mismatched_lengths_raise():
  with pytest.raises(ValueError, match=r"2 references vs 1 candidates"):
    captioning.compute_scores([["a"], ["b"]], ["a"])
  with pytest.raises(ValueError, match=r"1 references vs 2 candidates"):
    captioning.bleu([["a"]], ["a", "b"])
  with pytest.raises(ValueError, match=r"1 references vs 2 candidates"):
    captioning.cider_d([["a"]], ["a", "b"])


def test_compute_scores_raw_captions():
  references = [["A man riding a wave on top of a surfboard.",
                 "A surfer rides a big wave!"],
                ["Two dogs don't like the cat's toy.", "Dogs, playing."]]
  candidates = ["A man riding a wave.", ""]
  scores = captioning.compute_scores(references, candidates)
  assert set(scores) == {"bleu4", "cider"}
  tok_refs = [[captioning.ptb_tokenize(r) for r in refs]
              for refs in references]
  tok_cands = [captioning.ptb_tokenize(c) for c in candidates]
  want_bleu, want_cider, _ = _toolkit_scores(tok_refs, tok_cands)
  assert scores["bleu4"] == pytest.approx(want_bleu[3], abs=_TOL, rel=0)
  assert scores["cider"] == pytest.approx(want_cider, abs=_TOL, rel=0)


# Hand-written expectations following the PTB rules (checked against the
# Stanford tokenizer 3.4.1 used by the toolkit). Runs without Java.
_TOKENISATION = [
    ("A man riding a wave on top of a surfboard.",
     "a man riding a wave on top of a surfboard"),
    ("Two dogs don't like the cat's toy!",
     "two dogs do n't like the cat 's toy"),
    ("I can't, won't; it's we're they've I'd he'll I'm",
     "i ca n't wo n't it 's we 're they 've i 'd he 'll i 'm"),
    ("cannot gonna wanna", "can not gon na wan na"),
    ("A black-and-white photo (taken in 1990) of a bus -- very old.",
     "a black-and-white photo -lrb- taken in 1990 -rrb- of a bus very old"),
    ('He said "hello" to the U.S. team... and left',
     "he said hello to the u.s. team and left"),
    ("Kids' toys: red, blue & green [small] {big}",
     "kids toys red blue & green -lsb- small -rsb- -lcb- big -rcb-"),
    ("A 3.5-inch screen, 1,000 people/day at 5:30pm, 50% off $10",
     "a 3.5-inch screen 1,000 people/day at 5:30 pm 50 % off $ 10"),
    ("A woman\u2019s hat \u2014 \u201cquoted\u201d",
     "a woman 's hat quoted"),
    ("Mr. Smith and Dr. Jones at the St. Louis arch.",
     "mr. smith and dr. jones at the st. louis arch"),
    ("wow!! what?! ok... dog.", "wow !! what ?! ok dog"),
    ("a dog,cat and cat;dog", "a dog cat and cat dog"),
    ("the '90s, A. Smith", "the '90s a. smith"),
    ("A BUS. A TRAIN.", "a bus a train"),
    ("", ""),
]


@pytest.mark.parametrize("text,expected", _TOKENISATION)
def test_ptb_tokenize_hand_written(text, expected):
  assert captioning.ptb_tokenize(text) == expected


_REALISTIC_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs don't like the cat's toy!",
    "A woman's hat and a man's coat.",
    "The kids' toys are on the floor, near the T.V.",
    "A black-and-white photo (taken in 1990) of a bus -- very old.",
    'A sign that says "STOP" on a pole.',
    "It's a 10-year-old boy; he's holding a frisbee.",
    "Mr. Smith is standing on St. Mark's Square at 5:30pm.",
    "What a view! Isn't it nice?",
    "A group of people standing around a table with food on it",
    "a cat sitting on a laptop computer keyboard .",
    "Two zebras, a giraffe & an elephant [in a zoo].",
    "An old-fashioned clock reads 3:45, e.g. late afternoon...",
    "The U.S. flag flies over a 2-story building.",
    "A baseball player swings at the ball; the catcher waits.",
    "People can't wait for the bus -- it's late!",
    "A plate of food: rice, beans, and chicken.",
    "They're walking down the street with their dogs'  leashes.",
    "A TRAIN PULLING INTO THE STATION.",
    "A close-up of a pizza with pepperoni and cheese",
    "a man 's hat",
]


def test_ptb_tokenize_matches_java_tokenizer():
  # The toolkit's tokenizer is a Java program; the machines this project runs on have Java.
  assert shutil.which("java"), "the COCO toolkit's PTBTokenizer needs a java executable"
  from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=g-import-not-at-top
  captions = {i: [{"caption": c}] for i, c in enumerate(_REALISTIC_CAPTIONS)}
  want = ptbtokenizer.PTBTokenizer().tokenize(captions)
  got = {i: [captioning.ptb_tokenize(c)]
         for i, c in enumerate(_REALISTIC_CAPTIONS)}
  assert got == want
