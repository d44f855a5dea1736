"""How Ray Train hands cls-ray's datasets to its workers (the ``dataset_config`` of every ``TorchTrainer``).

Its own module, importing only ``ray.train``: Ray Train's controller and dataset manager actors unpickle it, which
imports the module it lives in, and the driver-side trainer module imports timm and torch (seconds of CPU for
every such process).
"""

from __future__ import annotations

import copy

import ray.train


class EvalSplitsExact(ray.train.DataConfig):
    """Train is split into equal shards (every DDP rank takes the same number of steps); evaluation splits are
    split without dropping rows, so validation metrics cover every image exactly once.

    Every split runs with Ray Train's public :meth:`~ray.train.DataConfig.default_ingest_options` (resource limits,
    exclusions and ordering carried over from the current ``DataContext``), as a plain ``ray.train.DataConfig()``
    gives them; it takes no execution options of its own."""

    def __init__(self) -> None:
        super().__init__()

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train V2 configures one dataset at a time, the first time the workers ask for its shard.
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name == "train":
                parts = super().configure({name: ds}, world_size, worker_handles, worker_node_ids, **kwargs)
                for i, part in enumerate(parts):
                    output[i].update(part)
                continue
            ds = ds.copy(ds)
            # A deep copy, as Ray Train's own splits get: nothing then aliases the current DataContext's limits.
            ds.context.execution_options = copy.deepcopy(self.default_ingest_options())
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[i][name] = split
        return output
