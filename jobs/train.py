"""Ray job entrypoint: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py ...`.

Takes the same arguments as `imagenet-ray train`.
"""

import sys

import _bootstrap  # noqa: F401  (puts the working dir on sys.path)
from imagenet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
