"""Every DataLoader a training run starts comes from `run_loader`: the trainer's own (TSV/CSV and shards), and
those its jobs start for a pass of their own (ProtoRKD's episode image features and image-teacher cache,
BatchNorm re-estimation). One factory, so every loader's workers follow the run's stop-signal rule
(training.preemption.loader_worker_init): a SIGTERM that SLURM or torchrun sends to the whole job during any of
those passes leaves the workers serving, the pass finishes, and the rank saves and exits 75; a worker without
the rule dies at once and its rank fails with exit 1, so the job is not requeued."""
from __future__ import annotations

from typing import Any, Dict

from torch.utils.data import DataLoader

from training.data.samples import batch_from_worker
from training.preemption import loader_worker_init, stop_signals_blocked

_RUN_LOADER_CLASSES: Dict[type, type] = {}


def run_loader(dataset: Any, loader_class: type = DataLoader, **options: Any) -> DataLoader:
    """`loader_class(dataset, **options)` (a DataLoader, or webdataset's WebLoader) whose workers take the run's
    stop signals over (`worker_init_fn` is this factory's, never a caller's), and are forked with those signals
    blocked, so one that comes while a worker starts waits for the worker's handler instead of killing it."""
    if "worker_init_fn" in options:
        raise TypeError("run_loader sets worker_init_fn itself (training.preemption.loader_worker_init)")
    return _run_loader_class(loader_class)(dataset, worker_init_fn=loader_worker_init, **options)


def _run_loader_class(loader_class: type) -> type:
    if loader_class not in _RUN_LOADER_CLASSES:
        def __iter__(self):
            with stop_signals_blocked():  # the workers are forked here (each epoch, unless persistent)
                batches = loader_class.__iter__(self)
            return map(batch_from_worker, batches)

        _RUN_LOADER_CLASSES[loader_class] = type(f"Run{loader_class.__name__}", (loader_class,), {"__iter__": __iter__})
    return _RUN_LOADER_CLASSES[loader_class]
