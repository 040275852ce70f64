"""Ray job entrypoint: `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/predict.py ...`.

Takes the same arguments as `imagenet-ray predict`.
"""

import sys

import _bootstrap  # noqa: F401  (puts the working dir on sys.path)
from imagenet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
