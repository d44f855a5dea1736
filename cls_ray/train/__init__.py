"""Distributed training on Ray Train: the per-worker loop, TorchTrainer assembly, checkpoint state.

The only package of cls-ray that imports ``ray.train``. Entry points: :func:`cls_ray.train.trainer.train`
(``cls-ray train``), :func:`cls_ray.train.trainer.build_trainer` (Ray Tune trials) and
:func:`cls_ray.train.trainer.export_package`.
"""
