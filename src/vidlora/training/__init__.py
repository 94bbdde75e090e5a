"""Training: the recipe (recipe.py), the Trainer subclass, callbacks, the distributed start."""
