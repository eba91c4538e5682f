"""Captioning metrics: corpus BLEU-1..4 and CIDEr-D as defined by the COCO toolkit.

The definitions follow the COCO caption evaluation toolkit (pycocoevalcap):

* Tokenisation: Stanford PTBTokenizer (CoreNLP 3.4.1, ``-preserveLines
  -lowerCase``) followed by removal of the toolkit's fixed punctuation-token
  list. :func:`ptb_tokenize` is a pure-Python re-implementation that matches it
  on ordinary English captions.
* BLEU (Papineni et al., 2002) with the toolkit's corpus aggregation: clipped
  n-gram counts and lengths are summed over all images, the effective
  reference length of each image is the reference length closest to the
  candidate length (ties go to the shorter one), and the toolkit's smoothing
  constants (1e-15 added to numerators, 1e-9 to denominators) are applied.
* CIDEr-D (Vedantam et al., 2015) with document frequencies over the
  references of the evaluated set, Gaussian length penalty (sigma = 6),
  clipping of candidate tf-idf by the reference values and x10 scaling.

:func:`bleu` and :func:`cider_d` take *already tokenised* captions (tokens
separated by whitespace), exactly like the toolkit's ``Bleu`` and ``Cider``
scorers; :func:`compute_scores` tokenises raw captions first.

Known differences of :func:`ptb_tokenize` from the Java tokenizer (all rare in
captions): HTML/XML-like tags (``<b>``), URLs and e-mail addresses followed by
punctuation, unicode fractions (``½`` -> ``1/2``), ``&amp;``-style entities,
exotic unicode punctuation/quotes beyond the common curly quotes and dashes,
``..`` (two dots), ``rock'n'roll``-style clitics, ``I'ma``, and the exact
membership of the PTB lexer's abbreviation lists (which words keep a final
period, e.g. ``st.`` vs. ``approx .``).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import math
import re

import numpy as np

# Tokens the toolkit deletes after PTB tokenisation. The comparison is exact
# and case-sensitive; since the tokenizer runs with -lowerCase, bracket tokens
# come out as "-lrb-" etc. and are therefore *kept* by the toolkit.
_TOOLKIT_PUNCTUATION = frozenset([
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
    ",", ":", "-", "--", "...", ";",
])

# Unicode punctuation the PTB lexer maps onto its ASCII forms.
_UNICODE_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": "--", "\u2014": "--", "\u2015": "--",
    "\u2026": "...", "\u00a0": " ",
})

_BRACKETS = {
    "(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-",
    "}": "-RCB-",
}

# Words after which a period stays attached (a subset of the PTB lexer's
# abbreviation lists; matched case-insensitively, as observed for 3.4.1).
_ABBREVIATIONS = frozenset("""
    mr mrs ms miss dr drs prof profs sen sens rep reps atty attys lt col gen
    messrs gov govs adm rev maj sgt cpl pvt mt capt st ste ave pres lieut hon
    brig cmdr comdr pfc spc supt supts det mme mlle jr sr bros blvd rd esq
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu
    thurs fri inc co cos corp ltd plc bancorp dept assn univ intl sys no nos
    prop ph tel est ext sq ft etc al seq vs fig figs ca bldg pp op art
""".split())

# Whole words the lexer splits in two (position of the split).
_SPLIT_WORDS = {
    "cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "gimme": 3, "lemme": 3,
}

_CLITIC_RE = re.compile(r"(?i)(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")
_ACRONYM_RE = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_TIME_SUFFIX_RE = re.compile(r"(\d+:\d+)([^\W\d_]+)")

# Alternatives are tried in order at each position of a whitespace-free chunk.
_ALNUM = r"[^\W_]"
_TOKEN_RE = re.compile(
    r"(?P<ellipsis>\.\.\.+)"
    r"|(?P<dashes>--+)"
    r"|(?P<quote>``|''|\")"
    r"|(?P<bracket>[()\[\]{}])"
    r"|(?P<bang>[!?]+)"
    # Apostrophe-initial tokens: "'90s", "'em", a detached clitic ("cat 's"),
    # and "'t" of "'tis"/"'twas".
    r"|(?P<lead>(?i:'(?:\d\ds|em|s|m|d|re|ve|ll)|n't)(?!\w)"
    r"|'[tT](?=(?:[iI][sS]|[wW][aA][sS])\b))"
    # Words: alphanumerics joined by hyphens, periods, slashes, '&', '@',
    # apostrophes before letters, and commas/colons between digits; a '#' or
    # '@' prefix stays attached when a letter follows (hashtags, handles).
    rf"|(?P<word>(?:[#@](?=[^\W\d_]))?{_ALNUM}+"
    rf"(?:(?:[-./&@]|'(?=[^\W\d_])|(?<=\d)[,:](?=\d)){_ALNUM}+)*)"
    r"|(?P<other>.)",
    re.UNICODE,
)


def _split_word(word: str) -> list[str]:
  """Splits contractions, clitics and time suffixes off one word token."""
  lower = word.lower()
  if lower in _SPLIT_WORDS:
    cut = _SPLIT_WORDS[lower]
    return [word[:cut], word[cut:]]
  if lower == "y'all":
    return [word[:2], word[2:]]
  time_match = _TIME_SUFFIX_RE.fullmatch(word)
  if time_match:
    return [time_match.group(1), time_match.group(2)]
  suffixes = []
  # Peel clitics from the right so that "don't's" -> "do n't 's".
  while True:
    match = _CLITIC_RE.fullmatch(word)
    if not match:
      break
    word, clitic = match.group(1), match.group(2)
    suffixes.insert(0, clitic)
  return [word] + suffixes


def _keeps_period(word: str) -> bool:
  """Whether a period directly after `word` belongs to it (abbreviations)."""
  if len(word) == 1 and word.isalpha():
    return True  # Initials: "A. Smith".
  if _ACRONYM_RE.fullmatch(word):
    return True  # "u.s." / "e.g." / "a.m.".
  return word.lower() in _ABBREVIATIONS


def _tokenize_chunk(chunk: str) -> list[str]:
  """PTB-tokenises a string without whitespace (original case)."""
  tokens = []
  pos = 0
  while pos < len(chunk):
    match = _TOKEN_RE.match(chunk, pos)
    kind, text = match.lastgroup, match.group()
    pos = match.end()
    if kind == "ellipsis":
      tokens.append("...")
    elif kind == "dashes":
      tokens.append("--")
    elif kind == "quote":
      tokens.append("''")
    elif kind == "bracket":
      tokens.append(_BRACKETS[text])
    elif kind == "word":
      if (chunk.startswith(".", pos) and not chunk.startswith("...", pos)
          and _keeps_period(text)):
        text += "."
        pos += 1
      tokens.extend(_split_word(text))
    else:  # "bang", "lead" and single "other" characters are tokens as is.
      tokens.append(text)
  return tokens


def ptb_tokenize(text: str) -> str:
  """Tokenises a caption like the COCO toolkit's PTBTokenizer + punctuation removal.

  Args:
    text: A raw caption.

  Returns:
    Lower-cased tokens separated by single spaces, with the toolkit's
    punctuation tokens removed (e.g. "Two dogs don't run." -> "two dogs do
    n't run").
  """
  text = text.translate(_UNICODE_MAP)
  tokens = []
  for chunk in text.split():
    tokens.extend(_tokenize_chunk(chunk))
  # Lower-case before filtering, as the Java tokenizer does (-lowerCase).
  return " ".join(t.lower() for t in tokens
                  if t.lower() not in _TOOLKIT_PUNCTUATION)


def _check_inputs(references: Sequence[Sequence[str]],
                  candidates: Sequence[str]) -> None:
  """Validates the shapes of the metric inputs."""
  if isinstance(candidates, str):
    raise TypeError("candidates must be a list of strings, not a string")
  if len(references) != len(candidates):
    raise ValueError(
        f"references and candidates differ in length: {len(references)} "
        f"references vs {len(candidates)} candidates")
  if not candidates:
    raise ValueError("at least one candidate/references pair is required")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(
          f"references[{i}] must be a non-empty list of reference strings")


def _ngrams(tokens: Sequence[str], max_n: int) -> collections.Counter:
  """Counts all n-grams of orders 1..max_n (as tuples)."""
  counts = collections.Counter()
  for k in range(1, max_n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i:i + k])] += 1
  return counts


def bleu(references: Sequence[Sequence[str]], candidates: Sequence[str],
         n: int = 4) -> list[float]:
  """Corpus BLEU-1..n of tokenised captions, as the toolkit's ``Bleu(n)``.

  Args:
    references: For each image, a non-empty list of tokenised references
      (tokens separated by whitespace).
    candidates: For each image, one tokenised candidate caption.
    n: Maximum n-gram order.

  Returns:
    [BLEU-1, ..., BLEU-n] over the whole corpus.

  Raises:
    ValueError: If the inputs differ in length or are empty.
  """
  _check_inputs(references, candidates)
  # Constants of the toolkit: numerators get `tiny` so that zero matches give
  # ~0 instead of log(0); denominators get `small` against division by zero.
  tiny, small = 1e-15, 1e-9
  correct = [0] * n
  guess = [0] * n
  cand_len_total = 0
  ref_len_total = 0
  for refs, cand in zip(references, candidates):
    cand_tokens = cand.split()
    cand_len = len(cand_tokens)
    ref_tokens = [r.split() for r in refs]
    # Clip each n-gram by its maximum count in any single reference.
    max_ref_counts = collections.Counter()
    for tokens in ref_tokens:
      max_ref_counts |= _ngrams(tokens, n)
    for ngram, count in _ngrams(cand_tokens, n).items():
      correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
    for k in range(n):
      guess[k] += max(0, cand_len - k)
    cand_len_total += cand_len
    ref_len_total += min((abs(len(t) - cand_len), len(t)) for t in ref_tokens)[1]

  scores = []
  precision_product = 1.0
  for k in range(n):
    precision_product *= (correct[k] + tiny) / (guess[k] + small)
    scores.append(precision_product**(1.0 / (k + 1)))
  ratio = (cand_len_total + tiny) / (ref_len_total + small)
  if ratio < 1:
    brevity_penalty = math.exp(1 - 1 / ratio)
    scores = [s * brevity_penalty for s in scores]
  return scores


def _tfidf(counts: collections.Counter, doc_freq: collections.Counter,
           log_num_docs: float, n: int):
  """Maps n-gram counts to per-order tf-idf dicts and their L2 norms."""
  vecs = [{} for _ in range(n)]
  norms = [0.0] * n
  for ngram, term_freq in counts.items():
    order = len(ngram) - 1
    weight = term_freq * (log_num_docs - math.log(max(1.0, doc_freq[ngram])))
    vecs[order][ngram] = weight
    norms[order] += weight * weight
  return vecs, [math.sqrt(x) for x in norms]


def _cider_length(num_tokens: int) -> int:
  """Sentence length used in the Gaussian penalty.

  The toolkit measures length as the number of bigrams (len - 1, and 0 for
  captions of at most one token); reproduced for exact agreement.
  """
  return max(0, num_tokens - 1)


def cider_d(references: Sequence[Sequence[str]], candidates: Sequence[str],
            n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
  """CIDEr-D of tokenised captions, as the toolkit's ``Cider()``.

  Args:
    references: For each image, a non-empty list of tokenised references
      (tokens separated by whitespace).
    candidates: For each image, one tokenised candidate caption.
    n: Maximum n-gram order.
    sigma: Standard deviation of the Gaussian length penalty.

  Returns:
    (corpus score, per-image scores as a float64 array of len(candidates)).

  Raises:
    ValueError: If the inputs differ in length or are empty.
  """
  _check_inputs(references, candidates)
  ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
  # Document frequency: number of images whose references contain the n-gram.
  doc_freq = collections.Counter()
  for counts_per_ref in ref_counts:
    doc_freq.update(set().union(*counts_per_ref))
  log_num_docs = math.log(float(len(references)))

  scores = np.zeros(len(candidates), dtype=np.float64)
  for i, (cand, counts_per_ref) in enumerate(zip(candidates, ref_counts)):
    cand_tokens = cand.split()
    cand_vecs, cand_norms = _tfidf(
        _ngrams(cand_tokens, n), doc_freq, log_num_docs, n)
    cand_len = _cider_length(len(cand_tokens))
    per_order = np.zeros(n, dtype=np.float64)
    for ref, counts in zip(references[i], counts_per_ref):
      ref_vecs, ref_norms = _tfidf(counts, doc_freq, log_num_docs, n)
      delta = float(cand_len - _cider_length(len(ref.split())))
      penalty = math.exp(-(delta**2) / (2 * sigma**2))
      for k in range(n):
        # "-D" clipping: candidate weights cannot exceed the reference ones.
        dot = sum(min(w, ref_vecs[k].get(g, 0.0)) * ref_vecs[k].get(g, 0.0)
                  for g, w in cand_vecs[k].items())
        if cand_norms[k] != 0 and ref_norms[k] != 0:
          dot /= cand_norms[k] * ref_norms[k]
        per_order[k] += dot * penalty
    scores[i] = np.mean(per_order) / len(counts_per_ref) * 10.0
  return float(np.mean(scores)), scores


def compute_scores(references: Sequence[Sequence[str]],
                   candidates: Sequence[str]) -> dict[str, float]:
  """BLEU-4 and CIDEr-D of raw captions, tokenised like the COCO toolkit.

  Args:
    references: For each image, a non-empty list of raw reference captions.
    candidates: For each image, one raw candidate caption.

  Returns:
    {'bleu4': corpus BLEU-4, 'cider': corpus CIDEr-D}.

  Raises:
    ValueError: If the inputs differ in length or are empty.
  """
  _check_inputs(references, candidates)
  refs_tok = [[ptb_tokenize(r) for r in refs] for refs in references]
  cands_tok = [ptb_tokenize(c) for c in candidates]
  return {
      "bleu4": float(bleu(refs_tok, cands_tok, n=4)[3]),
      "cider": cider_d(refs_tok, cands_tok)[0],
  }
