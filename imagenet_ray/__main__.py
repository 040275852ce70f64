import sys

from imagenet_ray.cli import main

sys.exit(main())
