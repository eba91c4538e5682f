"""Reading checkpoint files safely: .safetensors and .npz as numpy arrays, never a pickle.

Every failure is an InteropError naming the file and, where there is one, the tensor: a
truncated file, a file of another format, a missing tensor, a tensor of the wrong shape.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from vljax.configlib import ConfigError


class InteropError(ConfigError):
  """A checkpoint that cannot be converted; the message names the file and the tensor."""


class TensorFile:
  """The named arrays of one checkpoint file.

  `take` hands out one array, checking that it exists and has the expected shape; `unused`
  lists the arrays nobody took (a converter treats them as an unknown architecture).
  """

  def __init__(self, path: str, arrays: Mapping[str, np.ndarray]):
    self.path = path
    self.arrays = dict(arrays)
    self.name_prefix = ""  # what the file puts before the names used here (e.g. 'params/')
    self._taken: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.arrays

  def names(self) -> list[str]:
    return sorted(self.arrays)

  def shape(self, name: str) -> tuple[int, ...]:
    """The shape of the array `name` (an error naming it when it is missing); not a `take`."""
    if name not in self.arrays:
      raise self.error(name, f"is missing ({len(self.arrays)} tensors in the file).")
    return tuple(self.arrays[name].shape)

  def error(self, name: str, problem: str) -> InteropError:
    return InteropError(f"{self.path}: tensor {self.name_prefix + name!r} {problem}")

  def take(self, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """The array `name` as float32 (ints stay ints); checks its shape when one is given."""
    if name not in self.arrays:
      raise self.error(name, f"is missing ({len(self.arrays)} tensors in the file; e.g. "
                             f"{self.names()[:3]}).")
    value = self.arrays[name]
    check_shape(self, name, value.shape, shape)
    self._taken.add(name)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    return value

  def unused(self, ignore: Iterable[str] = ()) -> list[str]:
    ignored = set(ignore)
    return sorted(n for n in self.arrays if n not in self._taken and n not in ignored)

  def check_all_used(self, what: str, ignore: Iterable[str] = ()) -> None:
    left = self.unused(ignore)
    if left:
      raise self.error(left[0], f"is not part of a {what} (unexpected tensors: {left[:5]}"
                                f"{' ...' if len(left) > 5 else ''}); this architecture is "
                                f"not supported.")


def check_shape(source: TensorFile, name: str, actual: Sequence[int],
                expected: Sequence[int] | None) -> None:
  if expected is not None and tuple(actual) != tuple(expected):
    raise source.error(name, f"has shape {tuple(actual)}, expected {tuple(expected)}.")


def read_json(path: str, if_missing: str) -> dict:
  """A JSON object file; `if_missing` completes the error message when there is no file."""
  if not os.path.isfile(path):
    raise InteropError(f"{path}: {if_missing}")
  try:
    with open(path) as f:
      value = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InteropError(f"{path}: not a JSON config ({e}).") from None
  if not isinstance(value, dict):
    raise InteropError(f"{path}: not a JSON object.")
  return value


def _exists(path: str, kind: str) -> None:
  if not os.path.isfile(path):
    raise InteropError(f"{path}: no such {kind} file.")


def _safetensors_header(path: str) -> dict:
  """The JSON header of a .safetensors file, checked against the file's size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise InteropError(f"{path}: not a .safetensors file (only {size} bytes).")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise InteropError(f"{path}: not a .safetensors file, or truncated inside its header "
                         f"(header of {n} bytes, file of {size}).")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise InteropError(f"{path}: not a .safetensors file (unreadable header: {e}).") from None
  if not isinstance(header, dict):
    raise InteropError(f"{path}: not a .safetensors file (header is not a JSON object).")
  data_size = size - 8 - n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
    if end > data_size:
      raise InteropError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data "
                         f"but the file holds only {data_size} bytes of data.")
  return header


# safetensors dtype names -> numpy dtypes, for the files safetensors' numpy reader refuses (it
# has no bfloat16). bfloat16 tensors come back as float32, which holds every bfloat16 exactly.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors_bytes(path: str, header: dict) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file decoded from its bytes (little-endian, C order)."""
  arrays = {}
  with open(path, "rb") as f:
    f.seek(8 + struct.unpack("<Q", f.read(8))[0])
    data = f.read()
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise InteropError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which "
                         f"vljax does not read (it reads {', '.join(_SAFETENSORS_DTYPES)}).")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    array = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != int(np.prod(shape)):
      raise InteropError(f"{path}: tensor {name!r} holds {array.size} values for its shape "
                         f"{shape}.")
    array = array.reshape(shape).astype(np.dtype(dtype).newbyteorder("="))
    arrays[name] = array.astype(np.float32) if dtype == ml_dtypes.bfloat16 else array
  return arrays


def read_safetensors(path: str) -> TensorFile:
  """A .safetensors file as numpy arrays (no torch): safetensors' numpy reader, or for a file
  with bfloat16 tensors, which that reader refuses, the bytes decoded here (bfloat16 as
  float32, exactly)."""
  _exists(path, ".safetensors")
  header = _safetensors_header(path)
  if any(isinstance(info, dict) and info.get("dtype") == "BF16" for info in header.values()):
    return TensorFile(path, _read_safetensors_bytes(path, header))
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  try:
    arrays = st_numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types
    raise InteropError(f"{path}: cannot read the .safetensors file ({type(e).__name__}: "
                       f"{e}).") from None
  return TensorFile(path, arrays)


def _last_complete_entry(path: str) -> str | None:
  """The name of the last zip entry whose local header is intact (for truncated archives)."""
  last = None
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while data[pos:pos + 4] == b"PK\x03\x04" and pos + 30 <= len(data):
    _, _, _, _, _, _, csize, _, name_len, extra_len = struct.unpack(
        "<HHHHHIIIHH", data[pos + 4:pos + 30])
    name = data[pos + 30:pos + 30 + name_len].decode("utf-8", "replace")
    extra = data[pos + 30 + name_len:pos + 30 + name_len + extra_len]
    if csize == 0xFFFFFFFF:  # zip64: the sizes are in the extra field
      i = 0
      while i + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[i:i + 4])
        if tag == 1 and length >= 16:
          csize = struct.unpack("<Q", extra[i + 12:i + 20])[0]
        i += 4 + length
    start = pos + 30 + name_len + extra_len
    last = name
    if start + csize > len(data):
      break
    pos = start + csize
  return last[:-4] if last and last.endswith(".npy") else last


def read_npz(path: str) -> TensorFile:
  """A .npz file as numpy arrays, with pickles refused (allow_pickle=False)."""
  _exists(path, ".npz")
  if not zipfile.is_zipfile(path):  # np.load would try other formats, pickles among them
    last = _last_complete_entry(path)
    where = (f"truncated: the file breaks off in or after tensor {last!r}" if last else
             "truncated or another format")
    raise InteropError(f"{path}: not a complete .npz archive (a zip of .npy tensors): "
                       f"{where}.")
  try:
    archive = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise InteropError(f"{path}: not a readable .npz archive ({type(e).__name__}: "
                       f"{e}).") from None
  arrays = {}
  with archive:
    for name in archive.files:
      try:
        arrays[name] = archive[name]
      except ValueError as e:
        if "allow_pickle" in str(e):
          raise InteropError(f"{path}: tensor {name!r} is a pickled object; pickles are never "
                             f"loaded.") from None
        raise InteropError(f"{path}: tensor {name!r} cannot be read ({e}).") from None
      except Exception as e:  # zlib / zipfile errors of a damaged member
        raise InteropError(f"{path}: tensor {name!r} cannot be read: the file is damaged or "
                           f"truncated ({type(e).__name__}: {e}).") from None
  return TensorFile(path, arrays)
