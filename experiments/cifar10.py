"""Train and evaluate a jaxcnn model on CIFAR-10 (or another small data set).

    python experiments/cifar10.py --model resdensenet_cifar                 # TFDS cifar10
    python experiments/cifar10.py --model simple_cnn --data-dir DIR         # image folder / batches
    python experiments/cifar10.py --eval-only --checkpoint runs/simple_cnn-cifar10

Every flag is a jaxcnn.train.TrainConfig field; --help lists them with the recipes.
"""
import sys

from jaxcnn import reexec_with_huge_pages
from jaxcnn.train.cli import main

if __name__ == "__main__":
    reexec_with_huge_pages()  # ~15% faster CPU steps (jaxcnn/_malloc.py)
    sys.exit(main(prog="cifar10.py", description=__doc__, defaults=dict(dataset="cifar10")))
