"""OpenAI CLIP's byte-level BPE tokenizer, as open_clip's SimpleTokenizer applies it, behind
vljax's tokenizer interface (vljax.data.tokenizer.Tokenizer's: encode, decode, pad_id, eos_id,
vocab_size, serialized_model, save).

What a text goes through (the semantics of OpenAI's `simple_tokenizer.py`, which open_clip
keeps, with its default `clean='lower'`):
  1. ftfy.fix_text, HTML unescaping twice, strip; whitespace runs become one space; lowercase.
  2. Split into words: the two special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of
     letters (Unicode category L*), single numbers (N*), runs of anything else but whitespace.
     open_clip uses the `regex` module's \\p{L} / \\p{N}; here the characters are classified by
     unicodedata, which is the same classification without that dependency.
  3. Each word's UTF-8 bytes map to printable characters (bytes_to_unicode), the last one marked
     with '</w>', and the merges apply in rank order.
  4. Ids: the 256 byte characters, the same with '</w>', one per merge, then <start_of_text>
     and <end_of_text> (49,408 with OpenAI's 48,894 merges).
An encoded row is [<start_of_text>] + tokens + [<end_of_text>], truncated to max_len with
<end_of_text> kept last, right-padded with 0 (open_clip's layout; CLIP's text tower pools at
the largest id, <end_of_text>).

Vocabulary files: OpenAI's / open_clip's `bpe_simple_vocab_16e6.txt.gz` or a Hugging Face CLIP
tokenizer's `merges.txt` (a header line, then one merge per line; only the first 48,894 merges
are used, as open_clip does). The serialized form (what an export directory keeps as
tokenizer.model) is MAGIC followed by the merges, one per line.
"""
from __future__ import annotations

import gzip
import html
import os
import unicodedata
from typing import Sequence

import numpy as np

MAGIC = b"#vljax clip_bpe v1\n"
MAX_MERGES = 49152 - 256 - 2  # open_clip keeps this many merges of its vocabulary file
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
PAD_ID = 0  # open_clip pads with 0 (the byte '!', never after <end_of_text> in the text)


def bytes_to_unicode() -> dict[int, str]:
  """Byte -> a printable character: printable Latin-1 bytes map to themselves, the others to
  code points from 256 on, in byte order (OpenAI's table). The order of the entries is the
  order of the first 256 ids: the printable bytes first, then the others."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _kind(ch: str) -> str:
  """'L' letter, 'N' number, 'S' whitespace, 'O' other (regex's \\p{L}, \\p{N}, \\s)."""
  if ch.isspace():
    return "S"
  category = unicodedata.category(ch)[0]
  return category if category in ("L", "N") else "O"


def split_words(text: str) -> list[str]:
  """The pre-tokenisation of step 2 (module docstring), on an already cleaned text: at each
  position the first alternative of OpenAI's pattern that matches there wins (special token,
  contraction, letters, one number, a greedy run of other characters), as regex.findall."""
  words, i, n = [], 0, len(text)
  while i < n:
    match = next((s for s in SPECIAL_TOKENS + _CONTRACTIONS
                  if text[i:i + len(s)].lower() == s), None)
    if match:  # OpenAI's pattern is case-insensitive
      words.append(text[i:i + len(match)])
      i += len(match)
      continue
    kind = _kind(text[i])
    if kind == "S":
      i += 1
      continue
    j = i + 1
    if kind != "N":  # letters and other characters run on; a number stands alone
      while j < n and _kind(text[j]) == kind:
        j += 1
    words.append(text[i:j])
    i = j
  return words


def basic_clean(text: str) -> str:
  """ftfy's repairs, HTML unescaped twice, stripped: open_clip's basic_clean, the start of
  each of its clean-ups."""
  import ftfy  # pylint: disable=g-import-not-at-top
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean(text: str) -> str:
  """Step 1: basic_clean, whitespace, lowercase (open_clip's clean='lower')."""
  return " ".join(basic_clean(text).split()).lower()


class ClipBpeTokenizer:
  """CLIP's BPE tokenizer (module docstring).

  Attributes:
    pad_id: 0, open_clip's padding.
    eos_id: <end_of_text>, which ends every encoded text (the largest id).
    bos_id: <start_of_text>, which starts every encoded text.
    model_path: where the merges were read from (for messages).
  """

  lowercase = True  # part of clean(); encode's `lowercase` switch does not apply

  def __init__(self, merges: Sequence[tuple[str, str]], model_path: str = "<merges>"):
    self.model_path = model_path
    self._merges = [tuple(m) for m in merges][:MAX_MERGES]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in self._merges]
    vocab += list(SPECIAL_TOKENS)
    self._encoder = {piece: i for i, piece in enumerate(vocab)}
    if len(self._encoder) != len(vocab):
      raise ValueError(f"{model_path}: the merges repeat a piece; not a CLIP BPE vocabulary.")
    self._decoder = vocab
    self._ranks = {m: i for i, m in enumerate(self._merges)}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self._cache = {s: s for s in SPECIAL_TOKENS}
    self.bos_id, self.eos_id = self._encoder[SPECIAL_TOKENS[0]], self._encoder[SPECIAL_TOKENS[1]]
    self.pad_id = PAD_ID

  # ---------------------------------------------------------------- files

  @classmethod
  def from_file(cls, path: str) -> ClipBpeTokenizer:
    """OpenAI's .txt.gz vocabulary or a Hugging Face merges.txt (first line a header)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
      with opener(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a CLIP BPE merges file ({e}).") from None
    return cls(_parse_merges(lines[1:], path), model_path=path)

  @classmethod
  def from_serialized(cls, data: bytes, name: str = "<serialized model>") -> ClipBpeTokenizer:
    if not data.startswith(MAGIC):
      raise ValueError(f"{name}: not a serialized CLIP BPE tokenizer.")
    return cls(_parse_merges(data[len(MAGIC):].decode("utf-8").split("\n"), name), name)

  @property
  def serialized_model(self) -> bytes:
    return MAGIC + "\n".join(" ".join(m) for m in self._merges).encode("utf-8")

  def save(self, path: str) -> None:
    from vljax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tokenizer_lib.write_atomic(path, self.serialized_model)

  def __repr__(self) -> str:
    return (f"ClipBpeTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
            f"pad_id={self.pad_id}, eos_id={self.eos_id})")

  def write_hf_files(self, directory: str) -> None:
    """Hugging Face's CLIP tokenizer files for this vocabulary: merges.txt (a header line, then
    the merges) and vocab.json (piece -> id; HF names the special tokens <|startoftext|> and
    <|endoftext|>)."""
    import json  # pylint: disable=g-import-not-at-top
    hf_names = dict(zip(SPECIAL_TOKENS, ("<|startoftext|>", "<|endoftext|>")))
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in self._merges) + "\n")
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump({hf_names.get(p, p): i for i, p in enumerate(self._decoder)}, f,
                ensure_ascii=False)

  @property
  def vocab_size(self) -> int:
    return len(self._decoder)

  def id_to_piece(self, i: int) -> str:
    return self._decoder[int(i)]

  # ---------------------------------------------------------------- encoding

  def _bpe(self, word: str) -> list[str]:
    if word in self._cache:
      return self._cache[word].split(" ")
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      pairs = {(a, b) for a, b in zip(parts, parts[1:])}
      best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    self._cache[word] = " ".join(parts)
    return parts

  def token_ids(self, text: str) -> list[int]:
    """The BPE ids of one text (no <start_of_text> / <end_of_text>)."""
    ids = []
    for word in split_words(clean(text)):
      if word in SPECIAL_TOKENS:
        ids.append(self._encoder[word])
        continue
      chars = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
      ids.extend(self._encoder[piece] for piece in self._bpe(chars))
    return ids

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]: <start_of_text>, tokens, <end_of_text>, 0-padding; a text
    too long is cut and keeps <end_of_text> last (open_clip's tokenize)."""
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 (<start_of_text> and <end_of_text>), got "
                       f"{max_len}.")
    if isinstance(texts, str):
      raise TypeError("encode expects a sequence of strings, not one string.")
    out = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    for row, text in enumerate(texts):
      ids = ([self.bos_id] + self.token_ids(text) + [self.eos_id])[:max_len]
      ids[-1] = self.eos_id
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """One id sequence back to text: stops at <end_of_text>, skips <start_of_text>."""
    pieces = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i != self.bos_id:
        pieces.append(self._decoder[int(i)])
    data = bytearray(self._byte_decoder[c] for c in "".join(pieces))
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    return [self.decode(row) for row in np.asarray(ids)]


def _parse_merges(lines: list[str], path: str) -> list[tuple[str, str]]:
  merges = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}: line {number + 1} is not a merge (two pieces): {line[:60]!r}.")
    merges.append((parts[0], parts[1]))
  return merges


def is_serialized(data: bytes) -> bool:
  return data.startswith(MAGIC)


def find_vocabulary(directory: str) -> str | None:
  """A CLIP BPE vocabulary file in a model directory (HF's merges.txt, open_clip's .txt.gz)."""
  for name in ("merges.txt", "bpe_simple_vocab_16e6.txt.gz"):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None
