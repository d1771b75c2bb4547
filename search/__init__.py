"""The search service: model families and their spaces, the one trial runner, storage, workers, results, CLI.

Knows Optuna; `data/` and `models/` do not.
"""
