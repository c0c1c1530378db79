"""On-disk format of the expert library: entries, metadata, atomic writes and verification.

Layout (format version 1)::

  <library>/library.json                 # format, version, base fingerprint, T5 config,
                                         #   pinned sites / rank (or null), expert names in order
  <library>/experts/<name>/weights.safetensors   # flat keys '<site>/lora_a' [D, R], '<site>/lora_b'
                                                 #   [R, F], optional '<site>/<kind>' [D] vectors
                                                 #   ('gate', 'prototype_average_activation', ...)
  <library>/experts/<name>/metadata.json         # task, rank, scale, sites, vector kinds, base
                                                 #   fingerprint, provenance, per-array shape/dtype,
                                                 #   sha256 of weights.safetensors

Crash safety. Every file is first written under a temporary sibling name, flushed and fsync'ed, and
then renamed into place with ``os.replace`` (atomic on POSIX). An entry directory is assembled
complete under ``experts/.<name>.tmp-*`` and renamed to ``experts/<name>``; replacing an existing
entry first renames the old one aside (``.<name>.old-*``; a crash between the two renames leaves
the entry absent, reported as such, with the old copy recoverable from that directory). A reader therefore sees either a complete
entry or none; an entry whose ``metadata.json`` is missing or whose weights do not hash to the
recorded sha256 (a hand-copied, truncated or bit-rotted entry) is refused with a `LibraryError`
naming the expert and the field.

The safetensors files are written by this module (not by the ``safetensors`` package) so that
bfloat16 arrays (``ml_dtypes``) round-trip and bytes are deterministic: header keys sorted, data in
key order, header padded with spaces to a multiple of 8 bytes, as the safetensors spec allows.

Letters: D site input width, F site output width, R LoRA rank.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from phatgoose_jax import fileperm
from phatgoose_jax.checkpoints.shapes import expected_param_shapes
from phatgoose_jax.models.config import T5Config

LIBRARY_FILE = "library.json"
EXPERTS_DIR = "experts"
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
LIBRARY_FORMAT = "phatgoose_jax.expert_library"
ENTRY_FORMAT = "phatgoose_jax.expert"
FORMAT_VERSION = 1

LORA_KEYS = ("lora_a", "lora_b")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_DTYPE_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}

METADATA_REQUIRED = ("format", "format_version", "name", "task", "rank", "scale", "sites",
                     "vectors", "base_fingerprint", "provenance", "arrays", "weights_sha256")


class LibraryError(ValueError):
  """A malformed, incompatible or partially written expert library / entry / import source."""


try:  # The checkpoints room owns the base-model fingerprint; the library reuses it.
  from phatgoose_jax.checkpoints.ours import params_fingerprint
except ImportError:  # pragma: no cover - only if the checkpoints room is absent.
  params_fingerprint = None  # type: ignore[assignment]


def base_fingerprint(params: Mapping[str, Any]) -> str:
  """The fingerprint the library records for a base-model parameter tree.

  Delegates to `phatgoose_jax.checkpoints.params_fingerprint` ('sha256:<hex>' over sorted paths,
  shapes, dtypes and bytes), so a library built from a checkpoint matches that checkpoint's
  ``phatgoose_metadata.json``.
  """
  if params_fingerprint is None:  # pragma: no cover
    raise ImportError("phatgoose_jax.checkpoints is required to fingerprint a base model")
  return params_fingerprint(params)


def validate_name(name: Any, what: str = "expert name") -> str:
  """An expert name is one path component: letters, digits and ``. _ - + =``; no leading dot."""
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise LibraryError(
        f"invalid {what} {name!r}: use 1-200 characters from [A-Za-z0-9._+=-], starting with a "
        "letter or digit (it becomes a directory name)")
  return name


def validate_kind(kind: Any) -> str:
  """A vector kind (``'gate'``, ``'prototype_arrow'``, ...) is a lower-case identifier."""
  if not isinstance(kind, str) or not _KIND_RE.match(kind) or kind in LORA_KEYS:
    raise LibraryError(
        f"invalid vector kind {kind!r}: use a lower-case identifier such as 'gate' or "
        "'prototype_arrow' (not 'lora_a'/'lora_b')")
  return kind


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Sites and validation of inputs.
# ----------------------------------------------------------------------------------------------

_SITE_STACKS = ("attention", "self_attention", "encoder_decoder_attention", "mlp")


def site_shapes(config: T5Config) -> Dict[str, Tuple[int, int]]:
  """Every LoRA site of ``config`` mapped to its kernel shape (D, F), in network order."""
  shapes = {}
  for path, shape in expected_param_shapes(config).items():
    parts = path.split("/")
    if (len(parts) == 5 and parts[0] in ("encoder", "decoder") and parts[1].startswith("layers_")
        and parts[2] in _SITE_STACKS and parts[4] == "kernel"):
      shapes["/".join(parts[:4])] = tuple(shape)
  return shapes


def as_config(t5_config: Union[T5Config, Mapping[str, Any]]) -> T5Config:
  if isinstance(t5_config, T5Config):
    return t5_config
  if isinstance(t5_config, Mapping):
    try:
      return T5Config.from_dict(dict(t5_config))
    except (TypeError, ValueError) as e:
      raise LibraryError(f"t5_config: {e}") from e
  raise LibraryError(f"t5_config must be a T5Config or a dict, got {type(t5_config).__name__}")


def as_fingerprint(fingerprint: Any) -> str:
  if isinstance(fingerprint, Mapping):
    return base_fingerprint(fingerprint)
  if not isinstance(fingerprint, str) or not fingerprint:
    raise LibraryError("base_fingerprint must be a non-empty string (e.g. "
                       "phatgoose_jax.checkpoints.params_fingerprint(params)) or a params tree")
  return fingerprint


def float_array(value: Any, where: str) -> np.ndarray:
  array = np.asarray(value)
  if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
    raise LibraryError(f"{where} must be a floating-point array, got dtype {array.dtype}")
  if not np.all(np.isfinite(array.astype(np.float32))):
    raise LibraryError(f"{where} contains non-finite values")
  return array


# ----------------------------------------------------------------------------------------------
# safetensors (de)serialisation.
# ----------------------------------------------------------------------------------------------


def _dtype_name(array: np.ndarray) -> str:
  name = np.dtype(array.dtype).name
  if name not in _DTYPE_TO_SAFETENSORS:
    raise LibraryError(f"arrays of dtype {name} cannot be stored; use one of "
                       f"{sorted(_DTYPE_TO_SAFETENSORS)}")
  return name


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def safetensors_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
  """Serialises ``{key: array}`` to safetensors bytes (sorted keys, little-endian, C order)."""
  header: Dict[str, Any] = {}
  chunks = []
  offset = 0
  for key in sorted(tensors):
    array = np.asarray(tensors[key])
    dtype_name = _dtype_name(array)
    if array.dtype.byteorder == ">":
      array = array.astype(array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array).tobytes()
    header[key] = {"dtype": _DTYPE_TO_SAFETENSORS[dtype_name], "shape": list(array.shape),
                   "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
  blob += b" " * ((-len(blob)) % 8)
  return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def parse_safetensors(data: bytes, source: str) -> Dict[str, np.ndarray]:
  """Parses safetensors bytes into owned numpy arrays; refuses truncated or malformed files.

  Raises:
    LibraryError: naming ``source`` and the offending tensor / field.
  """
  if len(data) < 8:
    raise LibraryError(f"{source}: not a safetensors file (only {len(data)} bytes)")
  (header_len,) = struct.unpack("<Q", data[:8])
  if header_len > len(data) - 8:
    raise LibraryError(f"{source}: truncated safetensors file (header of {header_len} bytes, "
                       f"file has {len(data)})")
  try:
    header = json.loads(data[8:8 + header_len].decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise LibraryError(f"{source}: malformed safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise LibraryError(f"{source}: malformed safetensors header (not a JSON object)")
  body = memoryview(data)[8 + header_len:]
  tensors: Dict[str, np.ndarray] = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = _np_dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
      shape = tuple(int(s) for s in info["shape"])
      start, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise LibraryError(f"{source}: tensor {key!r} has a malformed header entry {info!r}") from e
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - start != expected or start < 0:
      raise LibraryError(f"{source}: tensor {key!r}: data_offsets {start}..{end} do not match "
                         f"shape {list(shape)} of {info['dtype']}")
    if end > len(body):
      raise LibraryError(f"{source}: truncated safetensors file: tensor {key!r} ends at byte "
                         f"{end} of a {len(body)}-byte data section")
    array = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
    tensors[key] = array.astype(array.dtype.newbyteorder("="), copy=True)
  return tensors


def read_safetensors_file(path: str) -> Dict[str, np.ndarray]:
  with open(path, "rb") as f:
    return parse_safetensors(f.read(), path)


def sha256_bytes(data: bytes) -> str:
  return "sha256:" + hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Atomic writes.
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # pragma: no cover - platforms without directory fds.
    return
  try:
    os.fsync(fd)
  except OSError:  # pragma: no cover
    pass
  finally:
    os.close(fd)


def write_file_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary sibling file, fsync and ``os.replace``."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    fileperm.ordinary_mode(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def json_bytes(obj: Any) -> bytes:
  return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json_atomic(path: str, obj: Any) -> None:
  write_file_atomic(path, json_bytes(obj))


def read_json(path: str, what: str) -> Dict[str, Any]:
  try:
    with open(path, "rb") as f:
      obj = json.loads(f.read().decode("utf-8"))
  except FileNotFoundError:
    raise LibraryError(f"{what}: {path} is missing") from None
  except (UnicodeDecodeError, ValueError) as e:
    raise LibraryError(f"{what}: {path} is not valid JSON: {e}") from e
  if not isinstance(obj, dict):
    raise LibraryError(f"{what}: {path} must hold a JSON object")
  return obj


# ----------------------------------------------------------------------------------------------
# Entries.
# ----------------------------------------------------------------------------------------------


def arrays_spec(tensors: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, Any]]:
  return {k: {"shape": [int(s) for s in np.shape(v)], "dtype": _dtype_name(np.asarray(v))}
          for k, v in sorted(tensors.items())}


def write_entry(experts_dir: str, name: str, tensors: Mapping[str, np.ndarray],
                metadata: Dict[str, Any], overwrite: bool) -> Dict[str, Any]:
  """Atomically writes the entry ``experts_dir/name`` (weights + metadata).

  ``metadata`` receives ``arrays`` and ``weights_sha256`` here, computed from the bytes written.
  Other entries of ``experts_dir`` are never opened.

  Returns:
    The metadata as written.

  Raises:
    LibraryError: if the entry exists and ``overwrite`` is False.
  """
  validate_name(name)
  final = os.path.join(experts_dir, name)
  if os.path.lexists(final) and not overwrite:
    raise LibraryError(f"expert {name!r} already exists in {experts_dir}; pass overwrite=True "
                       "to replace it")
  os.makedirs(experts_dir, exist_ok=True)
  data = safetensors_bytes(tensors)
  metadata = dict(metadata)
  metadata["arrays"] = arrays_spec(tensors)
  metadata["weights_sha256"] = sha256_bytes(data)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=experts_dir)
  try:
    for fname, payload in ((WEIGHTS_FILE, data), (METADATA_FILE, json_bytes(metadata))):
      with open(os.path.join(tmp, fname), "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    for fname in (WEIGHTS_FILE, METADATA_FILE, ""):
      fileperm.ordinary_mode(os.path.join(tmp, fname) if fname else tmp)
    old = None
    if os.path.lexists(final):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=experts_dir)
      os.rmdir(old)
      os.replace(final, old)  # Directories cannot be replaced over a non-empty target.
    try:
      os.replace(tmp, final)
    except BaseException:
      if old is not None:
        os.replace(old, final)  # the swap failed: put the previous entry back
      raise
    _fsync_dir(experts_dir)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return metadata


def read_entry(experts_dir: str, name: str, verify: bool = True
               ) -> Tuple[Dict[str, Any], Optional[Dict[str, np.ndarray]]]:
  """Reads and verifies one entry; ``verify=False`` reads metadata only (tensors ``None``).

  Raises:
    LibraryError: naming the expert and the field if the entry is missing, partially written
      (no ``metadata.json``), of another format, or its weights disagree with the metadata
      (sha256, keys, shapes, dtypes).
  """
  entry = os.path.join(experts_dir, name)
  if not os.path.isdir(entry):
    raise LibraryError(f"expert {name!r}: entry directory {entry} does not exist")
  meta_path = os.path.join(entry, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise LibraryError(f"expert {name!r}: field 'metadata': {meta_path} is missing (a partially "
                       "written or hand-copied entry); re-add the expert")
  meta = read_json(meta_path, f"expert {name!r} metadata")
  missing = [k for k in METADATA_REQUIRED if k not in meta]
  if missing:
    raise LibraryError(f"expert {name!r}: {meta_path} lacks field(s) {', '.join(missing)}")
  if meta["format"] != ENTRY_FORMAT:
    raise LibraryError(f"expert {name!r}: field 'format' is {meta['format']!r}, expected "
                       f"{ENTRY_FORMAT!r}")
  if meta["format_version"] != FORMAT_VERSION:
    raise LibraryError(f"expert {name!r}: field 'format_version' is {meta['format_version']!r}; "
                       f"this phatgoose_jax reads version {FORMAT_VERSION}")
  if meta["name"] != name:
    raise LibraryError(f"expert {name!r}: field 'name' in {meta_path} is {meta['name']!r}")
  if not verify:
    return meta, None
  weights_path = os.path.join(entry, WEIGHTS_FILE)
  try:
    with open(weights_path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise LibraryError(f"expert {name!r}: field 'weights': {weights_path} is missing") from None
  digest = sha256_bytes(data)
  if digest != meta["weights_sha256"]:
    raise LibraryError(f"expert {name!r}: field 'weights_sha256': {weights_path} hashes to "
                       f"{digest}, metadata records {meta['weights_sha256']} (truncated or "
                       "modified weights)")
  tensors = parse_safetensors(data, weights_path)
  spec = arrays_spec(tensors)
  if spec != meta["arrays"]:
    extra = sorted(set(spec) - set(meta["arrays"]))
    lost = sorted(set(meta["arrays"]) - set(spec))
    differ = sorted(k for k in set(spec) & set(meta["arrays"]) if spec[k] != meta["arrays"][k])
    raise LibraryError(f"expert {name!r}: field 'arrays' disagrees with {weights_path}: "
                       f"unexpected {extra}, missing {lost}, differing shape/dtype {differ}")
  return meta, tensors
