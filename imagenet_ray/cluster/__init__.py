"""A multi-host Ray cluster of a RayCluster manifest's shape on one machine (`imagenet-ray cluster`)."""
