"""Load a model for the pipeline: built-in zoo, torchvision names, `package.module:factory`, plus a weights file."""

from dfp_deploy.models.loader import LoadedModel, available_models, load_model
from dfp_deploy.models.random_init import non_degenerate_

__all__ = ["LoadedModel", "available_models", "load_model", "non_degenerate_"]
