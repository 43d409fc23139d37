"""Reads PyTorch `.pth` tensor files into numpy without torch, through a restricted unpickler.

A `.pth` is a pickle, and unpickling runs whatever callables the file names, so weight files
are untrusted input. This reader admits only the globals that a tensor state dict
needs, each mapped to a numpy rebuilder of our own; any other global is refused with
`ForbiddenGlobalError` before anything is called. Both of torch's formats are read:
- zip (torch >= 1.6): `<name>/data.pkl` plus one raw little-endian record `<name>/data/<key>`
  per storage;
- legacy (torch < 1.6, e.g. pytorch-fid's published Inception weights): four pickles in a
  row (magic number, protocol version, system info, the object) then the storage keys, then
  each storage as an int64 element count followed by its raw bytes.
"""
import collections
import dataclasses
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from dsno_jax import storage as storage_lib  # `storage` names torch's tensor storages here

_READ_CHUNK = 1 << 20  # bytes inflated at a time from a zip member
# A state dict's pickle holds names, shapes and storage references (about 100 bytes a
# tensor); anything far larger is refused before it is inflated into memory.
_MAX_PICKLE_BYTES = 64 << 20
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": jax.dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class ForbiddenGlobalError(ValueError):
  """The pickle names a global outside the tensor-state-dict allow list; nothing was run."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What `torch.FloatStorage` and friends unpickle to: only the element dtype."""
  name: str
  dtype: Any


@dataclasses.dataclass
class _Storage:
  """A flat typed buffer; `data` is filled when the storage's bytes are read."""
  key: str
  dtype: Any
  numel: int
  data: Optional[np.ndarray] = None
  root: Optional["_Storage"] = None  # legacy storage views: a window [offset, offset+numel)
  offset: int = 0

  def array(self) -> np.ndarray:
    if self.root is not None:
      return self.root.array()[self.offset:self.offset + self.numel]
    if self.data is None:
      raise ValueError(f"storage {self.key!r} is referenced by a tensor but its bytes are missing")
    return self.data


@dataclasses.dataclass
class _LazyTensor:
  """A tensor rebuilt from (storage, offset, size, stride); materialised once storages are read."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride):
  if not isinstance(storage, _Storage):
    raise ValueError(f"tensor rebuilt from {type(storage).__name__}; expected a storage reference")
  return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # training-time state, meaningless for weights
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # Storage classes only say the element type; a GPU-saved file names the torch.cuda ones.
    **{(module, name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()
       for module in ("torch", "torch.cuda")},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals only through `_ALLOWED_GLOBALS`; storages through `persistent_load`."""

  def __init__(self, file, storages: Dict[str, _Storage], path: str):
    super().__init__(file)
    self._storages = storages
    self._path = path

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise ForbiddenGlobalError(
          f"{self._path} references the global {module}.{name}, which a tensor state dict "
          f"never needs; refusing to load it (nothing was executed). Admitted globals: "
          f"{sorted('.'.join(k) for k in _ALLOWED_GLOBALS)}") from None

  def persistent_load(self, saved_id):
    if not isinstance(saved_id, tuple) or not saved_id:
      raise ValueError(f"{self._path}: unexpected persistent id {saved_id!r}")
    kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
    if kind == "module":
      raise ValueError(f"{self._path} holds a pickled nn.Module; expected a state dict "
                       "(save `module.state_dict()` instead)")
    if kind != "storage" or len(saved_id) not in (5, 6):
      raise ValueError(f"{self._path}: unexpected persistent id {saved_id!r}; expected a "
                       "('storage', type, key, location, numel[, view]) reference")
    storage_type, key, _, numel = saved_id[1:5]
    view = saved_id[5] if len(saved_id) == 6 else None
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"{self._path}: storage {key!r} has type {storage_type!r}; expected one "
                       f"of torch.{{{', '.join(_STORAGE_DTYPES)}}}")
    key = str(key)
    if key not in self._storages:
      self._storages[key] = _Storage(key, storage_type.dtype, int(numel))
    storage = self._storages[key]
    if view is None:
      return storage
    view_key, offset, view_numel = view
    return _Storage(str(view_key), storage.dtype, int(view_numel), root=storage,
                    offset=int(offset))


def _materialize(obj):
  """Replaces every `_LazyTensor` in nested dicts/lists/tuples by a numpy array (a copy)."""
  if isinstance(obj, _LazyTensor):
    return _tensor_to_numpy(obj)
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _tensor_to_numpy(tensor: _LazyTensor) -> np.ndarray:
  data = tensor.storage.array()
  size, stride, offset = tensor.size, tensor.stride, tensor.offset
  ints = all(isinstance(v, int) for v in (*size, *stride, offset))
  if not ints or len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
    raise ValueError(f"tensor on storage {tensor.storage.key!r} has size={size}, stride={stride}, "
                     f"offset={offset}; expected non-negative integers of equal rank")
  if 0 in size:
    return np.zeros(size, data.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= data.size:
    raise ValueError(f"tensor on storage {tensor.storage.key!r} (size={size}, stride={stride}, "
                     f"offset={offset}) reaches element {last}, past the storage's {data.size}")
  # Bounds are checked above, so this view never reads outside the buffer.
  view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=size, strides=[s * data.itemsize for s in stride], writeable=False)
  return np.array(view)


def _storage_array(raw: bytes, storage: _Storage, path: str) -> np.ndarray:
  itemsize = np.dtype(storage.dtype).itemsize
  if len(raw) < storage.numel * itemsize:
    raise ValueError(f"{path}: storage {storage.key!r} has {len(raw)} bytes; expected "
                     f"{storage.numel} x {itemsize}")
  return np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"),
                       count=storage.numel)


def _read_record(archive: zipfile.ZipFile, name: str, max_bytes: int, path: str,
                 what: str) -> bytearray:
  """The inflated bytes of the zip member `name`, refused past `max_bytes` (a zip bomb).

  The member's declared size is checked first, and it is inflated in bounded chunks, so
  memory never exceeds what `max_bytes` allows.
  """
  declared = archive.getinfo(name).file_size
  refuse = lambda size: ValueError(
      f"{path}: the record {name} inflates to {size} bytes, but {what} needs at most "
      f"{max_bytes}; refusing to read it (a damaged or malicious file)")
  if declared > max_bytes:
    raise refuse(declared)
  out = bytearray()
  with archive.open(name) as f:
    while len(out) <= max_bytes:
      chunk = f.read(min(_READ_CHUNK, max_bytes + 1 - len(out)))
      if not chunk:
        return out
      out += chunk
  raise refuse(f"more than {max_bytes}")


class _BoundedReader:
  """A file-like view of a zip member that refuses to inflate past a byte budget."""

  def __init__(self, file, max_bytes: int, refuse: Callable[[], Exception]):
    self._file, self._left, self._refuse = file, max_bytes, refuse

  def _take(self, data):
    self._left -= len(data)
    if self._left < 0:
      raise self._refuse()
    return data

  def read(self, size: int = -1):
    return self._take(self._file.read(min(size, self._left + 1) if size >= 0
                                      else self._left + 1))

  def readline(self, size: int = -1):
    return self._take(self._file.readline(min(size, self._left + 1) if size >= 0
                                          else self._left + 1))

  def readinto(self, buffer):
    data = self.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def peek(self, size: int = 0):
    return self._file.peek(size)


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path} is a zip without exactly one data.pkl (found {pickles}); "
                       "expected a file written by torch.save")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "byteorder" in names:
      byteorder = _read_record(archive, prefix + "byteorder", 16, path, "a byte order name")
      byteorder = byteorder.decode("ascii").strip()
      if byteorder != "little":
        raise ValueError(f"{path} was saved {byteorder}-endian; only little-endian is supported")
    storages: Dict[str, _Storage] = {}
    refuse = lambda: ValueError(
        f"{path}: {pickles[0]} inflates past {_MAX_PICKLE_BYTES} bytes, far more than a "
        "state dict's names and shapes need; refusing to read it (a damaged or malicious file)")
    with archive.open(pickles[0]) as f:
      obj = _RestrictedUnpickler(_BoundedReader(f, _MAX_PICKLE_BYTES, refuse), storages,
                                 path).load()
    for key, storage in storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise ValueError(f"{path} lacks the record {record} of storage {key!r}")
      needed = storage.numel * np.dtype(storage.dtype).itemsize
      raw = _read_record(archive, record, needed, path,
                         f"storage {key!r} ({storage.numel} elements)")
      storage.data = _storage_array(raw, storage, path)
  return obj


def _load_legacy(path: str):
  with open(path, "rb") as f:
    def next_pickle(storages=None):
      return _RestrictedUnpickler(f, {} if storages is None else storages, path).load()

    try:
      magic = next_pickle()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      if isinstance(e, ForbiddenGlobalError):
        raise
      raise ValueError(f"{path} is neither a zip nor a legacy torch.save file ({e})") from None
    if magic != _LEGACY_MAGIC_NUMBER:
      raise ValueError(f"{path} starts with {magic!r}; expected torch's magic number "
                       f"{_LEGACY_MAGIC_NUMBER:#x} (is this a PyTorch .pth file?)")
    protocol = next_pickle()
    if protocol != _LEGACY_PROTOCOL_VERSION:
      raise ValueError(f"{path} has protocol version {protocol!r}; expected "
                       f"{_LEGACY_PROTOCOL_VERSION}")
    sys_info = next_pickle()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ValueError(f"{path} was saved big-endian; only little-endian is supported")
    storages: Dict[str, _Storage] = {}
    obj = next_pickle(storages)
    keys = next_pickle()
    if not isinstance(keys, list):
      raise ValueError(f"{path}: storage key list is {type(keys).__name__}; expected a list")
    for key in map(str, keys):
      if key not in storages:
        raise ValueError(f"{path}: storage {key!r} is listed but never referenced")
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise ValueError(f"{path} ends before storage {key!r}")
      (numel,) = struct.unpack("<q", header)
      itemsize = np.dtype(storage.dtype).itemsize
      if numel != storage.numel:
        raise ValueError(f"{path}: storage {key!r} has {numel} elements on disk; the pickle "
                         f"says {storage.numel}")
      storage.data = _storage_array(f.read(numel * itemsize), storage, path)
  return obj


def load_pth(path: str) -> Any:
  """The object a `torch.save` file holds, every tensor as a numpy array; no torch needed.

  Raises FileNotFoundError for a missing file, `ForbiddenGlobalError` (a ValueError) for a
  pickle that names anything but the tensor-rebuilding globals, ValueError for other damage.
  """
  if not storage_lib.isfile(path):
    raise FileNotFoundError(f"PyTorch weight file {path} does not exist")
  path = storage_lib.local_copy(path)  # zip and pickle readers seek: a remote file is copied
  try:
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except ValueError:
    raise
  except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, KeyError,
          IndexError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable torch.save file: {type(e).__name__}: {e}") from e
  return _materialize(obj)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A flat {name: numpy array} state dict from a `.pth` (see `load_pth`)."""
  obj = load_pth(path)
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}; expected a state dict "
                     "(a mapping of parameter names to tensors)")
  for name, value in obj.items():
    if not isinstance(name, str) or not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}; expected a state "
                       "dict of tensors keyed by name")
  return dict(obj)
