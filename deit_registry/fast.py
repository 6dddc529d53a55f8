"""A fast inference mode: one call that trades a little precision for speed.

::

    import deit_registry as dr
    from deit_registry.fast import optimize_for_inference

    model = dr.create_model("deit_small_distilled_patch16_224", pretrained=True).eval()
    fast = optimize_for_inference(model)          # bf16 weights + torch.compile (inductor, frozen weights)
    logits = fast(images)                         # float32 in, float32 out; first call compiles (slow on small CPUs)

What it trades (the default model is untouched and stays exact fp32):

* **Precision.** Weights and activations run in bfloat16 (fp16 on CUDA devices without bf16). Pre-logit
  features stay at cosine similarity >= 0.999 to fp32 and top-1 classes agree where logits are well
  separated (``benchmarks/inference.py`` reports both), but logits differ from fp32 in the second or third
  significant digit, so near-ties can flip. Pass ``dtype=torch.float32`` to keep fp32.
* **Start-up time.** With ``compile`` the first call per input shape compiles the model (tens of seconds to
  minutes on a small CPU); later calls reuse it. Inductor's on-disk cache makes later processes faster.
* **Flexibility.** Inference only: it runs under ``torch.inference_mode()``, the weights are frozen into the
  compiled graph (later edits to the original model's parameters are not seen), and each new input shape
  compiles again (``dynamic=False``: batch sizes you use should be few; a process holds up to
  ``_RECOMPILE_LIMIT`` = 64 compiled graphs across all fast models).

How, on CPU: bf16 weights; inductor with weight freezing, so the linears run as pre-packed oneDNN kernels
with bias, GELU and the residual add fused; the C++ wrapper; and attention as two batched matmuls around a
softmax (``Attention.fused_attn = False``), which measured faster here than the fused
``scaled_dot_product_attention`` CPU kernel in half precision. On CUDA the fused attention kernels stay. To
override the choice, set ``fused_attn`` on ``fast.model``'s attention modules before the first call.

The copy's blocks run an inference-only forward of their own (:class:`InferenceBlock`, the same modules and
weights): GELU overwrites fc1's output in place (one large buffer fewer per block in eager mode), and when the
head reads only the class (and distillation) tokens the last block computes its queries, projection and MLP
for those tokens alone (keys and values for all): the same outputs up to rounding, less compute. The copy's
``forward_features`` therefore returns the prefix tokens only, and forward hooks on the copy's last block see
those tokens only; the original model is untouched.

Where a piece is missing it falls back and says so with a warning: no bf16 support -> float32; no C++
compiler (CPU) or Triton (CUDA), a compile that fails, or too many compiled graphs -> eager execution;
torch's compiler internals moved (see :func:`_compiler_internals`) -> compiling without weight freezing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import Attention, Block, DeiT

__all__ = [
    "FastInferenceModel",
    "InferenceBlock",
    "optimize_for_inference",
    "pick_dtype",
    "compiler_available",
]

_ALLOWED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def pick_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype with native matrix support on ``device``.

    CUDA: bfloat16 where supported (Ampere and later), else float16. CPU: bfloat16 when oneDNN has native
    bf16 kernels (AVX512-BF16 / AMX); otherwise float32, since emulated bf16 is slower than fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return torch.float32


def _cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 / AMX): the package's one bf16 probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # the op moved or is missing in this build: assume emulated
        return False


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

    inductor_config: (
        Any | None
    )  # inductor's config module: weight freezing, the C++ wrapper, the C++ compiler
    compile_errors: tuple[type[BaseException], ...]  # Dynamo's "the compiler failed" exceptions
    recompile_limit_error: type[BaseException] | None
    cxx: str | None
    limit_config: (
        Any | None
    )  # the config holding Dynamo's recompile_limit (public torch.compiler.config first)


@functools.cache
def _compiler_internals() -> _CompilerInternals:
    """The one place that reads torch's non-public compiler modules.

    Inductor's weight freezing and C++ wrapper have no public switch (``torch.compile(options=...)`` reaches
    inductor but not Dynamo, which reads ``freezing`` while tracing), and Dynamo's compile-failure exceptions
    are not exported publicly. Dynamo's recompile limit is set through the public ``torch.compiler.config``
    where it has it, else Dynamo's own config (see :func:`_compile_settings`). If a torch release moves these modules, this warns once
    and the fast mode still works: it compiles without freezing and does not catch compile errors.
    """
    public = getattr(torch.compiler, "config", None)
    public_limit = public if public is not None and hasattr(public, "recompile_limit") else None
    try:
        inductor_config = importlib.import_module("torch._inductor.config")
        exc = importlib.import_module("torch._dynamo.exc")
        errors = (exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.FailOnRecompileLimitHit)
        for name in ("freezing", "cpp_wrapper", "cpp"):
            getattr(inductor_config, name)
        cxx = inductor_config.cpp.cxx[-1] if inductor_config.cpp.cxx else None
        # torch.compiler.config gained recompile_limit after torch 2.9; before, only Dynamo's own config has it
        limit_config = public_limit or importlib.import_module("torch._dynamo.config")
        limit_config.recompile_limit, limit_config.fail_on_recompile_limit_hit  # noqa: B018 (present?)
    except (ImportError, AttributeError, TypeError) as err:
        warnings.warn(
            f"torch {torch.__version__}'s compiler internals are not where deit_registry.fast expects them "
            f"({type(err).__name__}: {err}); compiling without weight freezing or the C++ wrapper, and compile "
            "failures are not caught",
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
    ``model`` is the converted copy, ``dtype`` the compute dtype and ``compiled`` whether calls go through
    ``torch.compile`` (it turns False if compiling fails).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, compiled: Any | None) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device = _model_device(model)
        # Kept out of the module tree: the compiled wrapper holds ``model`` again (one copy of the weights in
        # state_dict and repr).
        self.__dict__["_compiled"] = compiled
        # Inputs (shape, strides, inference flag: what Dynamo guards on) already compiled: their calls skip the
        # compile settings, whose patching costs a noticeable share of a small model's batch-1 latency.
        self._compiled_inputs: set[tuple[Any, ...]] = set()

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        x = x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else x.dtype)
        with torch.inference_mode():
            if self._compiled is not None:
                key = _input_key(x, args, kwargs)
                settings = (
                    contextlib.nullcontext()
                    if key in self._compiled_inputs
                    else _compile_settings(self.device)
                )
                try:
                    with settings:
                        out = self._compiled(x, *args, **kwargs)
                    if key is not None:
                        self._compiled_inputs.add(key)
                except _compiler_internals().compile_errors as err:
                    limit_error = _compiler_internals().recompile_limit_error
                    reason = (
                        f"this process already holds {_RECOMPILE_LIMIT} compiled DeiT graphs (one per fast model "
                        "and input shape; raise deit_registry.fast._RECOMPILE_LIMIT or reuse fast models)"
                        if limit_error is not None and isinstance(err, limit_error)
                        else f"{type(err).__name__}: {str(err).splitlines()[0]}"
                    )
                    warnings.warn(
                        f"torch.compile failed ({reason}); running this model eagerly in {self.dtype} instead "
                        "(pass compile=False to skip compiling)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    self.__dict__["_compiled"] = None
                    out = self.model(x, *args, **kwargs)
            else:
                out = self.model(x, *args, **kwargs)
        return _cast_floats(out, out_dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, device={self.device}, compiled={self.compiled}"


def _input_key(x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What Dynamo guards on for a plain call: shape, strides, inference flag. None for calls with extra
    arguments, which may need a graph of their own."""
    if args or kwargs:
        return None
    return (tuple(x.shape), x.stride(), x.is_inference(), x.requires_grad)


def _cast_floats(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_cast_floats(o, dtype) for o in out)
    if isinstance(out, dict):
        return {k: _cast_floats(v, dtype) for k, v in out.items()}
    return out


def _choose_attention(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Pick the faster attention implementation for ``device`` and ``dtype`` on each attention layer.

    On CPU in bf16/fp16 two batched matmuls around a softmax beat the fused ``scaled_dot_product_attention``
    kernel at DeiT's sequence lengths (``benchmarks/`` has the figures); in fp32 the two are level, and on
    CUDA the fused flash / memory-efficient kernels win, so those keep it. Modules without a ``fused_attn`` switch are left alone.
    """
    _set_switch(model, "fused_attn", device.type != "cpu" or dtype == torch.float32)


def _set_switch(model: nn.Module, name: str, value: bool) -> None:
    """Set the bool attribute ``name`` on every module of ``model`` that has one (others are left alone)."""
    for module in model.modules():
        if isinstance(getattr(module, name, None), bool):
            setattr(module, name, value)


class InferenceBlock(nn.Module):
    """A :class:`~deit_registry.architecture.Block`'s own modules (same names, same state-dict keys) run for
    inference only, in the fast copy where no caller can hold an intermediate tensor.

    * GELU overwrites fc1's output in place: one ``[B, N, 4D]`` buffer fewer per block in eager mode (compiled
      graphs fuse it either way).
    * With ``num_queries`` (the last block of a model whose head reads only the prefix tokens) the block
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
        else:
            x = x[:, : self.num_queries] + self.drop_path1(
                _leading_queries(self.attn, self.norm1(x), self.num_queries)
            )
        mlp = self.mlp
        h = mlp.fc1(self.norm2(x))
        if type(mlp.act) is nn.GELU and not (torch.is_grad_enabled() and h.requires_grad):
            h = torch.ops.aten.gelu_(h, approximate=mlp.act.approximate)
        else:
            h = mlp.act(h)
        return x + self.drop_path2(mlp.drop2(mlp.fc2(mlp.drop1(h))))

    def extra_repr(self) -> str:
        return f"num_queries={self.num_queries}"


def _leading_queries(attn: Attention, x: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``attn`` for the first ``num_queries`` tokens as queries: the q rows of the fused projection for those
    tokens, the k and v rows for all."""
    b, n, c = x.shape
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :num_queries], w[:c], None if bias is None else bias[:c])
    q = q.reshape(b, num_queries, attn.num_heads, attn.head_dim).transpose(1, 2)
    kv = F.linear(x, w[c:], None if bias is None else bias[c:])
    k, v = kv.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = attn.attend(q, k, v).transpose(1, 2).reshape(b, num_queries, c)
    return attn.proj_drop(attn.proj(out))


def _use_inference_blocks(model: nn.Module) -> None:
    """Give every DeiT inside ``model`` :class:`InferenceBlock` s; the last one computes only the prefix tokens
    when the head reads nothing else (a pooled head on the class/distillation tokens)."""
    for deit in [m for m in model.modules() if isinstance(m, DeiT)]:
        prefix_only = deit.head_input == "pooled" and deit.global_pool == "token"
        last = len(deit.blocks) - 1
        for i, block in enumerate(deit.blocks):
            if type(block) is Block:
                queries = deit.num_prefix_tokens if prefix_only and i == last else None
                deit.blocks[i] = InferenceBlock(block, queries)


def _compile(model: nn.Module, device: torch.device) -> Any:
    # dynamic=False: DeiT runs at a few fixed shapes, and static shapes generate the fastest kernels.
    return torch.compile(model, dynamic=False)


# Dynamo keeps one cache per code object, shared by every instance: each fast model (and each input shape)
# adds an entry to DeiT.forward's cache, and at the default limit of 8 the ninth would silently run eagerly.
_RECOMPILE_LIMIT = 64


def _compile_settings(device: torch.device) -> contextlib.ExitStack:
    """Compiler settings for the compiles that happen inside this call only.

    * Weight freezing folds the constant weights into the graph, which on CPU lets inductor pre-pack them for
      oneDNN and fuse bias, GELU and the residual add into the matmuls (without it the compiled bf16 model
      spends a sizeable share of its time broadcasting biases into ``addmm`` outputs). It applies
      only with grad disabled, which the wrapper guarantees.
    * On CPU, the C++ wrapper calls the kernels from generated C++ instead of Python: lower batch-1 latency
      for the small variants (no change at large batches), for a few more seconds of compiling.
    * Dynamo's recompile limit is raised to ``_RECOMPILE_LIMIT`` entries, and hitting it raises instead of
      quietly running eagerly, so the wrapper can fall back with a warning.

    All are read when a graph compiles, which happens lazily inside the call: hence a scoped patch rather than
    ``torch.compile(options=...)`` (which does not reach freezing) or a global setting (which would change
    the user's other compiles).
    """
    stack = contextlib.ExitStack()
    inductor_config = _compiler_internals().inductor_config
    if inductor_config is not None:
        stack.enter_context(inductor_config.patch(freezing=True, cpp_wrapper=device.type == "cpu"))
    config = _compiler_internals().limit_config
    if config is not None:
        limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
        stack.enter_context(config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True))
    return stack


def optimize_for_inference(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    compile: bool | None = None,
) -> FastInferenceModel:
    """Return a fast, inference-only copy of ``model`` (the original is not modified).

    Args:
        model: any module, typically a :class:`deit_registry.DeiT`; it is deep-copied, put in eval mode and
            cast to ``dtype`` on its current device.
        dtype: compute dtype; ``None`` picks the fastest one with native support (:func:`pick_dtype`:
            bfloat16 on CPUs with AVX512-BF16/AMX and recent GPUs, float16 on older GPUs, else float32).
        compile: ``torch.compile`` it with inductor and frozen weights; ``None`` compiles when a compiler is
            available for the device (:func:`compiler_available`), ``False`` never, ``True`` always (falling
            back to eager with a warning if compilation fails).

    On CUDA the half dtypes make ``scaled_dot_product_attention`` pick its fused flash / memory-efficient
    kernels. See the module docstring for what this mode trades.
    """
    if dtype is not None and dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16, torch.float32 or None; got {dtype!r}")
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None; got {compile!r}")
    device = _model_device(model)
    if dtype is None:
        dtype = pick_dtype(device)
    elif dtype is torch.bfloat16 and device.type == "cpu" and pick_dtype(device) is not torch.bfloat16:
        warnings.warn(
            "this CPU has no native bf16 kernels: bfloat16 is emulated here and likely slower than float32",
            RuntimeWarning,
            stacklevel=2,
        )
    converted = copy.deepcopy(model).eval().to(dtype)
    for p in converted.parameters():
        p.requires_grad_(False)
    _choose_attention(converted, device, dtype)
    _use_inference_blocks(converted)
    compiled = None
    if compile is None:
        compile = compiler_available(device)
        if not compile:
            warnings.warn(
                f"no torch.compile backend for {device.type} here (C++ compiler or Triton missing); running "
                f"eagerly in {dtype}",
                RuntimeWarning,
                stacklevel=2,
            )
    if compile:
        try:
            compiled = _compile(converted, device)
        except RuntimeError as err:  # e.g. torch.compile unsupported on this Python / platform
            warnings.warn(
                f"torch.compile unavailable ({err}); running eagerly in {dtype}", RuntimeWarning, stacklevel=2
            )
    return FastInferenceModel(converted, dtype, compiled)
