"""VQA accuracy, exactly as the official VQAv2 evaluation defines it.

The reference is the GT-Vision-Lab/VQA repository,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, as of its 2021 commit "Fixed processing answers
bug" (which put the prediction's normalisation under the "answers differ" condition). This module
re-implements its rules; the behaviour, quirks included, is identical (checked against that file
on random answers, bit for bit):

1. Every answer, human or predicted, has newlines and tabs turned into spaces and is stripped.
2. Only when the human answers of a question are **not all identical** (after step 1) are the
   human answers and the prediction normalised (:func:`normalize_answer`). When all humans gave
   the same string, the prediction must equal it verbatim: humans all saying "yes." and a
   prediction "yes" scores 0.
3. For each human answer i, acc_i = min(1, (# of the *other* human answers equal to the
   prediction) / 3); the question's accuracy is the mean of acc_i over all its human answers.
   With 10 humans this is the average over the 10 leave-one-out subsets of 9. Fewer answers use
   the same formula (so a question with a single human answer always scores 0).
4. The overall accuracy is the mean over questions, and the per-answer-type accuracy the mean
   over that type's questions. The official code prints these x100 rounded to 2 decimals; here
   they are unrounded fractions in [0, 1].

Rule details of the normalisation are on :func:`normalize_answer`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

# Characters the punctuation rule deletes or turns into a space. The period is not among them:
# it has its own rule. Apostrophes, colons, '#', '$', '%', '&', '*', '~', '^', '|' are kept.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")

# A comma between two digits anywhere in the answer switches every punctuation mark to
# "delete" rather than "replace by a space". [0-9] rather than \d: the reference runs under
# Python 2, where \d without the UNICODE flag is ASCII only.
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")

# The reference meant "a period not between digits", but its look-behind is misspelt as a
# look-ahead for the text "<=" + digit, which can never match where a period is; what it does is
# delete every period that is not followed by a digit ("3.5" and ".5" keep theirs, "5." loses it).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?![0-9])")

# The reference passes re.UNICODE (== 32) in the position of re.sub's `count`, so at most the first
# 32 such periods of an answer are deleted. Reproduced for exactness; no real answer has that many.
_MAX_PERIODS_DELETED = 32

# Words replaced by digits. "none" -> "0" is part of the reference table too.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Word -> word with its apostrophe restored, transcribed entry by entry from the reference.
# Kept as it is there, oddities included: the capitalised keys ("Im", "Ive", "Id've", "I'dve")
# can never match because words are lowercased first; "let's" and "she's" map to themselves;
# "somebody'd" maps the *other* way, to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _clean_whitespace(text: str) -> str:
  """Step 1 of the rules: newlines and tabs become spaces, then strip (applied to every answer)."""
  return text.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
  """The reference's punctuation rule on an already whitespace-cleaned answer."""
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  result = text
  for mark in _PUNCTUATION:
    # The test looks at the answer as it came in, not at the partly processed result: a mark
    # next to a space (on either side) is deleted, a mark glued between words ("red/blue")
    # becomes a space so the words stay apart.
    if delete_all or mark + " " in text or " " + mark in text:
      result = result.replace(mark, "")
    else:
      result = result.replace(mark, " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=_MAX_PERIODS_DELETED)


def _canonical_words(text: str) -> str:
  """The reference's digit/article rule: lowercase, number words, articles, contractions."""
  words = []
  for word in text.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    # Articles are checked after the number mapping, contractions after article removal; the
    # order matters only for words that are in two tables, and none are.
    if word not in _ARTICLES:
      words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


def normalize_answer(text: str) -> str:
  """The official answer normalisation: punctuation rule, then digit/article rule.

  Applied after the whitespace clean-up every answer gets (newlines and tabs to spaces, strip),
  which is included here so that the result is exactly what the official code compares.

  Punctuation rule, for each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if the answer
  contains a comma between two digits anywhere, or that mark with a space before or after it,
  every occurrence of the mark is deleted; otherwise every occurrence becomes a space. So
  "1,000" -> "1000", "red, blue" -> "red blue", "red,blue" -> "red blue", "t-shirt" -> "t shirt".
  Then every period not followed by a digit is deleted ("yes." -> "yes", "3.5" is kept).

  Digit/article rule: lowercase, split on whitespace, map "none"/"zero".."ten" to "0".."10",
  drop "a", "an", "the", restore apostrophes of the contraction table ("dont" -> "don't"), and
  join with single spaces.

  Note that :func:`question_accuracy` applies this only to questions whose human answers are not
  all identical, as the official code does.
  """
  return _canonical_words(_strip_punctuation(_clean_whitespace(text)))


def _check_answers(answers: Sequence[str], where: str) -> None:
  # A bare string is a Sequence too; scoring its characters as answers would be silently wrong.
  if isinstance(answers, str):
    raise ValueError(f"{where}: answers must be a sequence of strings, got the string "
                     f"{answers!r}")
  if len(answers) == 0:
    raise ValueError(f"{where} has no ground-truth answers; every question needs at least one")


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy in [0, 1] of one predicted answer against the human answers of its question.

  mean over human answers i of min(1, #(other human answers equal to the prediction) / 3), with
  the normalisation applied only when the human answers are not all identical (module docstring).
  Raises ValueError when `answers` is empty.
  """
  _check_answers(answers, "the question")
  return _question_accuracy(prediction, answers)


def _question_accuracy(prediction: str, answers: Sequence[str]) -> float:
  humans = [_clean_whitespace(answer) for answer in answers]
  predicted = _clean_whitespace(prediction)
  # The official quirk: unanimous humans are compared verbatim, without normalisation.
  if len(set(humans)) > 1:
    humans = [_canonical_words(_strip_punctuation(answer)) for answer in humans]
    predicted = _canonical_words(_strip_punctuation(predicted))
  matches = sum(human == predicted for human in humans)
  # Leaving human i out removes one match exactly when human i itself matches.
  per_human = [min(1.0, (matches - (human == predicted)) / 3) for human in humans]
  return sum(per_human) / len(per_human)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 answer_types: Sequence[str] | None = None) -> dict[str, float]:
  """Official VQA accuracy of `predictions[q]` against the human answers `answers[q]`.

  Returns {'vqa_accuracy': mean of question_accuracy over questions (a fraction; the official
  code prints x100), 'vqa_examples': number of questions scored}, plus, when `answer_types` (one
  per question, e.g. 'yes/no', 'number', 'other') is given, 'vqa_accuracy/<type>' (mean over that
  type's questions) and 'vqa_examples/<type>' for each type present.

  Raises ValueError when the lengths differ, there are no questions, or a question has no answers
  (the message names its index).
  """
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions but answers for {len(answers)} questions; "
                     "give one prediction per question")
  if answer_types is not None and len(answer_types) != len(answers):
    raise ValueError(f"{len(answer_types)} answer types for {len(answers)} questions; give one "
                     "answer type per question")
  if len(answers) == 0:
    raise ValueError("no questions to score")
  scores = []
  for index, (prediction, question_answers) in enumerate(zip(predictions, answers)):
    _check_answers(question_answers, f"question {index}")
    scores.append(_question_accuracy(prediction, question_answers))
  metrics = {"vqa_accuracy": sum(scores) / len(scores), "vqa_examples": float(len(scores))}
  if answer_types is not None:
    by_type: dict[str, list[float]] = {}
    for answer_type, score in zip(answer_types, scores):
      by_type.setdefault(answer_type, []).append(score)
    for answer_type, type_scores in by_type.items():
      metrics[f"vqa_accuracy/{answer_type}"] = sum(type_scores) / len(type_scores)
      metrics[f"vqa_examples/{answer_type}"] = float(len(type_scores))
  return metrics
