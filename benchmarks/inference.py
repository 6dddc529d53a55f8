"""Inference speed of deit-registry's DeiT against timm's same-named model, with identical weights.

::

    python benchmarks/inference.py                                  # tiny, small, small distilled; batch 1 and 32
    python benchmarks/inference.py --variants deit_base_patch16_224 --batch-sizes 8 --modes fast --repeats 9

For each variant, timm's own model (``timm.models.deit.<name>``: importing deit_registry points timm's registry
at ours) is created with random weights and its state_dict loaded into ours with
``strict=True`` (the fp32 outputs are checked to agree). Modes:

* ``exact``: our default fp32 model against timm's fp32 model, both eager.
* ``fast``: ``deit_registry.fast.optimize_for_inference(model)`` (bf16 + torch.compile here) against timm's
  model with its weights cast to bf16 (the same dtype our fast mode picked).
* ``fast-fp32``: ``optimize_for_inference(model, dtype=torch.float32)`` against timm's fp32 model.

Ours and timm's run alternately in one process (the machine may be shared: only ratios within a run mean
much); every figure is a median over ``--repeats`` samples. Achieved GFLOP/s counts 2 x the variant's GMACs per
image (for our fast modes only the share they execute, see ``executed_fraction``) and is divided by the
machine's matmul rate in the mode's dtype: a 4096^3 matmul timed in the same rotation as the two models (and
once at the start, for the header). Peak memory is the tensor memory allocated during one forward
(torch.profiler), weights excluded. For ``fast`` the run also checks accuracy against fp32 on fixed inputs
(see ``quality_check``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import deit_registry as dr
from deit_registry.fast import optimize_for_inference, pick_dtype
from deit_registry.variants import VARIANTS

MODES = ("exact", "fast", "fast-fp32")


def cpu_info() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_name() -> str:
    return cpu_info().get("model name") or platform.processor() or platform.machine()


# /proc/cpuinfo flag -> name; the ones that decide which kernels oneDNN can use.
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
    flags = set(cpu_info().get("flags", "").split())
    return ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for flag, name in CPU_FEATURES.items())


def mode_dtype(mode: str) -> torch.dtype:
    """The compute dtype a mode runs in here (the fast mode asks the package, as it does itself)."""
    return pick_dtype(torch.device("cpu")) if mode == "fast" else torch.float32


MATMUL_N = 4096


def matmul_fn(dtype: torch.dtype, n: int = MATMUL_N) -> Callable[[], object]:
    """One n x n x n matmul in ``dtype`` (2 n^3 FLOP): the machine's matrix rate."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return lambda: a @ b


def matmul_rate(dtype: torch.dtype, repeats: int) -> float:
    """Median GFLOP/s of a 4096^3 matmul in ``dtype`` on this CPU."""
    samples = timed_alternately({"mm": matmul_fn(dtype)}, repeats)["mm"]
    return 2 * MATMUL_N**3 / statistics.median(samples) / 1e9


def peak_forward_memory(fn: Callable[[], object]) -> float:
    """MiB of tensor memory live at the peak of one call, above what was live before it (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def timed_alternately(
    fns: dict[str, Callable[[], object]], repeats: int, target_s: float = 0.3
) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled in turn ``repeats`` times (each sample >= ``target_s``)."""
    inner = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        inner[name] = max(1, round(target_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


class PrototypeProbe(nn.Module):
    """A model plus a nearest-prototype classifier on its pre-logit features: returns (features, logits).

    Equivalent to the model with its classifier head(s) replaced by this linear layer (for distilled models
    both heads get it, and the mean of the two equals the layer applied to the pre-logit mean). The model's
    classifier is removed, so its own ``forward`` (the path the fast mode optimises) gives the features.
    """

    def __init__(self, model: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        model.reset_classifier(0)
        self.model, self.classifier = model, classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model(x)
        return features, self.classifier(features)


def fixed_inputs(n: int, size: int) -> torch.Tensor:
    """``n`` smooth synthetic images (bicubic-upsampled 14x14 noise), the same on every run."""
    g = torch.Generator().manual_seed(1234)
    return nn.functional.interpolate(torch.randn(n, 3, 14, 14, generator=g), size=size, mode="bicubic")


def quality_check(model: nn.Module, n: int = 32) -> dict[str, float]:
    """Fast mode against fp32 on ``n`` fixed inputs whose logits are well separated.

    The classifier is fitted in closed form so that every input is its own class: row i is input i's fp32
    pre-logit feature minus the mean feature, normalised (a nearest-prototype classifier). A random-init
    network's 1000-way logits are near-ties, so top-1 agreement on them would measure noise, not the mode.
    """
    size = model.patch_embed.img_size[0]
    x = fixed_inputs(n, size)
    with torch.inference_mode():
        ref_features = model.forward_head(model.forward_features(x), pre_logits=True)
    centred = ref_features - ref_features.mean(0, keepdim=True)
    classifier = nn.Linear(centred.shape[1], n)
    with torch.no_grad():
        classifier.weight.copy_(nn.functional.normalize(centred, dim=1))
        classifier.bias.copy_(-classifier.weight @ ref_features.mean(0))
    probe = PrototypeProbe(copy.deepcopy(model), classifier).eval()
    with torch.inference_mode():
        _, ref_logits = probe(x)
    fast = optimize_for_inference(probe)
    features, logits = fast(x)
    top2 = ref_logits.topk(2, dim=1).values
    return {
        "dtype": str(fast.dtype).replace("torch.", ""),
        "cosine_min": nn.functional.cosine_similarity(features.float(), ref_features, dim=1).min().item(),
        "top1_agree": (logits.argmax(1) == ref_logits.argmax(1)).float().mean().item(),
        "n": n,
        "fp32_margin_min": ((top2[:, 0] - top2[:, 1]) / top2[:, 0].abs()).min().item(),
        "fp32_self_class": (ref_logits.argmax(1) == torch.arange(n)).float().mean().item(),
    }


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


def run_mode(
    mode: str, ours: nn.Module, theirs: nn.Module, batch: int, repeats: int
) -> tuple[dict[str, float], torch.dtype]:
    size = ours.patch_embed.img_size
    x = torch.randn(batch, 3, *size)
    start = time.perf_counter()
    if mode == "exact":
        ours_fn_model, dtype = ours, torch.float32
    else:
        ours_fn_model = optimize_for_inference(ours, dtype=torch.float32 if mode == "fast-fp32" else None)
        dtype = ours_fn_model.dtype
    theirs_cast = theirs if dtype == torch.float32 else copy.deepcopy(theirs).to(dtype)
    x_theirs = x.to(dtype)

    def run_ours() -> object:
        with torch.inference_mode():
            return ours_fn_model(x)

    def run_theirs() -> object:
        with torch.inference_mode():
            return theirs_cast(x_theirs)

    out = run_ours()  # the first call compiles in the fast modes: time to a ready model
    ready_s = time.perf_counter() - start
    with torch.inference_mode():
        drift = (out.float() - ours(x)).abs().max().item()  # against our eager fp32 model (0 in exact mode)
    run_theirs()
    # The matmul runs in the same rotation, so the rate it sets is the one the models saw (shared machine).
    samples = timed_alternately({"ours": run_ours, "timm": run_theirs, "mm": matmul_fn(dtype)}, repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratios = [t / o for o, t in zip(samples["ours"], samples["timm"])]
    return {
        "ours_s": med["ours"],
        "timm_s": med["timm"],
        "speedup": statistics.median(ratios),
        "ours_mb": peak_forward_memory(run_ours),
        "timm_mb": peak_forward_memory(run_theirs),
        "ready_s": ready_s,
        "mm_gflops": 2 * MATMUL_N**3 / med["mm"] / 1e9,
        "drift": drift,
    }, dtype


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_small_distilled_patch16_224"],
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["exact", "fast"])
    parser.add_argument(
        "--repeats", type=int, default=5, help="samples per measurement (medians are reported)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-quality", action="store_true", help="skip the fast mode's accuracy check")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"# {datetime.date.today()}  torch {torch.__version__}  {cpu_name()}  threads={torch.get_num_threads()}"
    )
    print(f"# CPU features: {cpu_features()}")
    if "fast" in args.modes and mode_dtype("fast") == torch.float32:
        print("# no native bf16 here: the fast mode runs (and is compared with timm) in float32; bf16 not timed")
    # Only the dtypes the chosen modes run in: an emulated bf16 matmul alone can take minutes.
    dtypes = sorted({mode_dtype(m) for m in args.modes}, key=str)
    rates = {dt: matmul_rate(dt, args.repeats) for dt in dtypes}
    print(
        "# matmul 4096^3: "
        + ", ".join(f"{str(dt).replace('torch.', '')} {rate:.0f} GFLOP/s" for dt, rate in rates.items())
        + f" (median of {args.repeats})"
    )
    header = (
        f"{'variant':34} {'mode':9} {'bs':>3} | {'ours im/s':>9} {'timm im/s':>9} {'speedup':>7} | "
        f"{'ours ms':>8} {'timm ms':>8} | {'ours MiB':>8} {'timm MiB':>8} | {'ours %mm':>8} {'timm %mm':>8} | "
        f"{'mm GF/s':>7} {'ready s':>7} {'diff fp32':>9}"
    )
    print(header)
    quality_lines, notes = [], []
    for name in args.variants:
        ours, theirs, diff = build_pair(name)
        gflop = 2 * VARIANTS[name].gmacs
        fraction = 1.0
        if any(mode != "exact" for mode in args.modes):
            fraction = executed_fraction(ours)
            notes.append(
                f"# {name}: the fast modes execute {100 * fraction:.1f}% of its {gflop:.2f} GFLOP per image; "
                f"their 'ours %mm' counts executed FLOPs (on the model's FLOPs it would be {1 / fraction:.3f}x)"
            )
        for mode in args.modes:
            for batch in args.batch_sizes:
                r, dtype = run_mode(mode, ours, theirs, batch, args.repeats)
                rate = r["mm_gflops"]
                executed = {"ours": gflop * (1.0 if mode == "exact" else fraction), "timm": gflop}
                pct = {k: 100 * executed[k] * batch / r[f"{k}_s"] / rate for k in ("ours", "timm")}
                print(
                    f"{name:34} {mode:9} {batch:>3} | {batch / r['ours_s']:9.1f} {batch / r['timm_s']:9.1f} "
                    f"{r['speedup']:6.2f}x | {1e3 * r['ours_s']:8.1f} {1e3 * r['timm_s']:8.1f} | "
                    f"{r['ours_mb']:8.1f} {r['timm_mb']:8.1f} | {pct['ours']:7.0f}% {pct['timm']:7.0f}% | "
                    f"{rate:7.0f} {r['ready_s']:7.1f} {r['drift']:9.1e}",
                    flush=True,
                )
        if "fast" in args.modes and not args.no_quality:
            q = quality_check(ours)
            quality_lines.append(
                f"{name:34} fast ({q['dtype']}) vs fp32 on {q['n']} fixed inputs: pre-logit cosine min "
                f"{q['cosine_min']:.5f}, top-1 agreement {100 * q['top1_agree']:.0f}% (fp32 top-1 = own class "
                f"{100 * q['fp32_self_class']:.0f}%, min relative margin {q['fp32_margin_min']:.2f}); "
                f"fp32 parity with timm: max abs diff {diff:.1e}"
            )
    for line in quality_lines + notes:
        print(line)
    print(
        "# speedup = timm time / ours (median of per-repeat ratios); %mm = achieved GFLOP/s / the rate of a "
        "4096^3 matmul in the mode's dtype timed in the same rotation (mm GF/s); ready = seconds to the first "
        "output (compile included); diff fp32 = max abs difference of our logits from our eager fp32 model's"
    )


if __name__ == "__main__":
    main()
