"""Recipes by name: what `quantize(..., recipe="quamba")` and the command line look up.

The registry only serves names: a checkpoint stores the whole recipe (`Recipe.to_dict()`) and
never consults it, so a recipe need not be registered to be saved and reloaded.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError, RecipeError
from .spec import Recipe

__all__ = ["as_recipe", "make_recipe", "recipe_names", "register_recipe"]

_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, replace: bool = False) -> Recipe:
    """Make `recipe` available by its name and return it (so a recipe file can write
    `MINE = register_recipe(Recipe(...))`).

    Registering a different recipe under a taken name raises `RecipeError` unless `replace`;
    registering an equal recipe again is a no-op (a module reloaded).
    """
    if not isinstance(recipe, Recipe):
        raise InvalidArgumentError(f"register_recipe needs a quamba_fx.recipes.Recipe, got {type(recipe).__name__}")
    taken = _RECIPES.get(recipe.name)
    if taken is not None and taken != recipe and not replace:
        raise RecipeError("name", f"a different recipe named {recipe.name!r} is already registered; "
                                  "choose another name or pass replace=True")
    _RECIPES[recipe.name] = recipe
    return recipe


def recipe_names() -> tuple[str, ...]:
    """The names of the registered recipes, in registration order."""
    return tuple(_RECIPES)


def make_recipe(name: str, percentile: float | None = None) -> Recipe:
    """The recipe registered as `name`; with `percentile`, every percentile-observed tap of it
    uses that percentile instead (recipes without one, like `naive`, are returned as they are).

    Built in: `naive` (abs-max scales everywhere, no rotation) and `quamba` (the conv1d+SiLU output,
    x_proj's input, takes a 99.999th-percentile scale, clipping its rare outliers, and out_proj's
    input is Hadamard-rotated; the rest is abs-max). Raises `InvalidArgumentError` for an unknown
    name and `RecipeError` for a percentile outside [0, 100].
    """
    recipe = _RECIPES.get(name) if isinstance(name, str) else None
    if recipe is None:
        known = ", ".join(repr(n) for n in _RECIPES)
        raise InvalidArgumentError(f"unknown recipe {name!r}; choose one of {known}, or pass a Recipe object")
    if percentile is None:
        return recipe
    return recipe.with_observer_args("percentile", percentile=percentile)


def as_recipe(recipe: str | Recipe) -> Recipe:
    """`recipe` itself if it is a `Recipe`, else the registered recipe of that name."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return make_recipe(recipe)
    raise InvalidArgumentError(f"recipe must be a recipe name or a quamba_fx.recipes.Recipe, got {type(recipe).__name__}")
