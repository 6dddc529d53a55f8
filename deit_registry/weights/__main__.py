"""``python -m deit_registry.weights convert SRC DST [--name NAME] [--ema]``: any supported checkpoint ->
``DST/model.safetensors`` + ``DST/config.json`` (timm's layout); ``download NAME`` pre-fetches official weights."""

from __future__ import annotations

import argparse
import sys

from ..errors import DeiTRegistryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deit_registry.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint to model.safetensors + config.json")
    conv.add_argument("src", help="file, folder, URL or hf-hub:owner/repo[@revision]")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--name", help="variant name (default: read from the weights' shapes)")
    conv.add_argument("--ema", action="store_true", help="use a training checkpoint's model_ema weights")
    down = sub.add_parser("download", help="fetch a variant's official weights into torch.hub's cache")
    down.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            from .saving import convert

            print(convert(args.src, args.dst, args.name, ema=args.ema))
        else:
            from .loading import download

            print(download(args.name))
    except (DeiTRegistryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
