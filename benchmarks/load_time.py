"""Create + load time and peak memory of a pretrained DeiT from a cached file: deit_registry beside timm.

::

    python benchmarks/load_time.py                         # deit_base_patch16_224, .pth and .safetensors, 3 runs
    python benchmarks/load_time.py --model deit_tiny_patch16_224 --runs 5

Writes a random-init checkpoint of ``--model`` in the official layout (``{"model": state_dict}``, .pth) and as
.safetensors to a temporary folder, then times, each in a fresh subprocess:

* ours: ``deit_registry.create_model(name, pretrained=True, weights=FILE)``;
* timm: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=FILE))`` (timm's own model:
  the subprocess never imports deit_registry).

Time is the wall time of that one call (library already imported; the import is shown apart); memory is the
peak resident set size (Linux ``VmHWM``, file-backed pages included) above the one measured right after
``import torch``, shown as a multiple of the file size. The next columns are the time to the first output (the
load plus one image through the model, as a user's first call) and the peak after it. The two loaders must give
the same weights (checksum) and the same first logits. Medians over ``--runs``. Targets (issue 12): peak at
most 1.2x the file size, time to the first output of deit_base at most 0.5x timm's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch

def peak_kb():
    # VmHWM (peak RSS, file-backed pages included; reset below) where Linux has it, else ru_maxrss
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS: the baseline is "after import torch"
except OSError:
    pass
base_kb = peak_kb()
which, name, path = sys.argv[1:4]
t0 = time.perf_counter()
if which == "ours":
    import deit_registry as lib
    t1 = time.perf_counter()
    model = lib.create_model(name, pretrained=True, weights=path)
else:
    import timm as lib
    t1 = time.perf_counter()
    model = lib.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
t2 = time.perf_counter()
load_kb = peak_kb()
# The first output: one image through the model, as a user's first call.
size = int(name.rsplit("_", 1)[1])
x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    logits = model.eval()(x)
t3 = time.perf_counter()
touched_kb = peak_kb()
with torch.no_grad():
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, touch_s=t3 - t1, peak_mib=(load_kb - base_kb) / 1024,
                      touched_mib=(touched_kb - base_kb) / 1024,
                      cls=type(model).__module__ + "." + type(model).__name__, checksum=checksum,
                      logits=logits[0, :8].tolist())))
"""


def measure(which: str, name: str, path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, which, name, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_checkpoints(name: str, folder: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    import deit_registry as dr

    with torch.device("meta"):
        skeleton = dr.create_model(name)
    torch.manual_seed(0)
    sd = {k: torch.randn(v.shape) * 0.02 for k, v in skeleton.state_dict().items()}
    paths = {"pth": folder / f"{name}-random.pth", "safetensors": folder / f"{name}-random.safetensors"}
    torch.save({"model": sd}, paths["pth"])
    save_file(sd, str(paths["safetensors"]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--formats", nargs="+", default=["pth", "safetensors"], choices=["pth", "safetensors"]
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_checkpoints(args.model, Path(tmp))
        print(
            f"{args.model}, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs visible, python {platform.python_version()}"
        )
        print(
            f"{'file':<17} {'loader':<6} {'import s':>8} {'create+load s':>13} {'peak MiB':>8} {'x file':>6}"
            f" {'1st out s':>9} {'peak MiB':>8} {'x file':>6}  class"
        )
        for fmt in args.formats:
            size_mib = paths[fmt].stat().st_size / 2**20
            rows = {}
            for which in ("ours", "timm"):
                runs = [measure(which, args.model, paths[fmt]) for _ in range(args.runs)]
                keys = ("import_s", "load_s", "touch_s", "peak_mib", "touched_mib")
                rows[which] = {k: statistics.median(r[k] for r in runs) for k in keys}
                rows[which]["cls"] = runs[0]["cls"]
                rows[which]["checksum"] = runs[0]["checksum"]
                rows[which]["logits"] = runs[0]["logits"]
            if (
                abs(rows["ours"]["checksum"] - rows["timm"]["checksum"])
                > 1e-6 * abs(rows["timm"]["checksum"]) + 1e-6
            ):
                raise SystemExit(
                    f"checksums differ: {rows['ours']['checksum']} vs {rows['timm']['checksum']}"
                )
            if max(abs(a - b) for a, b in zip(rows["ours"]["logits"], rows["timm"]["logits"])) > 1e-4:
                raise SystemExit(
                    f"first outputs differ: {rows['ours']['logits']} vs {rows['timm']['logits']}"
                )
            for which, r in rows.items():
                print(
                    f"{fmt + f' {size_mib:.0f} MiB':<17} {which:<6} {r['import_s']:>8.2f} {r['load_s']:>13.3f} "
                    f"{r['peak_mib']:>8.0f} {r['peak_mib'] / size_mib:>6.2f} {r['touch_s']:>9.3f} "
                    f"{r['touched_mib']:>8.0f} {r['touched_mib'] / size_mib:>6.2f}  {r['cls']}"
                )
            ratio = rows["ours"]["load_s"] / rows["timm"]["load_s"]
            touched = rows["ours"]["touch_s"] / rows["timm"]["touch_s"]
            print(f"{'':<17} ours/timm time: create+load {ratio:.2f}, to the first output {touched:.2f}")


if __name__ == "__main__":
    main()
