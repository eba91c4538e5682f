"""Tests for vljax.evals.vqa: the official VQAv2 accuracy, checked on hand-worked examples.

Every expected value below is derived by hand from the rules of the official evaluation
(GT-Vision-Lab/VQA, vqaEval.py); the derivation is in the comment next to it.
"""
from __future__ import annotations

import pytest

from vljax.evals.vqa import normalize_answer, question_accuracy, vqa_accuracy


def _humans(matching: str, count: int, other: str = "dog", total: int = 10) -> list[str]:
  """`count` humans answering `matching`, the rest of `total` answering `other`."""
  return [matching] * count + [other] * (total - count)


# ---------------------------------------------------------------------------------------------
# Leave-one-out accuracy


def test_no_matching_human_scores_zero():
  # No subset of 9 contains the prediction: every acc_i = 0.
  assert question_accuracy("cat", _humans("cat", 0)) == 0.0


def test_one_matching_human():
  # Leaving out the matching human (1 subset): 0 matches -> 0.
  # Leaving out one of the 9 others: 1 match -> 1/3.   (1*0 + 9*1/3) / 10 = 0.3
  assert question_accuracy("cat", _humans("cat", 1)) == pytest.approx(0.3)


def test_two_matching_humans():
  # 8 subsets keep both matches -> 2/3; 2 subsets keep one -> 1/3.
  # (8*2/3 + 2*1/3) / 10 = 18/30 = 0.6
  assert question_accuracy("cat", _humans("cat", 2)) == pytest.approx(0.6)


def test_three_matching_humans_is_not_full_credit():
  # The "3 humans -> 100%" rule of thumb is not what the averaged formula gives with 10 humans:
  # 7 subsets keep all 3 matches -> 1; 3 subsets keep 2 -> 2/3.  (7*1 + 3*2/3) / 10 = 0.9
  assert question_accuracy("cat", _humans("cat", 3)) == pytest.approx(0.9)


@pytest.mark.parametrize("count", [4, 7, 10])
def test_four_or_more_matching_humans_score_one(count):
  # Every subset of 9 keeps at least 3 matches -> min(1, >=3/3) = 1 for all 10 subsets.
  assert question_accuracy("cat", _humans("cat", count)) == 1.0


def test_fewer_than_ten_answers_use_the_same_formula():
  # Humans: cat, cat, dog. Leaving out a cat: 1 match -> 1/3 (twice); leaving out the dog:
  # 2 matches -> 2/3.  (1/3 + 1/3 + 2/3) / 3 = 4/9
  assert question_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
  # Humans: cat, dog, dog, dog, dog. Leaving out the cat: 0 matches; leaving out a dog: 1 match
  # -> 1/3 (four times).  (0 + 4*1/3) / 5 = 4/15
  assert question_accuracy("cat", ["cat", "dog", "dog", "dog", "dog"]) == pytest.approx(4 / 15)


def test_single_human_answer_always_scores_zero():
  # Leaving out the only human leaves nobody to agree with: acc_1 = min(1, 0/3) = 0.
  assert question_accuracy("cat", ["cat"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Normalisation


@pytest.mark.parametrize("raw, expected", [
    # Lowercase, number word -> digit.
    ("Two", "2"),
    ("TEN", "10"),
    # "none" is in the official number table too.
    ("none", "0"),
    # Articles dropped.
    ("the dog", "dog"),
    ("A Dog", "dog"),
    ("an apple", "apple"),
    # Contraction table restores the apostrophe.
    ("dont", "don't"),
    ("Whats up", "what's up"),
    # Trailing period: not followed by a digit -> deleted.
    ("yes.", "yes"),
    ("5.", "5"),
    # Period followed by a digit is kept (the official look-behind is broken, so only the digit
    # after the period matters: ".5" keeps it, "a.b" loses it).
    ("3.5", "3.5"),
    (".5", ".5"),
    ("a.b", "ab"),
    # A comma between digits makes every punctuation mark be deleted, the comma included.
    ("1,000", "1000"),
    ("1,000 t-shirts", "1000 tshirts"),
    # Otherwise a mark glued between words becomes a space...
    ("t-shirt", "t shirt"),
    ("red,blue", "red blue"),
    # ...and a mark next to a space is deleted ("," has ", "; "/" has no space next to it).
    ("red, blue", "red blue"),
    ("red/blue, green", "red blue green"),
    ("yes!", "yes"),
    # Marks outside the list stay: apostrophe, colon, percent.
    ("it's 10:30", "it's 10:30"),
    ("50%", "50%"),
    # Newlines and tabs are spaces, the result is stripped and re-joined with single spaces.
    ("\thot\n dog \n", "hot dog"),
    # The table's capitalised keys never match: words are lowercased before the lookup.
    ("Im", "im"),
    # The table maps "somebody'd" away from the apostrophe form.
    ("somebody'd", "somebodyd"),
])
def test_normalize_answer(raw, expected):
  assert normalize_answer(raw) == expected


def test_at_most_32_periods_are_deleted():
  # The official code passes re.UNICODE (32) where re.sub takes `count`: of 40 periods, the
  # first 32 go and 8 remain.
  assert normalize_answer("." * 40) == "." * 8


def test_normalisation_makes_variants_match_when_humans_disagree():
  # Humans are not all identical, so humans and prediction are normalised: "Two", "two" and "2"
  # are all "2": 10 matches -> 1.0.
  humans = ["2"] * 5 + ["two"] * 4 + ["Two"]
  assert question_accuracy("Two", humans) == 1.0
  # "the dog" and "dog." both become "dog": 10 matches.
  assert question_accuracy("dog", ["the dog"] * 5 + ["dog."] * 5) == 1.0
  # "dont" becomes "don't"; 2 of 10 humans say it -> 0.6 as in test_two_matching_humans.
  assert question_accuracy("dont", ["don't"] * 2 + ["no"] * 8) == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------
# The all-identical-answers quirk


def test_unanimous_humans_are_compared_without_normalisation():
  # All 10 humans say "yes.": no normalisation happens, so "yes" != "yes." -> 0.
  assert question_accuracy("yes", ["yes."] * 10) == 0.0
  # ...while the verbatim answer gets full credit: 9 matches in every subset -> 1.
  assert question_accuracy("yes.", ["yes."] * 10) == 1.0
  # Case is not folded either.
  assert question_accuracy("yes", ["Yes"] * 10) == 0.0


def test_one_differing_human_switches_normalisation_on():
  # 9 "yes." and 1 "yes" differ, so everything is normalised to "yes": 10 matches -> 1.0.
  assert question_accuracy("yes", ["yes."] * 9 + ["yes"]) == 1.0


def test_identity_check_comes_after_whitespace_clean_up():
  # After newline/tab clean-up and strip the three humans are all "yes": unanimous, so "Yes" is
  # not lowercased -> 0.
  humans = ["yes", " yes\n", "yes\t"]
  assert question_accuracy("Yes", humans) == 0.0
  # The prediction is cleaned too: "yes\n" -> "yes"; each subset of 2 has 2 matches -> 2/3.
  assert question_accuracy("yes\n", humans) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Aggregation


def test_mean_over_questions():
  predictions = ["cat", "cat", "cat"]
  answers = [_humans("cat", 10), _humans("cat", 2), _humans("cat", 0)]
  metrics = vqa_accuracy(predictions, answers)
  # Per question 1.0, 0.6, 0.0 (the tests above); mean = 1.6 / 3.
  assert metrics["vqa_accuracy"] == pytest.approx(1.6 / 3)
  assert metrics["vqa_examples"] == 3
  assert set(metrics) == {"vqa_accuracy", "vqa_examples"}


def test_answer_type_breakdown():
  predictions = ["yes", "2", "no", "red"]
  answers = [["yes"] * 10,                # 1.0
             _humans("two", 2),           # "2" vs "two" -> normalised: 2 of 10 -> 0.6
             ["yes"] * 10,                # 0.0
             _humans("red", 1, "blue")]   # 1 of 10 -> 0.3
  answer_types = ["yes/no", "number", "yes/no", "other"]
  metrics = vqa_accuracy(predictions, answers, answer_types=answer_types)
  assert metrics["vqa_accuracy"] == pytest.approx((1.0 + 0.6 + 0.0 + 0.3) / 4)
  assert metrics["vqa_examples"] == 4
  assert metrics["vqa_accuracy/yes/no"] == pytest.approx(0.5)   # (1.0 + 0.0) / 2
  assert metrics["vqa_accuracy/number"] == pytest.approx(0.6)
  assert metrics["vqa_accuracy/other"] == pytest.approx(0.3)
  assert metrics["vqa_examples/yes/no"] == 2
  assert metrics["vqa_examples/number"] == 1
  assert metrics["vqa_examples/other"] == 1


# ---------------------------------------------------------------------------------------------
# Errors


def test_length_mismatch_raises():
  with pytest.raises(ValueError, match="2 predictions but answers for 1"):
    vqa_accuracy(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="1 answer types for 2 questions"):
    vqa_accuracy(["a", "b"], [["a"], ["b"]], answer_types=["other"])


def test_question_without_answers_raises_with_its_index():
  with pytest.raises(ValueError, match="question 1 has no ground-truth answers"):
    vqa_accuracy(["a", "b", "c"], [["a"], [], ["c"]])
  with pytest.raises(ValueError, match="no ground-truth answers"):
    question_accuracy("a", [])


def test_bare_string_as_answers_raises():
  # "yes" would otherwise be scored as the three answers "y", "e", "s".
  with pytest.raises(ValueError, match="question 0: answers must be a sequence"):
    vqa_accuracy(["y"], ["yes"])


def test_no_questions_raises():
  with pytest.raises(ValueError, match="no questions"):
    vqa_accuracy([], [])
