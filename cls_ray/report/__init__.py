"""``cls-ray report``: one self-contained HTML page (and its JSON) that explains and stress-tests a model package.

:mod:`~cls_ray.report.build` computes the report, :mod:`~cls_ray.report.html` renders it, :mod:`~cls_ray.report.card`
writes the package's model card; the per-image work runs on Ray Data (:mod:`~cls_ray.report.passes`).
"""
