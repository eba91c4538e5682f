"""Tensors of a torch.save file (.pt / .bin) as numpy arrays, without torch and without running
the pickle.

torch.save writes a zip archive: `<name>/data.pkl` (a pickle of the state dict whose tensors
refer to storages by key) and `<name>/data/<key>` (each storage's raw little-endian bytes). The
pickle is read by an unpickler that knows six globals and nothing else — OrderedDict, torch's
tensor and parameter rebuild functions and the typed storage classes — and builds each tensor
as a numpy view of its storage's bytes (offset, shape, strides). Any other global (a class, a
function such as os.system) stops the read with an InteropError naming the file: nothing from
the file is ever called. The pre-1.6 non-zip torch format is refused.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from vljax.interop.tensors import InteropError, TensorFile

# torch's typed storage classes (the pickle names the tensor dtype through them).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
  del unused  # requires_grad, backward hooks, metadata
  itemsize = storage.dtype.itemsize
  if size and (offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size):
    raise pickle.UnpicklingError(f"a tensor of shape {tuple(size)} reaches past its storage")
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # a copy: independent of the storage and of its neighbours


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  del unused  # requires_grad, backward hooks
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals a state dict needs; storages come from the zip archive."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
    import io  # pylint: disable=g-import-not-at-top
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix, self.path = archive, prefix, path
    self.storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise pickle.UnpicklingError(f"refused global {module}.{name}: only tensors, parameters "
                                 f"and (ordered) dicts are read, nothing is executed")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    if key not in self.storages:
      member = f"{self.prefix}data/{key}"
      try:
        raw = self.archive.read(member)
      except KeyError:
        raise pickle.UnpicklingError(f"storage {member} is missing") from None
      storage = np.frombuffer(raw, storage_type.dtype)
      if storage.size < numel:
        raise pickle.UnpicklingError(f"storage {member} holds {storage.size} values, "
                                     f"{numel} expected (truncated?)")
      self.storages[key] = storage
    return self.storages[key]


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, f"{name}."))
    elif isinstance(value, np.ndarray):
      out[name] = value
  return out


def read_torch(path: str) -> TensorFile:
  """The tensors of a torch.save'd state dict, flattened to 'a.b.c' names, as numpy arrays.

  bfloat16 tensors come back as float32 (exact); a nested dict (e.g. {'state_dict': ...})
  flattens with '.'-joined keys.
  """
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InteropError(f"{path}: no such torch checkpoint file.")
  if not zipfile.is_zipfile(path):
    raise InteropError(f"{path}: not a torch.save zip archive (truncated, another format, or "
                       f"torch's pre-1.6 format, which is not read: re-save it with a recent "
                       f"torch or as .safetensors).")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
      if len(pickles) != 1:
        raise InteropError(f"{path}: a zip archive but not a torch.save file (no single "
                           f"data.pkl).")
      prefix = pickles[0][:-len("data.pkl")]
      tree = _Unpickler(archive.read(pickles[0]), archive, prefix, path).load()
  except InteropError:
    raise
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError,
          TypeError, AttributeError, IndexError) as e:
    raise InteropError(f"{path}: cannot read the torch checkpoint ({type(e).__name__}: "
                       f"{e}).") from None
  if not isinstance(tree, dict):
    raise InteropError(f"{path}: holds a {type(tree).__name__}, not a state dict.")
  arrays = _flatten(tree)
  arrays = {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v
            for k, v in arrays.items()}
  return TensorFile(path, arrays)
