"""Recipes: the YAML schema and its strict loader."""

from dfp_deploy.recipe.loader import iter_keys, load_recipe, recipe_to_dict
from dfp_deploy.recipe.schema import Recipe

__all__ = ["Recipe", "iter_keys", "load_recipe", "recipe_to_dict"]
