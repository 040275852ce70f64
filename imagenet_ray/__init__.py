"""imagenet-ray: ImageNet-1k training as a distributed Ray job, tracked in MLflow."""

__version__ = "0.1.0"
