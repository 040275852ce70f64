"""After training: the classifier as an MLflow logged model (a pyfunc with the eval preset), registered
versions with the `champion` alias, and model references → the model, its checkpoint and its files."""

from __future__ import annotations

from imagenet_ray.lifecycle.package import (
    classifier_meta,
    classifier_signature,
    log_classifier,
    meta_path,
    read_meta,
    weights_path,
)
from imagenet_ray.lifecycle.registry import (
    CHAMPION_ALIAS,
    ModelReference,
    PromotionDecision,
    checkpoint_url_for,
    download_model,
    promote_if_better,
    register,
    resolve_model_reference,
)

__all__ = [
    "CHAMPION_ALIAS",
    "ModelReference",
    "PromotionDecision",
    "checkpoint_url_for",
    "classifier_meta",
    "classifier_signature",
    "download_model",
    "log_classifier",
    "meta_path",
    "promote_if_better",
    "read_meta",
    "register",
    "resolve_model_reference",
    "weights_path",
]
