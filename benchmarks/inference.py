"""Inference speed of deit-registry's DeiT against timm's same-named model with identical weights, against what
a user who wants speed runs: timm's model under ``torch.compile``.

::

    python benchmarks/inference.py         # deit_tiny, deit_small_distilled, deit_base (patch16_224); batch 1 and 32
    python benchmarks/inference.py --variants deit_base_patch16_224 --batch-sizes 8 --modes fast-fp32 --repeats 9
    python benchmarks/inference.py --device cuda --batch-sizes 1 32 256 --modes exact bf16 fast fast-nographs

For each variant, timm's own model (``timm.models.deit.<name>``: importing deit_registry points timm's registry
at ours) is created with random weights and its state_dict loaded into ours with ``strict=True`` (the fp32
outputs are checked to agree). Modes, each a row per variant and batch size:

* ``exact``: our default fp32 model against timm's fp32 model, both eager.
* ``bf16``: both models cast to bf16, eager (skipped on CPUs without native bf16).
* ``fast``: ``deit_registry.fast.optimize_for_inference(model)`` with its defaults (``pick_dtype``: bf16 +
  compile where the device runs bf16 natively, except deit_small and wider on CPUs without AMX (every DeiT on
  AMD Zen 4); dynamic int8 linears there and on CPUs without native bf16, a DeiT's traced) against
  ``torch.compile(timm_model)`` in the same dtype, or for int8 in timm's fastest (bf16 where the CPU has it
  natively, else fp32: timm has no int8 path).
* ``fast-fp32``: ``optimize_for_inference(model, dtype=torch.float32)`` against timm compiled in fp32.
* ``fast-bf16``: ``optimize_for_inference(model, dtype=torch.bfloat16)`` against timm compiled in bf16 (skipped
  on CPUs without native bf16); beside ``fast-int8`` it shows which of the two ``pick_dtype`` should pick.
* ``fast-int8``: ``optimize_for_inference(model, dtype=torch.qint8)`` (CPU only) against timm compiled as
  for ``fast`` in int8.
* ``fast-nographs``: ``optimize_for_inference(model, cuda_graphs=False)`` (CUDA only): what the CUDA graphs of
  the ``fast`` row are worth.

Ours and timm's run alternately in one process (the machine may be shared: only ratios within a run mean
much); every figure is a median over ``--repeats`` rounds, or up to five times as many where they take
little time, or three where they would take over a minute, and ``range`` gives the lowest and highest of the rounds' speedups (how noisy the row was).
``ready s`` is the time from the untouched model to the first output (compiling included). The modes that
change numerics are then compared with fp32 on a small DeiT trained on scikit-learn's digits in the
same run (``benchmarks/agreement.py``): random weights have no meaningful top-1.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import deit_registry as dr
from deit_registry.fast import _cpuinfo, compiler_available, optimize_for_inference, pick_dtype
from deit_registry.variants import VARIANTS

MODES = ("exact", "bf16", "fast", "fast-fp32", "fast-bf16", "fast-int8", "fast-nographs")
# The modes' fixed dtypes; the others (fast, fast-nographs) take the fast mode's own choice for the device.
MODE_DTYPES = {
    "exact": torch.float32,
    "bf16": torch.bfloat16,
    "fast-fp32": torch.float32,
    "fast-bf16": torch.bfloat16,
    "fast-int8": torch.qint8,
}
EAGER_MODES = ("exact", "bf16")
DEFAULT_VARIANTS = ["deit_tiny_patch16_224", "deit_small_distilled_patch16_224", "deit_base_patch16_224"]


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


# /proc/cpuinfo flag -> name; the ones that decide which kernels oneDNN and FBGEMM can use.
CPU_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def cpu_features() -> str:
    """Which of :data:`CPU_FEATURES` this CPU has, e.g. ``"AVX2 yes, AVX-512 no, ..."``."""
    flags = set(_cpuinfo().get("flags", "").split())
    return ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for flag, name in CPU_FEATURES.items())


# Environment variables that cap the instruction set of torch's own kernels, inductor's code, oneDNN and
# FBGEMM: all four set to AVX2 run a CPU with AVX-512 as one without it.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")


def isa_caps() -> str:
    """The :data:`ISA_CAPS` set in the environment, e.g. ``"ONEDNN_MAX_CPU_ISA=AVX2"``; empty if none."""
    return ", ".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def mode_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The dtype a mode computes in on ``device`` for models that hold no DeiT (the fast mode asks the package,
    as it does itself; for a DeiT its pick may also depend on the width: the row's dtype column says)."""
    return MODE_DTYPES.get(mode) or pick_dtype(device)


def timm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype timm's model runs in beside ours: the same, or for int8 (no timm path) timm's fastest here."""
    if dtype is not torch.qint8:
        return dtype
    return torch.bfloat16 if pick_dtype(device) is torch.bfloat16 else torch.float32


MATMUL_N = 4096
DRIFT_IMAGES = 4  # images of each batch compared with our eager fp32 model


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Median GFLOP/s of a 4096^3 matmul in ``dtype``: the machine's matrix rate."""
    a = torch.randn(MATMUL_N, MATMUL_N, device=device).to(dtype)
    samples = timed_alternately({"mm": lambda: a @ a}, repeats, device)["mm"]
    return 2 * MATMUL_N**3 / statistics.median(samples) / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_compiler(device: torch.device) -> None:
    """Pay the compiler stack's one-time start-up here, not in the ``ready`` time of whichever model compiles
    first (ours, in every row): its imports, the C++ toolchain probe, and Dynamo's first trace through torch's
    own layers, both models' building blocks, which reads the source of ``torch.nn.functional`` once per
    process for its log lines."""
    layers = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(), nn.Dropout(0.0)).to(device).eval()
    with torch.inference_mode():
        torch.compile(layers, dynamic=False)(torch.ones(2, 8, device=device))


def timed_alternately(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    target_s: float = 0.1,
    budget_s: float = 3.0,
    row_cap_s: float = 60.0,
) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled in turn (each sample >= ``target_s``): ``repeats`` times, or
    up to 5x as often while that fits in ``budget_s``, since the quick rows (batch 1) are the noisy ones, and
    fewer (3 at least) where ``repeats`` rounds would take over ``row_cap_s``: the slow rows (deit_base at batch
    32) are the steady ones, and they would hold the benchmark past 10 minutes on a 2-vCPU Zen 3. The order
    reverses every round, so that neither side always runs right after the other's call. On the CPU the
    calibrating calls (made after the caller's warm-up) are the first round where each is a single call; on a
    GPU the second call may still record a CUDA graph."""
    inner, per_call = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        synchronize(device)
        per_call[name] = max(time.perf_counter() - start, 1e-6)
        inner[name] = max(1, round(target_s / per_call[name]))
    round_s = sum(inner[name] * per_call[name] for name in fns)
    repeats = max(repeats, min(5 * repeats, int(budget_s / round_s)))
    if repeats * round_s > row_cap_s:
        repeats = min(repeats, max(3, int(row_cap_s / round_s)))
    # The calibrating calls ran in round 0's order: on the CPU, single calls, they are its samples.
    first = int(device.type == "cpu" and all(n == 1 for n in inner.values()))
    samples = {name: [per_call[name]] * first for name in fns}
    for round_ in range(first, repeats):
        for name, fn in list(fns.items())[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def executed_fraction(model: nn.Module) -> float:
    """The share of the model's FLOPs that its fast copy executes (it skips the last block's work on tokens
    the head never reads: ``deit_registry.fast.InferenceBlock``), counted by ``torch.utils.flop_counter`` on
    one image with attention as explicit matmuls (the counter misses CPU scaled_dot_product_attention in some
    torch releases)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, *model.patch_embed.img_size)
    counts = []
    for probe in (copy.deepcopy(model), optimize_for_inference(model, dtype=torch.float32, compile=False)):
        for m in probe.modules():
            if isinstance(getattr(m, "fused_attn", None), bool):
                m.fused_attn = False
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            probe(x)
        counts.append(counter.get_total_flops())
    return counts[1] / counts[0]


def build_pair(name: str) -> tuple[nn.Module, nn.Module, float]:
    # timm's own implementation, from its module function: importing deit_registry registers our models in
    # timm's registry, so timm.create_model(name) would build ours.
    import timm.models.deit

    torch.manual_seed(0)
    theirs = getattr(timm.models.deit, name)(pretrained=False).eval()
    if isinstance(theirs, dr.DeiT):
        raise RuntimeError(f"timm.models.deit.{name} built deit_registry's model, not timm's")
    ours = dr.create_model(name).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, *ours.patch_embed.img_size)
    with torch.inference_mode():
        diff = (ours(x) - theirs(x)).abs().max().item()
    return ours, theirs, diff


def prepare_ours(mode: str, ours: nn.Module) -> tuple[Callable[[torch.Tensor], object], torch.dtype]:
    """Our callable for ``mode`` and the dtype it computes in (nothing compiled yet: that is the first call)."""
    if mode == "exact":
        return ours, torch.float32
    if mode == "bf16":
        return copy.deepcopy(ours).bfloat16(), torch.bfloat16
    fast = optimize_for_inference(
        ours, dtype=MODE_DTYPES.get(mode), cuda_graphs=False if mode == "fast-nographs" else None
    )
    return fast, fast.dtype


def prepare_timm(mode: str, theirs: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], object]:
    """timm's callable beside ours: eager for the eager modes, else compiled; in ``dtype``."""
    if dtype is not torch.float32:
        theirs = copy.deepcopy(theirs).to(dtype)
    # dynamic=False as the fast mode compiles: static shapes, one graph per batch size.
    return theirs if mode in EAGER_MODES else torch.compile(theirs, dynamic=False)


def run_row(
    mode: str,
    ours: nn.Module,
    theirs: nn.Module,
    batch: int,
    repeats: int,
    device: torch.device,
    budget_s: float = 3.0,
) -> dict[str, float]:
    torch.compiler.reset()  # each row compiles from scratch (inductor's on-disk caches stay, for both)
    x = torch.randn(batch, 3, *ours.patch_embed.img_size, device=device)
    ready = {}
    # Each side's ready time covers its own preparation (copies, casts) and first call.
    start = time.perf_counter()
    ours_fn, dtype = prepare_ours(mode, ours)
    x_theirs = x.to(timm_dtype(dtype, device))
    x_ours = x_theirs if mode in EAGER_MODES else x  # the fast wrapper casts its inputs itself
    with torch.inference_mode():
        out = ours_fn(x_ours)
        synchronize(device)
        ready["ours"] = time.perf_counter() - start
        start = time.perf_counter()
        theirs_fn = prepare_timm(mode, theirs, timm_dtype(dtype, device))
        theirs_fn(x_theirs)
        synchronize(device)
        ready["timm"] = time.perf_counter() - start
        # Against our eager fp32 model (the exact mode is that model: 0 without running it again), on the
        # batch's first images: a whole deit_base batch would cost seconds more per row on a 2-vCPU machine.
        n = min(batch, DRIFT_IMAGES)
        drift = 0.0 if mode == "exact" else (out[:n].float() - ours(x[:n])).abs().max().item()
        samples = timed_alternately(
            {"ours": lambda: ours_fn(x_ours), "timm": lambda: theirs_fn(x_theirs)},
            repeats,
            device,
            budget_s=budget_s,
        )
    med = {k: statistics.median(v) for k, v in samples.items()}
    # One ratio per round, of two calls made back to back: a slow phase of the machine slows both.
    ratios = [t / o for o, t in zip(samples["ours"], samples["timm"])]
    return {
        "dtype": dtype,
        "ours_s": med["ours"],
        "timm_s": med["timm"],
        "speedup": statistics.median(ratios),
        "spread": (min(ratios), max(ratios)),
        "ours_ready": ready["ours"],
        "timm_ready": ready["timm"],
        "drift": drift,
    }


def agreement_report(modes: list[str], device: torch.device, quick: bool) -> list[str]:
    """Top-1 agreement with fp32 and accuracy of each numerics-changing dtype on a DeiT trained on digits."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import agreement
    except ImportError as err:  # scikit-learn is a test dependency, not the package's
        return [f"# agreement skipped: {err} (pip install scikit-learn)"]
    finally:
        sys.path.pop(0)

    model, info = agreement.train_digits_deit(**agreement.QUICK if quick else {})
    model = model.to(device)
    _, _, x_test, y_test = agreement.digits_images(size=model.patch_embed.img_size[0])
    x_test, y_test = x_test.to(device), y_test.to(device)
    dtypes = {mode_dtype(m, device) for m in modes if m not in EAGER_MODES}
    if device.type == "cpu":
        dtypes |= {torch.qint8, torch.bfloat16}  # both CPU trades, whichever this CPU picks by default
    lines = [
        f"# agreement: a {info['params'] / 1e6:.2f}M-parameter DeiT trained on scikit-learn's digits "
        f"({info['epochs']} epochs, {info['train_seconds']:.0f} s), {len(y_test)} held-out images:"
    ]
    for dtype in sorted(dtypes, key=str):
        with warnings.catch_warnings():
            # bf16 on a CPU without native bf16: slow, which does not matter here (the line says "eager")
            warnings.filterwarnings("ignore", message="this CPU has no native bf16", category=RuntimeWarning)
            fast = optimize_for_inference(model, dtype=dtype, compile=False)
        r = agreement.agreement(model, fast, x_test, y_test)
        lines.append(
            f"#   {dtype_name(dtype):8} (eager): top-1 agreement with fp32 {100 * r['top1_agreement']:.2f}%, "
            f"accuracy {100 * r['accuracy']:.2f}% (fp32 {100 * r['reference_accuracy']:.2f}%), max |logit "
            f"diff| {r['max_abs_logit_diff']:.1e}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["exact", "fast"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds per row (medians reported; quick rows get more, rows past a minute 3)",
    )
    parser.add_argument(
        "--sample-seconds", type=float, default=3.0, help="time per row for extra samples of the quick rows"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-agreement", action="store_true", help="skip the trained-model agreement check")
    parser.add_argument("--quick-agreement", action="store_true", help="train the agreement model briefly")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# {datetime.date.today()}  torch {torch.__version__}  {where}  threads={torch.get_num_threads()}")
    print(f"# CPU features: {cpu_features()}")
    if isa_caps():
        print(f"# kernels capped by the environment: {isa_caps()} (the features above are the CPU's)")
    skipped = []
    # mode -> why it cannot run here (None: said in `skipped` already)
    unavailable: dict[str, str | None] = {}
    if device.type == "cpu" and pick_dtype(device) is not torch.bfloat16:
        skipped.append(
            "bf16 and fast-bf16 rows: no native bf16 on this CPU (the fast mode runs dynamic int8 linears here, "
            "or fp32 without x86 int8 kernels; emulated bf16 would only be slower)"
        )
        unavailable.update({"bf16": None, "fast-bf16": None})
    if device.type != "cpu":
        unavailable["fast-int8"] = f"int8 linear layers run on the CPU only, not {device.type}"
    if device.type != "cuda":
        unavailable["fast-nographs"] = f"CUDA graphs exist on CUDA only, not {device.type}"
    if any(m not in EAGER_MODES for m in args.modes) and not compiler_available(device):
        unavailable.update({m: None for m in MODES if m not in EAGER_MODES})
        skipped.append(f"timm compiled rows: no torch.compile backend for {device.type} here")
    modes = [m for m in args.modes if m not in unavailable]
    skipped += [f"{m} rows: {unavailable[m]}" for m in args.modes if unavailable.get(m)]
    compiling = any(m not in EAGER_MODES for m in modes)
    if compiling:
        warm_up_compiler(device)
    dtypes = sorted({timm_dtype(mode_dtype(m, device), device) for m in modes}, key=str)
    rates = {dt: matmul_rate(dt, device, args.repeats) for dt in dtypes}
    print(
        "# matmul 4096^3: "
        + ", ".join(f"{dtype_name(dt)} {rate:.0f} GFLOP/s" for dt, rate in rates.items())
        + "; fast: optimize_for_inference(model) picks the dtype column's"
    )
    print(
        f"{'variant':34} {'mode':13} {'dtype':8} {'bs':>3} | {'ours im/s':>9} {'timm im/s':>9} {'speedup':>7} "
        f"{'range':>9} | "
        f"{'ours ms':>8} {'timm ms':>8} | {'ours %mm':>8} {'timm %mm':>8} | {'ours ready s':>12} "
        f"{'timm ready s':>12} | {'diff fp32':>9}   (timm: eager for exact and bf16, torch.compile otherwise)"
    )
    notes = []
    for name in args.variants:
        ours, theirs, diff = build_pair(name)
        ours, theirs = ours.to(device), theirs.to(device)
        notes.append(f"# {name}: fp32 parity with timm's model, max abs diff {diff:.1e}")
        gflop = 2 * VARIANTS[name].gmacs
        fraction = executed_fraction(ours.cpu()) if compiling else 1.0
        ours.to(device)
        for mode in modes:
            for batch in args.batch_sizes:
                r = run_row(mode, ours, theirs, batch, args.repeats, device, args.sample_seconds)
                rate = rates[timm_dtype(r["dtype"], device)]
                executed = {"ours": gflop * (1.0 if mode in EAGER_MODES else fraction), "timm": gflop}
                pct = {k: 100 * executed[k] * batch / r[f"{k}_s"] / rate for k in ("ours", "timm")}
                low, high = r["spread"]
                print(
                    f"{name:34} {mode:13} {dtype_name(r['dtype']):8} {batch:>3} | {batch / r['ours_s']:9.1f} "
                    f"{batch / r['timm_s']:9.1f} {r['speedup']:6.2f}x {low:4.2f}-{high:4.2f} | "
                    f"{1e3 * r['ours_s']:8.1f} {1e3 * r['timm_s']:8.1f} | {pct['ours']:7.0f}% {pct['timm']:7.0f}% | "
                    f"{r['ours_ready']:12.2f} {r['timm_ready']:12.2f} | {r['drift']:9.1e}",
                    flush=True,
                )
    lines = notes
    if not args.no_agreement and compiling:
        lines += agreement_report(modes, device, args.quick_agreement)
    elif args.no_agreement:
        skipped.append("agreement on a trained model: --no-agreement")
    for line in lines:
        print(line)
    for reason in skipped:
        print(f"# skipped: {reason}")
    print(
        "# speedup = timm time / ours (median of per-round ratios; range: the lowest and highest); %mm = "
        "achieved GFLOP/s (executed FLOPs: the fast copy skips part of the last block) / the 4096^3 matmul "
        "rate in timm's dtype; ready = seconds from the model to the first output, compiling included; "
        f"diff fp32 = max abs difference of our logits from our eager fp32 model's (first {DRIFT_IMAGES} images); "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
