"""Models: the classifiers (teachers and students, by registry name) and the synthesis generator."""

from ferd.models.classifiers import (
    MODELS,
    Classifier,
    ModelFactory,
    Normalize,
    create_model,
    default_normalize,
    folded_batchnorm,
    register_model,
)
from ferd.models.generator import Generator

__all__ = ["MODELS", "Classifier", "Generator", "ModelFactory", "Normalize", "create_model", "default_normalize",
           "folded_batchnorm", "register_model"]
