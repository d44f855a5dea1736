"""Architecture and hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over multi-worker Ray Train runs.

``search_spaces/*.yaml`` -> :mod:`cls_ray.tune.space` (load; :mod:`~cls_ray.tune.space_format` parses and validates
into :mod:`~cls_ray.tune.space_model`, the define-by-run space) -> :mod:`cls_ray.tune.tuner` (Tuner assembly, resume,
promotion) -> :mod:`cls_ray.tune.leaderboard` (CSV/Parquet + rich table).
"""
