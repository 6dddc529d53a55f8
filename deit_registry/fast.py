"""A fast inference mode: one call that trades a little precision for speed.

::

    import deit_registry as dr
    from deit_registry.fast import optimize_for_inference

    model = dr.create_model("deit_small_distilled_patch16_224", pretrained=True).eval()
    fast = optimize_for_inference(model)          # the fastest trade this device has (see pick_dtype)
    logits = fast(images)                         # float32 in, float32 out
    fp32_fast = optimize_for_inference(model, dtype=torch.float32)  # compiled fp32: rounding-level changes

What each device gets by default (:func:`pick_dtype`; the original model is untouched and stays exact fp32):

* **CPUs with native bf16** (AVX512-BF16 / AMX) **and GPUs:** bf16 (fp16 on GPUs without bf16) weights and
  activations, compiled with ``torch.compile`` (on GPUs replayed as CUDA graphs: ``cuda_graphs``). Logits
  differ from fp32 in the second or third significant digit, so near-ties can flip.
* **CPUs without native bf16** (emulated bf16 is slower than fp32): ``torch.qint8``, i.e. every linear layer in
  dynamic int8 (int8 weights with a scale per output channel; each layer's input quantized per call with one
  scale for the whole batch, so an image's logits can move slightly with its batch mates) and everything
  else fp32, not compiled: a DeiT's copy runs as a TorchScript trace per input shape, made in well under a
  second on its first call (``traced``), other models' copies run eagerly. Arm CPUs (no x86 int8 kernels in
  torch) get compiled fp32.
* **CPUs with native bf16 but no AMX** (e.g. AMD Zen 4 and 5), for DeiTs as wide as deit_small or wider, and
  on Zen 4 for every DeiT: ``torch.qint8`` as well, its attention computed in bf16 (:func:`pick_dtype`);
  narrower ones compile bf16.

``benchmarks/inference.py`` reports each trade's top-1 agreement with fp32 on a trained model. What else is
traded: **start-up time** for the compiled dtypes (the first call per input shape compiles; later calls are
faster, and so are later processes where inductor's on-disk cache can keep the graph: all but the frozen
half-precision CPU graphs) and **flexibility** (inference only, under ``torch.inference_mode()``; the weights
are copied, so later edits to the original model are not seen; each new input shape compiles again,
``dynamic=False``, up to ``_RECOMPILE_LIMIT`` = 64 graphs per process, and likewise each traces again, up to
64 traces per fast model; a large CPU batch runs in pieces of a power-of-two size, and a remainder compiles
or traces a graph of its own; a CUDA graph per shape also keeps its activations' memory). A trace runs the
copy as it was when traced, so later edits to ``fast.model`` are not seen by it; forward hooks are: while one
is registered on the copy or globally, calls run the copy's modules (``layers._forward_hook_tables``).
``compile=False`` never traces. Hooks registered on the model before the call are kept: a block or linear
layer with hooks of its own stays as it is in the copy (:func:`_has_own_hooks`), slower but hooked. The copy
stays in eval mode (``train()`` sets only the wrapper's flag). The int8 copy computes in fp32 around its int8
layers, also for a model cast to half precision, and raises ``ValueError`` for a batch holding a NaN or an
infinity, which would set the one int8 scale of every image in it (:func:`_check_finite`).

How, on CPUs with AMX, when compiling in half precision: weight freezing, so the linears run as pre-packed
oneDNN kernels with bias, GELU and the residual add fused. Everything else compiles plainly, unfrozen
(freezing was not faster there): its graph stays in inductor's on-disk cache for later processes and is
shared by every fast model of the same dtype and shape. On GPUs the speed comes from the CUDA graphs. Nothing
compiles with inductor's C++ wrapper: with frozen weights its source names their addresses, so every process
compiles it again, for seconds, and unfrozen it ran no faster. Attention is the model's own choice
(``fused_attn``, on by default: ``scaled_dot_product_attention``), except in half precision on CPUs without
AMX (AVX512-BF16 alone, e.g. AMD Zen 4 and 5): torch's fused CPU kernel is slow in bf16 there, and the copy
computes two batched matmuls and a softmax instead; compiled, its linears there also add their bias after
the matmul, so the add fuses into the next pointwise kernel, and the patch embedding runs as one matmul
(:func:`_tune_for_cpus_without_amx`).

The copy's blocks run an inference-only forward of their own (:class:`InferenceBlock`, the same modules and
weights): when the head reads only the class (and distillation) tokens the last block computes attention,
projection and MLP for those tokens alone (keys and values for all): the same outputs up to rounding, less
compute. The copy's ``forward_features`` therefore returns the prefix tokens only, and forward hooks on the
copy's last block see those tokens only. Compiled on a CPU with the weights left as graph inputs (all but the
frozen AMX graphs), each block is a nested compile region (:class:`_InferenceBlockTracedOnce`): Dynamo traces
one block and reuses it for the others, for a shorter time to the first output (GPUs, not measured with it,
trace every block). Eagerly (int8 traces included) GELU overwrites fc1's output in place, as in the model
(``layers._gelu_may_overwrite``).

Where a piece is missing it falls back and says so with a warning: torch without its int8 flow -> float32;
no C++ compiler (CPU) or Triton (CUDA), a compile that fails, or too many compiled graphs -> eager execution;
torch.jit gone, unsupported (Python 3.14) or failing, or nn.Module's hook tables moved -> the int8 copy runs
eagerly; torch's compiler internals moved (see :func:`_compiler_internals`) -> compiling without weight
freezing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import math
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architecture import Attention, Block, DeiT
from .layers import _forward_hook_tables

__all__ = [
    "FastInferenceModel",
    "InferenceBlock",
    "optimize_for_inference",
    "pick_dtype",
    "compiler_available",
]

_ALLOWED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.qint8)
_HALF_DTYPES = (torch.bfloat16, torch.float16)

# The quantized engines with x86 int8 kernels (FBGEMM / oneDNN); others (QNNPACK on Arm) keep fp32.
_INT8_ENGINES = ("x86", "fbgemm", "onednn")


def pick_dtype(device: torch.device, model: nn.Module | None = None) -> torch.dtype:
    """The fastest compute dtype on ``device`` (for ``model``, where the choice depends on it).

    CUDA: bfloat16 where supported (Ampere and later), else float16. CPU: bfloat16 when oneDNN has native
    bf16 kernels (AVX512-BF16 / AMX), except on such a CPU without AMX for a DeiT ``model`` at least
    ``_INT8_MIN_WIDTH`` wide (deit_small, deit_base), or for any DeiT ``model`` where the CPU runs AVX-512 on
    256-bit halves (AMD Zen 4, :func:`_cpu_halves_avx512`): there ``torch.qint8`` with bf16 attention is
    faster; ``torch.qint8`` (dynamic int8 linear layers, the rest fp32) on CPUs without native bf16 where
    torch has x86 int8 kernels, since emulated bf16 is slower than fp32; float32 elsewhere. ::

        dtype = pick_dtype(torch.device("cpu"), model)  # what optimize_for_inference(model) computes in
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        int8 = torch.backends.quantized.engine in _INT8_ENGINES
        if _cpu_has_native_bf16():
            width = 0 if model is None else _width(model)
            narrow_too = isinstance(model, DeiT) and _cpu_halves_avx512()  # traced: see the comment below
            faster = width >= _INT8_MIN_WIDTH or narrow_too
            return torch.qint8 if int8 and faster and not _cpu_has_amx() else torch.bfloat16
        return torch.qint8 if int8 else torch.float32
    return torch.float32


# Every CPU with AVX512-BF16 also has AVX512-VNNI, whose int8 multiply-add does twice the bf16 one's work per
# instruction. Without AMX that made dynamic int8 linears (with bf16 attention) faster than the compiled bf16
# model from this width on (measured on AMD Zen 4 and Zen 5); narrower models spend more of their time
# quantizing activations, and on Zen 5 compiled bf16 stays faster for them (deit_tiny, eager int8: much slower
# at batch 32). On Zen 4, whose bf16 matmuls run at about half Zen 5's rate while its int8 layers do not, a
# DeiT's int8 copy run as a TorchScript trace (FastInferenceModel.traced) beat compiled bf16 for deit_tiny
# too, at batch 1 by far. With AMX, bf16 is far faster.
_INT8_MIN_WIDTH = 384


def _width(model: nn.Module) -> int:
    """The widest DeiT's embedding width in ``model``; 0 without one."""
    return max((m.embed_dim for m in model.modules() if isinstance(m, DeiT)), default=0)


def _cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 / AMX): the package's one bf16 probe, on
    oneDNN's own op (no public API tells); where it is gone, assumed emulated, with a warning."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError) as err:  # the op moved or is missing in this build
        warnings.warn(
            f"torch {torch.__version__} has no oneDNN bf16 probe ({type(err).__name__}); the fast mode assumes "
            "this CPU has no native bf16 (pass dtype=torch.bfloat16 to optimize_for_inference if it has)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


@functools.cache
def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields in Linux's ``path`` (empty elsewhere). No public torch API reports the
    CPU's make or AMX."""
    info: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has AMX for bf16, as Linux reports it in ``cpuinfo`` (elsewhere: assumed not).

    torch's fused CPU attention kernel and oneDNN's pre-packed bf16 linears are fast with AMX; without it
    (AVX512-BF16 alone, e.g. AMD Zen 4 and 5) the fused attention kernel runs bf16 at a fraction of the
    speed of two batched matmuls and a softmax."""
    return "amx_bf16" in _cpuinfo(cpuinfo).get("flags", "").split()


def _cpu_halves_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU executes AVX-512 on 256-bit units, two halves per instruction: AMD's CPU family 25
    (0x19) with AVX-512, i.e. Zen 4 (Zen 3, the same family, has no AVX-512; Zen 5 is family 26)."""
    info = _cpuinfo(cpuinfo)
    return (
        info.get("vendor_id") == "AuthenticAMD"
        and info.get("cpu family") == "25"
        and "avx512f" in info.get("flags", "").split()
    )


def _half_on_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _HALF_DTYPES


def _prepacks(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether compiles freeze the weights into pre-packed oneDNN kernels: half precision on a CPU with AMX."""
    return _half_on_cpu(device, dtype) and _cpu_has_amx()


def compiler_available(device: torch.device) -> bool:
    """Whether ``torch.compile``'s inductor backend can generate code for ``device`` here."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device.type == "cpu":
        cxx = _compiler_internals().cxx
        return any(shutil.which(name) for name in ((cxx,) if cxx else ()) + ("g++", "clang++", "c++"))
    return False


@dataclass(frozen=True)
class _CompilerInternals:
    """What the fast mode needs from torch's compiler that no public API offers (``None`` / empty: missing)."""

    inductor_config: Any | None  # inductor's config module: weight freezing, the C++ compiler
    compile_errors: tuple[type[BaseException], ...]  # Dynamo's "the compiler failed" exceptions
    recompile_limit_error: type[BaseException] | None
    cxx: str | None
    limit_config: (
        Any | None
    )  # the config holding Dynamo's recompile_limit (public torch.compiler.config first)


@functools.cache
def _compiler_internals() -> _CompilerInternals:
    """The one place that reads torch's non-public compiler modules.

    Inductor's weight freezing has no public switch (``torch.compile(options=...)`` reaches inductor but not
    Dynamo, which reads ``freezing`` while tracing), and Dynamo's compile-failure exceptions are not exported
    publicly. Dynamo's recompile limit is set through the public ``torch.compiler.config`` where it has it,
    else Dynamo's own config (see :func:`_compile_settings`). If a torch release moves these modules, this
    warns once and the fast mode still works: it compiles without freezing and does not catch compile errors.
    """
    public = getattr(torch.compiler, "config", None)
    public_limit = public if public is not None and hasattr(public, "recompile_limit") else None
    try:
        inductor_config = importlib.import_module("torch._inductor.config")
        exc = importlib.import_module("torch._dynamo.exc")
        errors = (exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.FailOnRecompileLimitHit)
        for name in ("freezing", "cpp"):
            getattr(inductor_config, name)
        cxx = inductor_config.cpp.cxx[-1] if inductor_config.cpp.cxx else None
        # torch.compiler.config gained recompile_limit after torch 2.9; before, only Dynamo's own config has it
        limit_config = public_limit or importlib.import_module("torch._dynamo.config")
        limit_config.recompile_limit, limit_config.fail_on_recompile_limit_hit  # noqa: B018 (present?)
    except (ImportError, AttributeError, TypeError) as err:
        warnings.warn(
            f"torch {torch.__version__}'s compiler internals are not where deit_registry.fast expects them "
            f"({type(err).__name__}: {err}); compiling without weight freezing, and compile failures are not "
            "caught",
            RuntimeWarning,
            stacklevel=2,
        )
        return _CompilerInternals(None, (), None, None, public_limit)
    return _CompilerInternals(inductor_config, errors, exc.FailOnRecompileLimitHit, cxx, limit_config)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class FastInferenceModel(nn.Module):
    """What :func:`optimize_for_inference` returns: the converted copy plus the casts around it.

    Inputs are moved to the model's device and cast to its dtype; floating-point outputs (tensors, tuples,
    lists, dicts) come back in the input's floating dtype, so it replaces the fp32 model in existing code.
    ``model`` is the converted copy, ``dtype`` the compute dtype (``torch.qint8``: int8 linear layers, fp32
    activations, attention in bf16 where the CPU has native bf16), ``compiled`` whether calls go through
    ``torch.compile`` (it turns False if compiling fails) and ``traced`` whether plain calls of an eager copy
    run a TorchScript trace of it per input shape (:func:`_trace`; it turns False if tracing fails).
    Inference-only: ``train()`` leaves the copy in eval mode. An int8 copy refuses (``ValueError``) a batch
    with NaN or infinite values, naming the images.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        compiled: Any | None,
        cuda_graphs: bool = False,
        traced: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.input_dtype = torch.float32 if dtype is torch.qint8 else dtype
        self.device = _model_device(model)
        self._chunk_shape = _chunk_shape(model) if self.device.type == "cpu" else None
        # Kept out of the module tree: the compiled wrapper holds ``model`` again (one copy of the weights in
        # state_dict and repr).
        self.__dict__["_compiled"] = compiled
        # Inputs (shape, strides, inference flag: what Dynamo guards on) already compiled: their calls skip the
        # compile settings, whose patching costs a noticeable share of a small model's batch-1 latency.
        self._compiled_inputs: set[tuple[Any, ...]] = set()
        self._cuda_graphs = cuda_graphs
        # Input key (as for _compiled_inputs) -> the copy's trace for it; None: calls run the copy itself.
        self._traces: dict[tuple[Any, ...], Any] | None = {} if traced and compiled is None else None
        self._hook_tables: tuple[dict[Any, Any], ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickling: traces are made again (a copy of one would run the old weights,
        and traces do not pickle), and the hook tables are read again (a copy of torch's global ones would
        never see a hook registered later)."""
        state = self.__dict__.copy()
        state["_traces"] = None if self._traces is None else {}
        state["_hook_tables"] = ()
        return state

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def traced(self) -> bool:
        return self._traces is not None

    @property
    def cuda_graphs(self) -> bool:
        """Whether compiled calls replay CUDA graphs (``torch.compile(mode="reduce-overhead")``)."""
        return self._cuda_graphs and self.compiled

    def train(self, mode: bool = True) -> FastInferenceModel:
        """Set this wrapper's ``training`` flag; the copy stays in eval mode whatever ``mode`` (it is
        inference-only: dropout and drop-path stay off, so a parent module's ``.train()`` changes no output)."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        x = x.to(device=self.device, dtype=self.input_dtype if x.is_floating_point() else x.dtype)
        with torch.inference_mode():
            if self.dtype is torch.qint8 and x.is_floating_point():
                _check_finite(x)  # here in Python: a trace would keep no check
            size = self._chunk_size(x) if not (args or kwargs) else None
            if size is not None and size < len(x):
                chunks = x.split(size)
                try:
                    out = _concat([self._run(chunk, (), {}) for chunk in chunks], [len(c) for c in chunks])
                except _NotBatched:  # an output that is not batch-first: run the batch in one piece
                    out = self._run(x, (), {})
            else:
                out = self._run(x, args, kwargs)
        # A CUDA graph's outputs live in its memory pool, which the next call overwrites: always hand out copies.
        return _cast_floats(out, out_dtype, copy=self.cuda_graphs)

    def _chunk_size(self, x: torch.Tensor) -> int | None:
        """Images per piece of a CPU batch (see ``_CHUNK_BYTES``), or None to run it whole.

        Eager runs keep every MLP activation under ``_CHUNK_BYTES``. Compiled graphs are split only where the
        whole batch's would reach glibc's highest mmap threshold, into a power of two under ``_CHUNK_BYTES``,
        so that common batch sizes compile one graph (a remainder adds a second)."""
        if self._chunk_shape is None or x.dim() != 4:
            return None
        hidden, patch_pixels, prefix = self._chunk_shape
        tokens = x.shape[-2] * x.shape[-1] // patch_pixels + prefix
        if self._compiled is None:  # eager activations: fp32, also around int8 linears
            size = max(1, _CHUNK_BYTES // (tokens * hidden * 4))
            # each batch size traces once: a power of two, so that common batches need one trace
            return 1 << (size.bit_length() - 1) if self.traced else size
        per_image = tokens * hidden * self.input_dtype.itemsize
        if len(x) * per_image < _MMAP_MAX_BYTES:
            return None
        return 1 << (max(1, _CHUNK_BYTES // per_image).bit_length() - 1)

    def _run(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._compiled is None:
            return (self._trace_for(x, args, kwargs) or self.model)(x, *args, **kwargs)
        key = _input_key(x, args, kwargs)
        settings = (
            contextlib.nullcontext()
            if key in self._compiled_inputs
            else _compile_settings(self.device, self.dtype)
        )
        try:
            with settings:
                out = self._compiled(x, *args, **kwargs)
        except _compiler_internals().compile_errors as err:
            limit_error = _compiler_internals().recompile_limit_error
            reason = (
                f"this process already holds {_RECOMPILE_LIMIT} compiled DeiT graphs (one per input "
                "shape, and per model with frozen weights; raise deit_registry.fast._RECOMPILE_LIMIT or "
                "reuse fast models)"
                if limit_error is not None and isinstance(err, limit_error)
                else f"{type(err).__name__}: {str(err).splitlines()[0]}"
            )
            warnings.warn(
                f"torch.compile failed ({reason}); running this model eagerly in {self.dtype} instead "
                "(pass compile=False to skip compiling)",
                RuntimeWarning,
                stacklevel=3,
            )
            self.__dict__["_compiled"] = None
            return self.model(x, *args, **kwargs)
        if key is not None:
            self._compiled_inputs.add(key)
        return out

    def _trace_for(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
        """The copy's trace for this input, made on its first call; None to run the copy itself: calls with
        extra arguments, while a forward hook is registered (a trace would call it only while tracing), past
        ``_RECOMPILE_LIMIT`` input shapes (warned), and unless ``traced`` (or once tracing has failed for a valid
        input, warned)."""
        key = _input_key(x, args, kwargs)
        if self._traces is None or key is None or any(self._hook_tables):
            return None
        trace = self._traces.get(key)
        if trace is not None:
            return trace
        if len(self._traces) >= _RECOMPILE_LIMIT:
            warnings.warn(
                f"this fast model already holds {_RECOMPILE_LIMIT} traces (one per input shape); other shapes "
                "run eagerly (slower per call)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        tables = _forward_hook_tables(self.model.modules())
        if tables is None:  # where hooks are kept is unknown (warned): never trace
            self._traces = None
            return None
        self._hook_tables = tables
        if any(tables):
            return None
        try:
            trace = _trace(self.model, x)
        except _Untraceable as err:
            self.model(x)  # where the input itself is wrong, its error is raised here and tracing stays on
            warnings.warn(
                f"{err}; running the {type(self.model).__name__} copy eagerly instead (slower per call; "
                "compile=False skips tracing)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._traces = None
            return None
        self._traces[key] = trace
        return trace

    def extra_repr(self) -> str:
        return (
            f"dtype={self.dtype}, device={self.device}, compiled={self.compiled}, traced={self.traced}, "
            f"cuda_graphs={self.cuda_graphs}"
        )


def _check_finite(x: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the images of ``x`` that hold a NaN or an infinity: the int8 copy quantizes
    each layer's input with one scale for the whole batch, which such a value would make meaningless for
    every image of the batch."""
    # One sum keeps any NaN or infinity and costs a small share of torch.isfinite(x).all() (several passes and a
    # bool tensor); the exact check runs only when the sum is not finite (an overflow, or a bad value).
    if math.isfinite(x.sum().item()):
        return
    bad = ~torch.isfinite(x)
    if not bad.any():
        return
    if x.dim() == 0:
        where = "the input holds"
    else:
        rows = bad.reshape(len(x), -1).any(1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        where = (
            f"the images at batch indices {shown} hold"
            if len(rows) > 1
            else f"the image at batch index {shown} holds"
        )
    raise ValueError(
        f"{where} NaN or infinite values: the int8 fast model quantizes each layer's input with one scale for "
        "the whole batch, so they would corrupt the other images' results too (and get finite, meaningless "
        "logits themselves); drop or fix them (e.g. torch.nan_to_num), or run the exact model, which returns "
        "NaN for them"
    )


class _Untraceable(Exception):
    """This Python or torch cannot trace the copy; the message says why."""


def _trace(model: nn.Module, x: torch.Tensor) -> Any:
    """``model`` traced by TorchScript for inputs of ``x``'s shape; raises :class:`_Untraceable` where this
    Python or torch cannot trace it.

    For the int8 copy, whose quantized layers ``torch.compile`` cannot see into: run eagerly, a small DeiT
    spends much of a batch-1 call in Python, and the trace runs the same operators, bit for bit, from C++.
    Shape checks become constants of the trace (its TracerWarnings, silenced here), hence one per input shape.
    torch has deprecated ``torch.jit`` (every trace warns; from Python 3.14 it is unsupported): this is the
    one place that uses it, and the copy runs eagerly once a release drops it."""
    if sys.version_info >= (3, 14):
        raise _Untraceable("torch.jit.trace does not support Python 3.14 and later")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            return torch.jit.trace(model, x, check_trace=False)
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:
        raise _Untraceable(
            f"torch.jit.trace failed ({type(err).__name__}: {(str(err) or '?').splitlines()[0]})"
        ) from err


# glibc serves blocks above 32 MiB (its highest mmap threshold) straight from the kernel and returns them on
# free, so an activation that large is page-faulted anew on every call: a GELU costs several times its in-place
# version, and a compiled deit_base batch of 32 lost a large share of its time to them.
# CPU runs therefore take large batches in pieces whose MLP activation stays well below that
# (FastInferenceModel._chunk_size).
_CHUNK_BYTES = 16 * 2**20
_MMAP_MAX_BYTES = 32 * 2**20


def _chunk_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(MLP hidden width, pixels per patch, prefix tokens) of the one DeiT in ``model``; None if not one."""
    deits = [m for m in model.modules() if isinstance(m, DeiT)]
    if len(deits) != 1 or not len(deits[0].blocks):
        return None
    deit = deits[0]
    hidden = max(block.mlp.fc1.out_features for block in deit.blocks)
    ph, pw = deit.patch_embed.patch_size
    return hidden, ph * pw, deit.num_prefix_tokens


class _NotBatched(Exception):
    """A chunk's output is not split along the batch like its input."""


def _concat(parts: list[Any], sizes: list[int]) -> Any:
    """The chunks' outputs joined along the batch: tensors with ``sizes[i]`` rows in part ``i``, and tuples,
    lists and dicts of them; other values must be equal in every part. Raises :class:`_NotBatched` otherwise."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        if not all(isinstance(p, torch.Tensor) and p.dim() and len(p) == n for p, n in zip(parts, sizes)):
            raise _NotBatched
        return torch.cat(parts)
    if isinstance(first, (tuple, list)) and all(len(p) == len(first) for p in parts):
        return type(first)(_concat(list(items), sizes) for items in zip(*parts))
    if isinstance(first, dict) and all(p.keys() == first.keys() for p in parts):
        return {k: _concat([part[k] for part in parts], sizes) for k in first}
    if all(p is first or (not isinstance(p, torch.Tensor) and p == first) for p in parts):
        return first
    raise _NotBatched


def _input_key(x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What Dynamo guards on for a plain call: shape, strides, dtype (an integer input must reach the model's
    input check, not a float trace), inference flag. None for calls with extra arguments, which may need a
    graph of their own."""
    if args or kwargs:
        return None
    return (tuple(x.shape), x.stride(), x.dtype, x.is_inference(), x.requires_grad)


def _cast_floats(out: Any, dtype: torch.dtype, copy: bool = False) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(dtype if out.is_floating_point() else out.dtype, copy=copy)
    if isinstance(out, (tuple, list)):
        return type(out)(_cast_floats(o, dtype, copy) for o in out)
    if isinstance(out, dict):
        return {k: _cast_floats(v, dtype, copy) for k, v in out.items()}
    return out


class InferenceBlock(nn.Module):
    """A :class:`~deit_registry.architecture.Block`'s own modules (same names, same state-dict keys) run for
    inference only, in the fast copy.

    With ``num_queries`` (the last block of a model whose head reads only the prefix tokens) the block
    computes queries, projection and MLP for the first ``num_queries`` tokens only; every token is still a
    key and a value. Output ``[B, num_queries, D]``.
    """

    def __init__(self, block: Block, num_queries: int | None = None) -> None:
        super().__init__()
        for name in ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.num_queries = num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_queries is None:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
        elif _attention_hooked(self.attn):  # its hook sees what the model's attention returns: every token
            x = x[:, : self.num_queries] + self.drop_path1(self.attn(self.norm1(x))[:, : self.num_queries])
        else:
            x = x[:, : self.num_queries] + self.drop_path1(
                _leading_queries(self.attn, self.norm1(x), self.num_queries)
            )
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"num_queries={self.num_queries}"


def _attention_hooked(attn: Attention) -> bool:
    """Whether a forward hook or pre-hook on ``attn`` must see it called as a module, which
    :func:`_leading_queries` does not do. Global hooks (FlopCounterMode's module tracker, say) still see the
    layers it calls. Compiled graphs keep the prefix-only path: Dynamo reads hooks itself."""
    if torch.compiler.is_compiling():
        return False
    tables = _forward_hook_tables((attn,))
    return tables is None or any(tables[2:])  # after the two global tables: attn's own


def _leading_queries(attn: Attention, x: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``attn`` for the first ``num_queries`` tokens as queries, every token as a key and a value.

    The fused projection runs for all tokens (slicing its weight would not survive int8 quantization, and
    the queries of the other tokens cost a small share of one block)."""
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = attn.attend(q[:, :, :num_queries], k, v).transpose(1, 2).reshape(b, num_queries, c)
    return attn.proj_drop(attn.proj(out))


class _InferenceBlockTracedOnce(InferenceBlock):
    """An :class:`InferenceBlock` that is a nested compile region (``torch.compiler.nested_compile_region``).

    ``torch.compile`` traces one block and reuses the trace and its compiled code for every block of the same
    shapes and settings (the last one, with its ``num_queries``, gets its own) instead of tracing each block:
    a shorter time to the first output, which with a warm inductor cache is mostly Dynamo's tracing, for calls
    as fast. Eagerly, and where torch lacks the API, a plain :class:`InferenceBlock`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return InferenceBlock.forward(self, x)

    if hasattr(torch.compiler, "nested_compile_region"):
        forward = torch.compiler.nested_compile_region(forward)


def _has_own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or pre-hooks of its own (of any kind: with kwargs, always called).

    A module that replaces it in the copy would not carry them: no public API lists a module's hooks with the
    options they were registered with, so the copy keeps a hooked module as it is (correct, only slower).
    Where torch has moved its hook tables (warned), as if hooked."""
    tables = _forward_hook_tables((module,))
    return tables is None or any(tables[2:])  # after the two global tables: the module's own


def _use_inference_blocks(model: nn.Module, traced_once: bool = False) -> None:
    """Give every DeiT inside ``model`` :class:`InferenceBlock` s (``traced_once``: compiled as one nested
    region, :class:`_InferenceBlockTracedOnce`); the last one computes only the prefix tokens when the head
    reads nothing else (a pooled head on the class/distillation tokens). A block with forward hooks of its own
    stays a ``Block`` (:func:`_has_own_hooks`), so that its hooks run and see every token."""
    block_class = _InferenceBlockTracedOnce if traced_once else InferenceBlock
    for deit in [m for m in model.modules() if isinstance(m, DeiT)]:
        prefix_only = deit.head_input == "pooled" and deit.global_pool == "token"
        last = len(deit.blocks) - 1
        for i, block in enumerate(deit.blocks):
            if type(block) is Block and not _has_own_hooks(block):
                queries = deit.num_prefix_tokens if prefix_only and i == last else None
                deit.blocks[i] = block_class(block, queries)


def _quantize_linears(model: nn.Module) -> bool:
    """Replace ``model``'s ``nn.Linear`` layers, in place, by dynamic int8 ones; False (with a warning) if
    this torch cannot.

    Weights become int8 with one scale per output channel; each call quantizes a layer's input with one scale
    for the whole input tensor (so an image's result can move slightly with its batch mates) and runs
    FBGEMM / oneDNN int8 kernels; everything else stays fp32. The layers are those, and the weights bit for bit
    those, of ``torch.ao.quantization.quantize_dynamic`` with ``per_channel_dynamic_qconfig``, torch's one
    eager int8 flow with CPU kernels (torchao's int8 path needs ``torch.compile`` to reach them). Its steps are
    public and taken here one by one because its ``from_float`` first builds each layer at full size and packs
    an all-zero weight that is then replaced, as costly to pack as the real one. torch has deprecated
    ``torch.ao.quantization`` in favour of torchao: this is the one place that uses it, quiets its deprecation
    warnings and, once a release drops it, falls back to fp32 with a warning.
    """
    slots = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        # as the flow: subclasses are not swapped, nor is a Linear at the root; nor, here, a hooked one
        if type(child) is nn.Linear and not _has_own_hooks(child)
    ]
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_\w+.* are deprecated")
            convert = functools.partial(
                _int8_linear, qconfig=per_channel_dynamic_qconfig, int8_class=DynamicInt8Linear
            )
            # torch quantizes and packs a weight on one thread: the layers go to all of torch's threads.
            with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(slots)))) as pool:
                int8 = list(pool.map(convert, [child for *_, child in slots]))
    except (ImportError, AttributeError, RuntimeError) as err:
        warnings.warn(
            f"torch {torch.__version__} cannot quantize linear layers to int8 here ({type(err).__name__}: "
            f"{err}); running in float32 instead",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    for (parent, name, _), layer in zip(slots, int8):
        setattr(parent, name, layer)
    return True


def _int8_linear(linear: nn.Linear, qconfig: Any, int8_class: type[nn.Module]) -> nn.Module:
    """``int8_class.from_float(linear)`` without its full-size all-zero first layer: built at 1x1, then given
    the weight quantized as the flow does (the qconfig's observer, ``torch.quantize_per_channel``)."""
    observer = qconfig.weight()
    weight = linear.weight.detach().float()
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    qweight = torch.quantize_per_channel(
        weight, scales.double(), zero_points.long(), observer.ch_axis, torch.qint8
    )
    layer = int8_class(1, 1, bias_=linear.bias is not None, dtype=torch.qint8)
    # an fp32 bias, as the fp32 activations around it, also for a model cast to half precision
    layer.set_weight_bias(qweight, None if linear.bias is None else linear.bias.detach().float())
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    return layer


def _int8_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` with int8 linear layers, or None (with a warning) if this torch cannot quantize.

    The int8 layers keep no float weights: the copy takes the plain ``nn.Linear`` layers' weights by reference
    and quantizes them at once, rather than copying most of the model's parameters only to drop them.
    """
    linears = [m for m in model.modules() if type(m) is nn.Linear and not _has_own_hooks(m)]
    shared = {id(p): p for m in linears for p in m.parameters(recurse=False)}
    converted = copy.deepcopy(model, memo=dict(shared))
    if not _quantize_linears(converted):
        return None
    # A shared weight the flow left float (tied to another module, or a Linear at the root): copy it too.
    if any(id(p) in shared for p in converted.parameters()):
        converted = copy.deepcopy(model)
        _quantize_linears(converted)
    return converted


class _LinearThenBias(nn.Linear):
    """An ``nn.Linear`` (same parameters and keys) that adds its bias after the matmul.

    For compiled half precision on CPUs without AMX, whose graphs are not frozen: aten's CPU ``addmm`` copies
    the broadcast bias into its output before the matmul, a pass over every linear's output, whereas a
    separate add fuses into the pointwise kernel that follows (GELU, the residual add, the head split)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        return out if self.bias is None else out + self.bias


class _PatchesThenLinear(nn.Conv2d):
    """An ``nn.Conv2d`` whose stride is its kernel (a patch embedding; same parameters and keys) run as one
    matmul over the flattened patches, the bias added after it.

    For compiled half precision on CPUs without AMX, where it measured faster than what inductor makes of the
    convolution: copies of the image and the weight into channels-last, every call, then oneDNN's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        (ph, pw), n = self.kernel_size, x.shape[0]
        gh, gw = x.shape[2] // ph, x.shape[3] // pw  # a convolution drops the rows and columns left over
        patches = x[:, :, : gh * ph, : gw * pw].reshape(n, -1, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        out = nn.functional.linear(patches.reshape(n, gh, gw, -1), self.weight.flatten(1))
        out = out if self.bias is None else out + self.bias
        return out.permute(0, 3, 1, 2)  # [N, C, H, W] like the convolution's output


def _patchifies(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == conv.stride
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


class _AttentionOnContiguousHeads(Attention):
    """:class:`Attention` that copies keys and values into contiguous ``[B, heads, N, d]`` tensors before its
    two matmuls. Compiled, the copies fuse into the kernel that adds the qkv bias; left to aten, its batched
    matmul makes each copy in a call of its own."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return super().attend(q, k.contiguous(), v.contiguous())


class _AttentionInBf16(Attention):
    """:class:`Attention` whose two matmuls and softmax run in bf16, for the int8 copy on CPUs with native
    bf16: they are not linear layers, so quantization leaves them in fp32, where they run slower. The casts
    also make the heads contiguous, which the batched matmuls would otherwise do in copies of their own."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        half = (t.to(torch.bfloat16, memory_format=torch.contiguous_format) for t in (q, k, v))
        return super().attend(*half).to(q.dtype)


def _bias_after_matmul(child: nn.Module) -> nn.Module | None:
    """``child`` as a :class:`_LinearThenBias` or :class:`_PatchesThenLinear` sharing its parameters, or None
    where it is neither a plain ``nn.Linear`` nor a patch-embedding ``nn.Conv2d``."""
    if type(child) is nn.Linear:
        twin: nn.Linear | nn.Conv2d = _LinearThenBias(
            child.in_features, child.out_features, bias=child.bias is not None, device="meta"
        )
    elif type(child) is nn.Conv2d and _patchifies(child):
        twin = _PatchesThenLinear(
            child.in_channels,
            child.out_channels,
            child.kernel_size,
            child.stride,
            bias=child.bias is not None,
            device="meta",
        )
    else:
        return None
    twin.weight, twin.bias = child.weight, child.bias
    return twin


def _tune_for_cpus_without_amx(model: nn.Module, compiled: bool) -> None:
    """Half precision on a CPU without AMX: attention as two matmuls and a softmax (torch's fused CPU kernel
    is fast in bf16 only with AMX) and, when compiled, on contiguous keys and values
    (:class:`_AttentionOnContiguousHeads`), with biases added after the matmuls (:class:`_LinearThenBias`)
    and the patch embedding as a matmul (:class:`_PatchesThenLinear`)."""
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = False
        if not compiled:
            continue
        if type(module) is Attention:  # a subclass adding no state: the same module, another attend
            module.__class__ = _AttentionOnContiguousHeads
        for name, child in list(module.named_children()):
            twin = _bias_after_matmul(child)
            if twin is not None and not _has_own_hooks(child):  # the twin would not carry its hooks
                setattr(module, name, twin)


def _compile(model: nn.Module, cuda_graphs: bool) -> Any:
    # dynamic=False: DeiT runs at a few fixed shapes, and static shapes generate the fastest kernels.
    # "reduce-overhead" replays each shape's kernels as one CUDA graph: without it a small batch on a GPU is
    # bound by launching a few hundred kernels one by one.
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)


# Dynamo keeps one cache per code object, shared by every instance: each input shape, and each fast model
# with frozen weights, adds an entry to DeiT.forward's cache; at the default limit of 8 the ninth would
# silently run eagerly.
_RECOMPILE_LIMIT = 64


def _compile_settings(device: torch.device, dtype: torch.dtype) -> contextlib.ExitStack:
    """Compiler settings for the compiles that happen inside this call only.

    * Weight freezing folds the constant weights into the graph, which on CPU lets inductor pre-pack them for
      oneDNN and fuse bias, GELU and the residual add into the matmuls (without it the compiled bf16 model
      spends a sizeable share of its time broadcasting biases into ``addmm`` outputs). It applies
      only with grad disabled, which the wrapper guarantees.
    * Only there, in half precision on a CPU with AMX (:func:`_prepacks`): fp32 on CPU, half precision on
      CPUs without AMX (with :class:`_LinearThenBias`) and every GPU dtype measured no faster frozen, and
      frozen graphs miss inductor's on-disk cache (pre-packed weights do not pickle; on GPUs the weights would
      become constants of each graph), so every new process would compile from scratch.
    * Dynamo's recompile limit is raised to ``_RECOMPILE_LIMIT`` entries, and hitting it raises instead of
      quietly running eagerly, so the wrapper can fall back with a warning.

    All are read when a graph compiles, which happens lazily inside the call: hence a scoped patch rather than
    ``torch.compile(options=...)`` (which does not reach freezing) or a global setting (which would change
    the user's other compiles).
    """
    stack = contextlib.ExitStack()
    inductor_config = _compiler_internals().inductor_config
    if inductor_config is not None:
        stack.enter_context(inductor_config.patch(freezing=_prepacks(device, dtype)))
    config = _compiler_internals().limit_config
    if config is not None:
        limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
        stack.enter_context(config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True))
    return stack


def optimize_for_inference(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
) -> FastInferenceModel:
    """Return a fast, inference-only copy of ``model`` (the original is not modified).

    Args:
        model: any module, typically a :class:`deit_registry.DeiT`; it is deep-copied, put in eval mode and
            cast to ``dtype`` on its current device (``torch.qint8``: its linear layers quantized).
        dtype: compute dtype; ``None`` picks the fastest trade for the device (:func:`pick_dtype`:
            bfloat16 on CPUs with AVX512-BF16/AMX and recent GPUs, float16 on older GPUs, ``torch.qint8`` on
            other x86 CPUs and for deit_small and wider on CPUs with AVX512-BF16 but no AMX (every DeiT on
            AMD Zen 4), else float32).
            ``torch.qint8`` (CPU only): dynamic int8 linear layers, the rest fp32 except attention, which
            runs in bf16 where the CPU has native bf16.
        compile: ``torch.compile`` it with inductor (weights frozen for half precision on CPUs with AMX);
            ``None`` compiles when a compiler is available for the device (:func:`compiler_available`) and the
            dtype is not ``torch.qint8`` (compiling around the int8 layers is slower than running them eagerly;
            an int8 DeiT runs a TorchScript trace of itself per input shape instead, ``traced``), ``False``
            never (nor traces), ``True`` always (falling back to eager with a warning if compilation fails).
        cuda_graphs: with ``compile``, replay each input shape's compiled kernels as one CUDA graph
            (``torch.compile(mode="reduce-overhead")``): far less launch overhead at small batches, for GPU
            memory held per shape. ``None``: on for models on CUDA. The graph overwrites its outputs on the
            next call, so the wrapper returns copies.

    Example, on a GPU::

        fast = optimize_for_inference(model.cuda())  # bf16, compiled, CUDA graphs
        no_graphs = optimize_for_inference(model.cuda(), cuda_graphs=False)  # e.g. for many input shapes

    On CUDA the half dtypes make ``scaled_dot_product_attention`` pick its fused flash / memory-efficient
    kernels. See the module docstring for what this mode trades.
    """
    if dtype is not None and dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16, torch.float32 or None; got {dtype!r}")
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None; got {compile!r}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True, False or None; got {cuda_graphs!r}")
    device = _model_device(model)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {device}")
    if cuda_graphs and compile is False:
        raise ValueError("cuda_graphs=True replays compiled graphs: it needs compile=True or None")
    if dtype is None:
        dtype = pick_dtype(device, model)
    elif dtype is torch.bfloat16 and device.type == "cpu" and not _cpu_has_native_bf16():
        warnings.warn(
            "this CPU has no native bf16 kernels: bfloat16 is emulated here and likely slower than float32",
            RuntimeWarning,
            stacklevel=2,
        )
    elif dtype is torch.qint8 and device.type != "cpu":
        raise ValueError(f"dtype=torch.qint8 runs on the CPU only; the model is on {device}")
    converted = _int8_copy(model) if dtype is torch.qint8 else copy.deepcopy(model)
    if converted is None:  # this torch cannot quantize (warned)
        dtype, converted = torch.float32, copy.deepcopy(model)
    converted.eval()
    for p in converted.parameters():
        p.requires_grad_(False)
    # int8: everything but the int8 layers computes in fp32, also for a model cast to half precision
    converted.to(torch.float32 if dtype is torch.qint8 else dtype)
    compiled = None
    # int8 by default: the quantized linears are opaque to the compiler, and compiling around them measured
    # slower than running the model eagerly; a DeiT's plain calls run a TorchScript trace of it instead.
    traced = compile is None and dtype is torch.qint8 and isinstance(converted, DeiT)
    if compile is None:
        compile = dtype is not torch.qint8 and compiler_available(device)
        if not compile and dtype is not torch.qint8:
            warnings.warn(
                f"no torch.compile backend for {device.type} here (C++ compiler or Triton missing); running "
                f"eagerly in {dtype}",
                RuntimeWarning,
                stacklevel=2,
            )
    # Blocks traced once where that was measured: compiled CPU graphs with the weights as graph inputs
    # (frozen, pre-packed weights must be constants inside each block's code; int8 and GPUs: not measured).
    unfrozen_cpu = device.type == "cpu" and dtype is not torch.qint8 and not _prepacks(device, dtype)
    _use_inference_blocks(converted, traced_once=bool(compile) and unfrozen_cpu)
    if dtype is torch.qint8 and _cpu_has_native_bf16():
        for module in converted.modules():
            if type(module) is Attention:  # a subclass adding no state: the same module, another attend
                module.__class__ = _AttentionInBf16
        if not _cpu_has_amx():
            _tune_for_cpus_without_amx(converted, compiled=False)  # the attention part only
    elif _half_on_cpu(device, dtype) and not _prepacks(device, dtype):
        _tune_for_cpus_without_amx(converted, compiled=bool(compile))
    cuda_graphs = bool(compile) and device.type == "cuda" and cuda_graphs is not False
    if compile:
        try:
            compiled = _compile(converted, cuda_graphs)
        except RuntimeError as err:  # e.g. torch.compile unsupported on this Python / platform
            warnings.warn(
                f"torch.compile unavailable ({err}); running eagerly in {dtype}", RuntimeWarning, stacklevel=2
            )
    return FastInferenceModel(converted, dtype, compiled, cuda_graphs, traced=traced)
