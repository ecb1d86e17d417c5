"""Hyperparameter search over whole training runs: `space.py` reads a search space (YAML), `search.py`
runs trials (grid, random, Optuna TPE), prunes them and keeps results.tsv. Above `recipe` (each trial
is `recipe.train`), beside the CLI."""
