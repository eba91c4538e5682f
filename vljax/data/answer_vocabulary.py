"""The answer vocabulary of classifier VQA (VLMo, BEiT-3): which answers the head can give, and
the soft score of each for a question.

Vocabulary. Every training question votes for its answer: the one most of its humans gave,
after the official normalisation (vljax.evals.vqa.normalize_answer; ties broken by the
normalised string, so the smallest one wins). The K answers with the most votes make the
vocabulary, most voted first, ties broken by the answer string: the same data and K give the
same vocabulary, in the same order, on every machine. Answer 0 is the most common training
answer (the evaluator's prior baseline).

VLMo and BEiT-3 count VQAv2's `multiple_choice_answer` (the annotators' most common answer)
over train and val and keep the answers with at least 9 votes, which gives 3,129; records here
carry the 10 human answers only, so their most common normalised one stands in for it, and the
cut is a count K (config.vqa.num_answers) over the training source.

Soft scores (VLMo's and BEiT-3's `get_score`, ViLT's before them): for a vocabulary answer a
given by `count` of a question's humans, score(a) = min(1, 0.3 * count), i.e. 0.3, 0.6, 0.9,
then 1.0 from 4 humans on. With 10 human answers this is exactly the official VQAv2 accuracy
of answering a (the mean over the 10 leave-one-out subsets of min(1, matches / 3)), whereas
min(1, count / 3) would be the accuracy against all 10 at once. Answers are counted after
normalisation (BEiT-3 counts the raw strings against its normalised vocabulary). A question
whose answers are all outside the vocabulary scores 0 everywhere: a zero target.

The vocabulary of a run is kept in WORKDIR/answer_vocabulary.json (with the votes, and how many
questions have an answer in it), so that a resumed run and an evaluation read it back instead
of counting again.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vljax.data import formats
from vljax.data import preprocess
from vljax.data import tokenizer as tokenizer_lib
from vljax.evals import vqa

FILENAME = "answer_vocabulary.json"

# score(count) = min(1, SCORE_PER_HUMAN * count): VLMo / BEiT-3's get_score.
SCORE_PER_HUMAN = 0.3


@functools.lru_cache(maxsize=1 << 16)
def normalized(answer: str) -> str:
  """vljax.evals.vqa.normalize_answer, memoised: VQAv2's ~4M training answers are mostly a few
  thousand strings ('yes', '2', ...)."""
  return vqa.normalize_answer(answer)


def majority_answer(answers: Sequence[str]) -> str | None:
  """The normalised answer most of `answers` give (ties: the smallest string); None when no
  answer survives normalisation (e.g. only '.')."""
  counts = collections.Counter(a for a in map(normalized, answers) if a)
  if not counts:
    return None
  return min(counts, key=lambda a: (-counts[a], a))


@dataclasses.dataclass(frozen=True)
class AnswerVocabulary:
  """The K most voted normalised answers of a training set.

  Attributes:
    answers: the vocabulary, class id = position; most voted first, ties by the string.
    votes: how many training questions have each as their majority answer.
    max_answers: the K asked for (the vocabulary is shorter when the data has fewer answers).
    questions: the training questions counted (with a usable question and an answer).
    covered: of them, those with at least one human answer in the vocabulary (the others
      train on a zero target).
    source: the training source it was counted on (config.data.train).
  """
  answers: tuple[str, ...]
  votes: tuple[int, ...]
  max_answers: int
  questions: int
  covered: int
  source: str = ""

  def index(self) -> dict[str, int]:
    return {answer: i for i, answer in enumerate(self.answers)}


def build(answer_lists: Iterable[Sequence[str]], max_answers: int,
          source: str = "") -> AnswerVocabulary:
  """The vocabulary of the `max_answers` most voted answers of these questions' human answers
  (module docstring). Questions without a normalisable answer are not counted."""
  if max_answers < 1:
    raise ValueError(f"an answer vocabulary needs max_answers >= 1, got {max_answers}")
  votes: collections.Counter = collections.Counter()
  questions: list[set[str]] = []
  for answers in answer_lists:
    majority = majority_answer(answers)
    if majority is None:
      continue
    votes[majority] += 1
    questions.append({normalized(a) for a in answers})
  kept = sorted(votes, key=lambda a: (-votes[a], a))[:max_answers]
  in_vocabulary = set(kept)
  return AnswerVocabulary(
      answers=tuple(kept), votes=tuple(votes[a] for a in kept), max_answers=max_answers,
      questions=len(questions),
      covered=sum(1 for given in questions if given & in_vocabulary), source=source)


def answer_scores(answers: Sequence[str], index: Mapping[str, int], size: int) -> np.ndarray:
  """float32 [size]: min(1, 0.3 * count) at each vocabulary answer `count` of `answers` give
  (after normalisation), 0 elsewhere; all zeros when none is in the vocabulary."""
  scores = np.zeros(size, np.float32)
  for answer, count in collections.Counter(map(normalized, answers)).items():
    if answer in index:
      scores[index[answer]] = min(1.0, SCORE_PER_HUMAN * count)
  return scores


def read_training_answers(source: Any, max_questions: int, seed: int,
                          text_options: preprocess.TextOptions) -> tuple[list[list[str]], int]:
  """(the human answers of each usable training question, records skipped), reading texts
  only (no image is decoded).

  The answers are cleaned as the training pipeline cleans them (`text_options`); a record
  counts when it has a usable question and at least one answer, as training takes it.
  `max_questions` > 0 reads a random sample of that many records drawn with `seed` (the
  synthetic source has 2**20); 0 reads every record of every mixture component.
  """
  plan = tokenizer_lib.sample_plan(source, max_questions if max_questions > 0 else 2**62,
                                   np.random.default_rng(seed))
  lists, skipped = [], 0
  for part, indices in plan:
    read = tokenizer_lib.text_reader(part)
    for i in indices.tolist():
      try:
        fields = read(i)
        question = fields.get("question")
        answers = preprocess.captions_list(formats.answer_list(fields.get("answers")),
                                           text_options)
        preprocess.clean_caption(question, text_options)  # BadRecord if unusable
      except Exception:  # pylint: disable=broad-except
        # An unreadable record is one training skips too: it has no vote.
        skipped += 1
        continue
      if answers:
        lists.append(answers)
  return lists, skipped


def save(directory: str, vocabulary: AnswerVocabulary) -> str:
  """Writes DIRECTORY/answer_vocabulary.json (atomically); returns its path."""
  path = os.path.join(directory, FILENAME)
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(dataclasses.asdict(vocabulary), f, indent=1)
  os.replace(tmp, path)
  return path


def load(directory: str) -> AnswerVocabulary | None:
  """DIRECTORY/answer_vocabulary.json, or None when there is none."""
  path = os.path.join(directory, FILENAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    data = json.load(f)
  fields = {f.name for f in dataclasses.fields(AnswerVocabulary)}
  data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
  return AnswerVocabulary(**data)
