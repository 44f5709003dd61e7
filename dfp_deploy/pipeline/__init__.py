"""The only package that sequences stages: `build(recipe)`, `inspect(recipe)` and `fingerprint(target)`.

build.py holds the sequence; compress_step, engine_step and search_step the steps it calls; context what a build
needs from its surroundings. The recipe is resolved once into a BuildPlan (recipe/resolve.py) and the steps read
that, never the recipe.
"""

from dfp_deploy.pipeline.build import build, inspect
from dfp_deploy.pipeline.context import cache_dir, fingerprint, output_dir, resolve_recipe
from dfp_deploy.recipe.resolve import default_round_to
from dfp_deploy.report.assemble import REPORT_NAME

__all__ = ["REPORT_NAME", "build", "cache_dir", "default_round_to", "fingerprint", "inspect", "output_dir",
           "resolve_recipe"]
