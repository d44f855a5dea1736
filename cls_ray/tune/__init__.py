"""Architecture and hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over multi-worker Ray Train runs.

``search_spaces/*.yaml`` -> :mod:`cls_ray.tune.space` (load, validate, define-by-run) -> :mod:`cls_ray.tune.tuner`
(Tuner assembly, resume, promotion) -> :mod:`cls_ray.tune.leaderboard` (CSV/Parquet + rich table).
"""
