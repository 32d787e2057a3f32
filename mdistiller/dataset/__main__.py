"""`python -m mdistiller.dataset tiny-imagenet-val ROOT`: sort Tiny-ImageNet's flat val split into class folders."""
import argparse
import sys

from . import DatasetError
from .tiny_imagenet import rearrange_val


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mdistiller.dataset", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny-imagenet-val", help="move val/images/* into val/<wnid>/ (once)")
    tiny.add_argument("root", help="the DATASET.ROOT that holds tiny-imagenet-200/")
    args = parser.parse_args()
    try:
        moved = rearrange_val(args.root)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"moved {moved} images into class folders under {args.root}/tiny-imagenet-200/val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
