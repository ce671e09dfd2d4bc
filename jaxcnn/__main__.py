"""`python -m jaxcnn summary NAME ...` and `python -m jaxcnn predict --checkpoint DIR img ...`."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: must be a positive integer")
    return v


def build_parser() -> argparse.ArgumentParser:
    from jaxcnn.models import list_models
    p = argparse.ArgumentParser(prog="jaxcnn", description="jaxcnn command line (training: "
                                "experiments/cifar10.py and experiments/imagefolder.py)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="layer table, parameter count and MACs of a model")
    s.add_argument("name", choices=list_models(), metavar="NAME",
                   help="registered model; one of: " + ", ".join(list_models()))
    s.add_argument("--num-classes", type=_positive, default=None, help="default: the model's")
    s.add_argument("--image-size", type=_positive, default=None, help="default: the model's")
    s.add_argument("--batch-size", type=_positive, default=1)
    q = sub.add_parser("predict", help="top-k classes of image files with a trained checkpoint")
    q.add_argument("--checkpoint", required=True,
                   help="work directory (best epoch), its checkpoints/ folder or an epoch folder")
    q.add_argument("--top-k", type=_positive, default=5)
    q.add_argument("images", nargs="+", help="image files")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "summary":
        from jaxcnn.models import create_model, model_info
        from jaxcnn.summary import summary
        info = model_info(args.name)
        size = args.image_size or info.image_size
        try:
            summary(create_model(args.name, num_classes=args.num_classes), (size, size, 3),
                    batch_size=args.batch_size)
        except (TypeError, ValueError) as e:  # e.g. an image too small for the model's strides
            from jaxcnn.models.registry import build_error
            print(f"jaxcnn summary: error: {build_error(args.name, size, e)}", file=sys.stderr)
            return 2
        return 0
    if args.command == "predict":
        from jaxcnn.train.predict import predict_files
        try:
            bad = predict_files(args.checkpoint, args.images, args.top_k)
        except FileNotFoundError as e:
            print(f"jaxcnn predict: error: {e}", file=sys.stderr)
            return 2
        return 1 if bad else 0
    return 2


if __name__ == "__main__":
    from jaxcnn import reexec_with_huge_pages
    reexec_with_huge_pages()  # see jaxcnn/_malloc.py
    sys.exit(main())
