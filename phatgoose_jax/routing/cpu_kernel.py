"""Routed LoRA, and the router's softmax + top-k, as native XLA:CPU custom calls.

Letters used in shape comments:
  T tokens, D site input, F site output, E experts, K experts per token, R LoRA rank.

Why: XLA:CPU has no grouped GEMM, so the pure-JAX CPU paths (`phatgoose_jax.routing.cpu_grouped`)
gather tokens into a padded ``[E, C, D]`` slot grid and run batched matmuls whose 16-wide side
Eigen handles at a fraction of its GEMM speed; at T5-base dims that costs 0.6-1.2x a base GEMM
for 8% of its flops (docs/benchmarks.md). ``kernels/routed_lora_cpu.cc`` (the ``cpu_kernel``
backend of `routed_lora`) computes

    y[t] = y_in[t] + sum_k coef[t, k] * (x[t] @ A[idx[t, k]]) @ B[idx[t, k]]

directly: the T*K assignments counting-sorted by expert; phase 1 ``h = coef * x A_e`` over
expert ranges of XLA's intra-op thread pool, phase 2 ``y += h B_e`` over output-column ranges,
so every expert's weights are read once per call (a routed site streams its library: 16-30 MB
per T5-base site at E=166); register blocks of up to 8 rows whose row count is a template
parameter; accumulating into the base projection's output in place
(``input_output_aliases``). Exact in float32 up to summation order (the tests compare with the
``oracle`` backend at rtol 1e-5).

``kernels/topk_softmax_cpu.cc`` (`top_k_softmax_et`) is the router's second half: softmax over
the experts, top-k and renormalisation of expert-major ``[E, T]`` logits in one pass, 16
tokens per vector lane (`scores.phatgoose_route` takes it on CPU; see there).

Build: the C++ sources ship with the package and are compiled, into one shared library, on
first use with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against
the XLA FFI headers of the installed jaxlib (``jax.ffi.include_dir()``), ``-O3 -march=native``,
into
``$PHATGOOSE_JAX_KERNEL_CACHE`` (default ``~/.cache/phatgoose_jax/kernels``) under a name that
hashes the sources, the flags, the compiler, the jaxlib version and the CPU's model and
instruction-set flags, so a rebuilt jaxlib, an edited source or another host sharing the cache
directory never loads a stale or foreign library. The library is written to a temporary file and
renamed into place (never a half-written library). When no compiler is found or the build
fails, `available` is False with the reason in `status`, and ``auto`` keeps the JAX paths.
``PHATGOOSE_JAX_CPU_KERNEL=0`` disables both kernels (``auto`` and the router keep the JAX
paths, the explicit backend raises).

Gradients: `routed_lora_cpu` is a ``jax.custom_vjp``; the forward runs the kernel, the
backward is the VJP of the exact pure-JAX CPU ``sorted`` path on the saved inputs (so training
through a routed library costs what it did before, and gradients match the other backends).
The kernel only takes float32 (``x``, ``A``, ``B``, ``coef``), only runs on the CPU platform,
and loops (``vmap_method='sequential'``) under ``vmap``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import fileperm
from phatgoose_jax.routing.types import RoutingError

_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
_SOURCES = (os.path.join(_KERNELS, "routed_lora_cpu.cc"),
            os.path.join(_KERNELS, "topk_softmax_cpu.cc"))
_HEADERS = (os.path.join(_KERNELS, "run_parts.h"),)  # hashed into the cache key, not compiled
_TARGET = "phatgoose_routed_lora_f32"
_SYMBOL = "PhatgooseRoutedLoraF32"
_TOPK_TARGET = "phatgoose_top_k_softmax_f32"
_TOPK_SYMBOL = "PhatgooseTopKSoftmaxF32"
# -mprefer-vector-width is an x86 option (512-bit vectors where AVX-512 exists); other hosts
# (ARM) build with -march=native alone.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FLAGS = ("-O3", "-march=native", *(("-mprefer-vector-width=512",) if _X86 else ()),
          "-std=c++17", "-shared", "-fPIC", "-w")
ENV_ENABLE = "PHATGOOSE_JAX_CPU_KERNEL"
ENV_CACHE = "PHATGOOSE_JAX_KERNEL_CACHE"

_LOCK = threading.Lock()
_STATE = {"ready": None, "status": "not built yet", "path": None}


def _compiler() -> Optional[str]:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def cache_dir() -> str:
  """Where built kernels are kept (``$PHATGOOSE_JAX_KERNEL_CACHE`` or ~/.cache/...)."""
  return os.environ.get(ENV_CACHE) or os.path.join(
      os.path.expanduser("~"), ".cache", "phatgoose_jax", "kernels")


def _cpu_identity() -> str:
  """The CPU's model and instruction-set flags: ``-march=native`` code built on one host must
  not be loaded on another (a cache in a home directory shared by a cluster)."""
  ident = platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      lines = f.read().split("\n\n", 1)[0].splitlines()  # the first processor
    ident += "".join(sorted(l for l in lines if l.startswith(("model name", "flags", "Features",
                                                              "vendor_id", "CPU part"))))
  except OSError:
    ident += platform.processor()
  return ident


def _jaxlib_version() -> str:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return str(getattr(jaxlib, "__version__", ""))
  except ImportError:  # pragma: no cover
    return ""


def _build(compiler: str) -> str:
  """Compiles the kernel (or finds it in the cache); returns the shared library's path."""
  source = b""
  for src in _SOURCES + _HEADERS:
    with open(src, "rb") as f:
      source += f.read() + b"\0"
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           timeout=60).stdout.splitlines()[:1]
  key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), str(version).encode(),
                                   jax.__version__.encode(), _jaxlib_version().encode(),
                                   jax.ffi.include_dir().encode(),
                                   _cpu_identity().encode()])).hexdigest()[:16]
  out_dir = cache_dir()
  path = os.path.join(out_dir, f"routed_lora_cpu-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".routed_lora_cpu-", suffix=".so", dir=out_dir)
  os.close(fd)
  try:
    cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), *_SOURCES, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                         f"{proc.stderr.strip()[-2000:]}")
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())  # the bytes are on disk before the name is published
    os.chmod(tmp, 0o755 & ~fileperm.current_umask())  # loadable by the cache's other users
    os.replace(tmp, path)  # atomic: other processes see no library or a whole one
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _load() -> bool:
  with _LOCK:
    if _STATE["ready"] is not None:
      return _STATE["ready"]
    if os.environ.get(ENV_ENABLE, "1").strip().lower() in ("0", "false", "no", "off"):
      _STATE.update(ready=False, status=f"disabled by {ENV_ENABLE}")
      return False
    compiler = _compiler()
    if compiler is None:
      _STATE.update(ready=False, status="no C++ compiler found ($CXX, c++, g++, clang++)")
      logging.info("phatgoose_jax: cpu_kernel unavailable: %s", _STATE["status"])
      return False
    try:
      path = _build(compiler)
      try:
        lib = ctypes.cdll.LoadLibrary(path)
      except OSError:  # a damaged cached library (e.g. truncated by a full disk): rebuild once
        os.remove(path)
        path = _build(compiler)
        lib = ctypes.cdll.LoadLibrary(path)
      jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)),
                                  platform="cpu")
      jax.ffi.register_ffi_target(_TOPK_TARGET, jax.ffi.pycapsule(getattr(lib, _TOPK_SYMBOL)),
                                  platform="cpu")
    except Exception as e:  # pylint: disable=broad-except
      _STATE.update(ready=False, status=f"build or load failed: {e}")
      logging.warning("phatgoose_jax: cpu_kernel unavailable, the JAX CPU paths are used: %s", e)
      return False
    _STATE.update(ready=True, status=f"built: {path}", path=path)
    return True


def available() -> bool:
  """True when the kernel is built (building it on first call) and registered."""
  return _load()


def status() -> str:
  """Why the kernel is or is not available (after `available` has been called)."""
  _load()
  return _STATE["status"]


def auto_eligible(dtype) -> bool:
  """Whether ``auto`` should use the kernel: float32 compute on a single CPU device.

  Several (emulated) devices mean a sharded program, where a custom call without a
  partitioning rule would gather its operands; there ``auto`` keeps the JAX paths.
  """
  return (jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"
          and jax.device_count() == 1 and available())


def _num_threads() -> int:
  return max(1, os.cpu_count() or 1)


def _call(y_in, x, a, b, idx, coef):
  """The custom call: ``y_in + routed LoRA`` [T, F] (y_in's buffer is reused for the output)."""
  return jax.ffi.ffi_call(
      _TARGET, jax.ShapeDtypeStruct(y_in.shape, jnp.float32), input_output_aliases={0: 0},
      vmap_method="sequential")(y_in, x, a, b, idx, coef, num_threads=np.int64(_num_threads()))


def _reference_delta(x, a, b, idx, coef):
  """Pure-JAX equal of `_call` minus ``y_in`` (the CPU ``sorted`` path), for the backward."""
  from phatgoose_jax.routing.backends import sorted_cpu_coef  # pylint: disable=g-import-not-at-top
  return sorted_cpu_coef(x, a, b, idx, coef)


@jax.custom_vjp
def _routed(y_in, x, a, b, idx, coef):
  return _call(y_in, x, a, b, idx, coef)


def _routed_fwd(y_in, x, a, b, idx, coef):
  return _call(y_in, x, a, b, idx, coef), (x, a, b, idx, coef)


def _routed_bwd(res, g):
  x, a, b, idx, coef = res
  # d/d y_in is the identity; the rest is the VJP of the exact JAX path (no zero buffer added).
  _, vjp = jax.vjp(lambda x, a, b, coef: _reference_delta(x, a, b, idx, coef), x, a, b, coef)
  gx, ga, gb, gc = vjp(g)
  gidx = np.zeros(idx.shape, jax.dtypes.float0)
  return g, gx, ga, gb, gidx, gc


_routed.defvjp(_routed_fwd, _routed_bwd)


def routed_lora_cpu(x: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array, coef: jax.Array,
                    add_to: Optional[jax.Array] = None) -> jax.Array:
  """``add_to + sum_k coef[t,k] * (x[t] @ a[idx[t,k]]) @ b[idx[t,k]]`` with the native kernel.

  Args:
    x: [T, D] float32.
    a: [E, D, R] float32.
    b: [E, R, F] float32.
    idx: [T, K] int32 expert ids in [0, E) (checked by the kernel: an id outside raises).
    coef: [T, K] float32 per-assignment coefficient (routing weight times expert scale).
    add_to: optional [T, F] float32 added to the result in place of a zero buffer (the base
      projection's output; its buffer becomes the output's).

  Returns:
    [T, F] float32.

  Raises:
    RoutingError: the kernel is unavailable (reason from `status`), the default backend is not
      the CPU, or an operand is not float32.
  """
  if not available():
    raise RoutingError(f"routed_lora: backend 'cpu_kernel' is unavailable: {status()}")
  if jax.default_backend() != "cpu":
    raise RoutingError(f"routed_lora: backend 'cpu_kernel' runs on the CPU platform only, the "
                       f"default backend is {jax.default_backend()!r}")
  for name, v in (("x", x), ("lora_a", a), ("lora_b", b), ("coef", coef)):
    if v.dtype != jnp.float32:
      raise RoutingError(f"routed_lora: backend 'cpu_kernel' takes float32 only, {name} is "
                         f"{v.dtype}")
  t, f = x.shape[0], b.shape[-1]
  y_in = jnp.zeros((t, f), jnp.float32) if add_to is None else add_to.astype(jnp.float32)
  return _routed(y_in, x, a, b, idx.astype(jnp.int32), coef)


# ----------------------------------------------------------------------------- router top-k

TOPK_MAX_K = 4


def top_k_softmax_eligible(logits_dtype, k: int, num_experts: int) -> bool:
  """Whether the router may use `top_k_softmax_et`: float32 on one CPU device, 1 <= k <= 4."""
  return (1 <= k <= min(TOPK_MAX_K, num_experts) and auto_eligible(logits_dtype))


def _topk_call(logits_et, k, scale, eps, renormalize):
  t = logits_et.shape[1]
  return jax.ffi.ffi_call(
      _TOPK_TARGET, (jax.ShapeDtypeStruct((t, k), jnp.float32),
                     jax.ShapeDtypeStruct((t, k), jnp.int32)),
      vmap_method="sequential")(logits_et, k=np.int64(k), scale=np.float32(scale),
                                eps=np.float32(eps), renormalize=bool(renormalize),
                                num_threads=np.int64(_num_threads()))


def _topk_reference_weights(logits_et, k, scale, renormalize_eps):
  """The custom call's weights by the pure-JAX path (`scores.top_k_routing` of [T, E] logits)."""
  from phatgoose_jax.routing.scores import top_k_routing  # pylint: disable=g-import-not-at-top
  return top_k_routing(logits_et.T * scale, k, renormalize_eps=renormalize_eps).weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _topk(logits_et, k, scale, renormalize_eps):
  eps = 0.0 if renormalize_eps is None else renormalize_eps
  return _topk_call(logits_et, k, scale, eps, renormalize_eps is not None)


def _topk_fwd(logits_et, k, scale, renormalize_eps):
  return _topk(logits_et, k, scale, renormalize_eps), logits_et


def _topk_bwd(k, scale, renormalize_eps, logits_et, g):
  gw, _ = g
  # The VJP of the exact JAX path on the saved logits (its top-k selects the same experts up
  # to float32 ties; the indices have no gradient).
  _, vjp = jax.vjp(lambda l: _topk_reference_weights(l, k, scale, renormalize_eps), logits_et)
  return vjp(gw)


_topk.defvjp(_topk_fwd, _topk_bwd)


def top_k_softmax_et(logits_et: jax.Array, k: int, scale: float = 1.0,
                     renormalize_eps: Optional[float] = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Router softmax over experts + top-k + renormalisation in one native pass (float32, CPU).

  Equals ``scores.top_k_routing((logits_et * scale).T, k, renormalize_eps)``: softmax over all E,
  the k largest probabilities (ties to the lowest index, as ``lax.top_k``), divided by their sum
  plus ``renormalize_eps`` (None: not renormalised). A token whose softmax is NaN gets NaN
  weights and indices 0..k-1, as the JAX path. The exp is a polynomial within ~2 ulp of expf,
  so weights agree with the JAX path to ~1e-7 relative, not bit for bit, and an exact tie
  between two experts' probabilities can resolve differently only when rounding makes them
  tie in one path and not the other. Gradients: the VJP of the JAX path (``custom_vjp``).

  Args:
    logits_et: [E, T] float32 router scores, expert-major (``einsum('ed,td->et', gates, x)``).
    k: experts kept per token, 1..4.
    scale: multiplies the logits first (``D**-0.5`` of the PHATGOOSE router).
    renormalize_eps: see `scores.top_k_routing`.

  Returns:
    weights [T, k] float32 and indices [T, k] int32.

  Raises:
    RoutingError: the kernel is unavailable, logits are not [E, T] float32, or k is outside
      1..min(4, E).
  """
  if not available():
    raise RoutingError(f"top_k_softmax_et: the CPU kernel is unavailable: {status()}")
  if logits_et.ndim != 2 or logits_et.dtype != jnp.float32:
    raise RoutingError(f"top_k_softmax_et: logits must be [E, T] float32, got "
                       f"{logits_et.shape} {logits_et.dtype}")
  if not 1 <= k <= min(TOPK_MAX_K, logits_et.shape[0]):
    raise RoutingError(f"top_k_softmax_et: k must be in 1..{min(TOPK_MAX_K, logits_et.shape[0])}"
                       f", got {k}")
  return _topk(logits_et, int(k), float(scale), renormalize_eps)


@functools.lru_cache(maxsize=None)
def describe() -> str:
  """One line for benchmark environment files: compiler flags and build status."""
  return f"cpu_kernel: {status()}; flags {' '.join(_FLAGS)}"
