"""Score one encoder on every evaluation dataset found under a root: one flat dict of metrics.

Keys are `<benchmark>/<dataset>/<metric>`, e.g. `zeroshot/shapes/acc1`, `linear_probe/shapes/lp_acc1`,
`retrieval/coco2017/image_retrieval_recall@1`, `features/coco2017/modality_gap`. The trainer calls this for
in-loop eval and the checkpoint monitor for each checkpoint; each image set is embedded once and shared by
the benchmarks that need it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch

from eval.data import ClassificationSet, RetrievalSet, discover_datasets
from eval.features import extract_image_features, extract_text_features
from eval.linear_probe import linear_probe
from eval.metrics import feature_statistics, retrieval_metrics
from eval.zeroshot import zero_shot_classifier, zero_shot_metrics

log = logging.getLogger(__name__)

BENCHMARKS = ("zeroshot", "linear_probe", "retrieval", "features")
_TASK_OF_BENCHMARK = {"zeroshot": "classification", "linear_probe": "classification",
                      "retrieval": "retrieval", "features": "retrieval"}


def run_benchmarks(
    encoder,
    eval_data_dir: str | Path,
    benchmarks: Iterable[str] = BENCHMARKS,
    datasets: Optional[Sequence[str]] = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
) -> Dict[str, float]:
    """Flat metric dict for `encoder` on the datasets under `eval_data_dir`.

    benchmarks: any of "zeroshot", "linear_probe", "retrieval", "features" (modality gap and feature spread,
        on the retrieval sets' image and caption features).
    datasets: names to restrict to (default: every dataset found; absent ones are skipped with a log note).
    device: where the metric maths (linear probe, similarity matrices) runs; default the encoder's device.
        The encoder itself stays where it is (it may be the trainer's live model).
    """
    benchmarks = tuple(benchmarks)
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    found, notes = discover_datasets(eval_data_dir)
    for note in notes:
        log.info(note)
    if not found:
        raise ValueError(
            f"no evaluation datasets under {eval_data_dir} (expected e.g. coco2017/, flickr30k/, <name>/test/<class>/)"
        )
    if datasets is not None:
        missing = sorted(set(datasets) - set(found))
        if missing:
            raise ValueError(f"dataset(s) {missing} not found under {eval_data_dir}; found: {sorted(found)}")
        found = {name: found[name] for name in datasets}
    wanted_tasks = {_TASK_OF_BENCHMARK[b] for b in benchmarks}
    for task in ("classification", "retrieval"):
        if task in wanted_tasks and not any(d.task == task for d in found.values()):
            log.info("no %s datasets under %s; %s skipped", task, eval_data_dir,
                     "/".join(b for b in benchmarks if _TASK_OF_BENCHMARK[b] == task))
    metric_device = torch.device(device) if device is not None else encoder.device

    metrics: Dict[str, float] = {}
    was_training = encoder.model.training
    encoder.model.eval()
    try:
        for name, entry in found.items():
            if entry.task not in wanted_tasks:
                continue
            started = time.perf_counter()
            try:
                dataset = entry.build(encoder.preprocess)
            except (OSError, RuntimeError, ValueError, KeyError) as error:  # files present but unreadable
                if datasets is not None:  # asked for by name: that is an error, not a note
                    raise ValueError(f"{name}: cannot read it under {eval_data_dir}: {error}") from None
                log.warning("%s: cannot read it (%s); skipped", name, error)
                continue
            if entry.task == "classification":
                scores = evaluate_classification(encoder, dataset, benchmarks, batch_size, workers, metric_device)
            else:
                scores = evaluate_retrieval(encoder, dataset, benchmarks, batch_size, workers, metric_device)
            metrics.update(scores)
            log.info("%s scored in %.1fs", name, time.perf_counter() - started)
    finally:
        encoder.model.train(was_training)
    return metrics


def evaluate_classification(
    encoder,
    dataset: ClassificationSet,
    benchmarks: Sequence[str] = ("zeroshot", "linear_probe"),
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
) -> Dict[str, float]:
    name = dataset.name
    test_features, test_labels = extract_image_features(encoder, dataset.test, batch_size, workers, f"{name} test")
    metrics: Dict[str, float] = {}
    if "zeroshot" in benchmarks:
        classifier = zero_shot_classifier(encoder, dataset.classnames, dataset.templates)
        scores = zero_shot_metrics(test_features.to(device), test_labels, classifier)
        metrics.update({f"zeroshot/{name}/{metric}": value for metric, value in scores.items()})
    if "linear_probe" in benchmarks:
        if dataset.train is None:
            log.info("%s: no train split; linear probe skipped", name)
        else:
            train_features, train_labels = extract_image_features(
                encoder, dataset.train, batch_size, workers, f"{name} train"
            )
            scores = linear_probe(train_features, train_labels, test_features, test_labels,
                                  num_classes=len(dataset.classnames), device=device)
            metrics.update({f"linear_probe/{name}/{metric}": value for metric, value in scores.items()})
    return metrics


def evaluate_retrieval(
    encoder,
    dataset: RetrievalSet,
    benchmarks: Sequence[str] = ("retrieval", "features"),
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
) -> Dict[str, float]:
    name = dataset.name
    image_features, _ = extract_image_features(
        encoder, dataset.images(encoder.preprocess), batch_size, workers, f"{name} images"
    )
    text_features = extract_text_features(encoder, dataset.captions, desc=f"{name} captions")
    image_features, text_features = image_features.to(device), text_features.to(device)
    metrics: Dict[str, float] = {}
    if "retrieval" in benchmarks:
        scores = retrieval_metrics(image_features, text_features, dataset.text_to_image)
        metrics.update({f"retrieval/{name}/{metric}": value for metric, value in scores.items()})
    if "features" in benchmarks:
        scores = feature_statistics(image_features, text_features)
        metrics.update({f"features/{name}/{metric}": value for metric, value in scores.items()})
    return metrics
