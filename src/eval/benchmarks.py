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

from eval.data import ClassificationSet, FoundDataset, RetrievalSet, discover_datasets
from eval.features import extract_image_features, extract_text_features
from eval.linear_probe import linear_probe
from eval.metrics import DEFAULT_TOPK, check_topk, feature_statistics, retrieval_metrics
from eval.zeroshot import zero_shot_classifier, zero_shot_metrics
from foundation.errors import UserError

log = logging.getLogger(__name__)

BENCHMARKS = ("zeroshot", "linear_probe", "retrieval", "features")
TASK_OF_BENCHMARK = {"zeroshot": "classification", "linear_probe": "classification",
                      "retrieval": "retrieval", "features": "retrieval"}


_SETS_OF_TASK = {"classification": "a classification set (<name>/test/<class>/, imagenet/, cifar10/, ...)",
                 "retrieval": "a retrieval set (coco2017/ or flickr30k/)"}


def check_eval_data(eval_data_dir: str | Path, benchmarks: Iterable[str] = BENCHMARKS,
                    datasets: Optional[Sequence[str]] = None, every_benchmark: bool = True,
                    what: str = "--eval-data-dir") -> Dict[str, FoundDataset]:
    """The datasets under `eval_data_dir` that `benchmarks` would score, found before any work is done (a run
    that scores only after an epoch of training checks its eval root with this at start).

    Raises UserError (one line naming `what`, the flag that gave the root) when the root is not a folder,
    holds no evaluation set, lacks one of `datasets`, or holds no set that a benchmark applies to: with
    `every_benchmark` each of `benchmarks` needs one (they were asked for by name), else at least one of them
    (a default list, of which whatever applies is scored)."""
    benchmarks = tuple(benchmarks)
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise UserError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    try:
        found, _ = discover_datasets(eval_data_dir)
    except FileNotFoundError:
        raise UserError(f"{what} {eval_data_dir}: folder not found") from None
    if not found:
        raise UserError(f"{what} {eval_data_dir}: no evaluation sets in it (expected coco2017/, flickr30k/, "
                        f"<name>/test/<class>/, ...)")
    if datasets is not None:
        missing = sorted(set(datasets) - set(found))
        if missing:
            raise UserError(f"{what} {eval_data_dir}: dataset(s) {missing} not in it; found: {sorted(found)}")
        found = {name: found[name] for name in datasets}
    tasks = {entry.task for entry in found.values()}
    unserved = [b for b in benchmarks if TASK_OF_BENCHMARK[b] not in tasks]
    if unserved and (every_benchmark or len(unserved) == len(benchmarks)):
        needed = sorted({TASK_OF_BENCHMARK[b] for b in unserved})
        listed = ", ".join(f"{name} ({entry.task})" for name, entry in sorted(found.items()))
        raise UserError(f"{what} {eval_data_dir}: {'/'.join(unserved)} need{'s' if len(unserved) == 1 else ''} "
                        f"{' and '.join(_SETS_OF_TASK[task] for task in needed)}; it holds {listed}")
    return found


def run_benchmarks(
    encoder,
    eval_data_dir: str | Path,
    benchmarks: Iterable[str] = BENCHMARKS,
    datasets: Optional[Sequence[str]] = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    topk: Iterable[int] = DEFAULT_TOPK,
) -> Dict[str, float]:
    """Flat metric dict for `encoder` on the datasets under `eval_data_dir`.

    benchmarks: any of "zeroshot", "linear_probe", "retrieval", "features" (modality gap and feature spread,
        on the retrieval sets' image and caption features).
    datasets: names to restrict to (default: every dataset found; absent ones are skipped with a log note).
    device: where the metric maths (linear probe, similarity matrices) runs; default the encoder's device.
        The encoder itself stays where it is (it may be the trainer's live model).
    topk: the k of the zero-shot and linear-probe accuracies acc{k} / lp_acc{k} (default 1 and 5).
    """
    benchmarks = tuple(benchmarks)
    topk = check_topk(topk)  # a bad k fails here, not after the first dataset was scored
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if getattr(encoder, "tokenizer", True) is None:  # an image-only model: no class or caption embeddings
        text_benchmarks = [b for b in benchmarks if b != "linear_probe"]
        if text_benchmarks:
            log.info("the model has no text side: %s skipped (linear probe only)", "/".join(text_benchmarks))
        benchmarks = tuple(b for b in benchmarks if b == "linear_probe")
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
    wanted_tasks = {TASK_OF_BENCHMARK[b] for b in benchmarks}
    for task in ("classification", "retrieval"):
        if task in wanted_tasks and not any(d.task == task for d in found.values()):
            log.info("no %s datasets under %s; %s skipped", task, eval_data_dir,
                     "/".join(b for b in benchmarks if TASK_OF_BENCHMARK[b] == task))
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
            metrics.update(evaluate_dataset(encoder, dataset, benchmarks, batch_size, workers, metric_device, topk))
            log.info("%s scored in %.1fs", name, time.perf_counter() - started)
    finally:
        encoder.model.train(was_training)
    return metrics


def evaluate_dataset(
    encoder,
    dataset: ClassificationSet | RetrievalSet,
    benchmarks: Sequence[str] = BENCHMARKS,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    topk: Iterable[int] = DEFAULT_TOPK,
) -> Dict[str, float]:
    """`<benchmark>/<dataset>/<metric>` for the benchmarks in `benchmarks` that apply to `dataset`
    (zeroshot and linear_probe to a ClassificationSet, retrieval and features to a RetrievalSet);
    `topk`: the k of the classification accuracies."""
    name = dataset.name

    def image_features(images, part: str):
        return extract_image_features(encoder, images, batch_size, workers, f"{name} {part}")

    if isinstance(dataset, ClassificationSet):
        by_benchmark = _classification_scores(encoder, dataset, benchmarks, image_features, torch.device(device),
                                              check_topk(topk))
    else:
        by_benchmark = _retrieval_scores(encoder, dataset, benchmarks, image_features, torch.device(device))
    return {f"{benchmark}/{name}/{metric}": value
            for benchmark, scores in by_benchmark.items() for metric, value in scores.items()}


def _classification_scores(encoder, dataset: ClassificationSet, benchmarks: Sequence[str], image_features,
                           device: torch.device, topk: Sequence[int]) -> Dict[str, Dict[str, float]]:
    test_features, test_labels = image_features(dataset.test, "test")
    scores: Dict[str, Dict[str, float]] = {}
    if "zeroshot" in benchmarks:
        classifier = zero_shot_classifier(encoder, dataset.classnames, dataset.templates)
        scores["zeroshot"] = zero_shot_metrics(test_features.to(device), test_labels, classifier, topk)
    if "linear_probe" in benchmarks:
        if dataset.train is None:
            log.info("%s: no train split; linear probe skipped", dataset.name)
        else:
            train_features, train_labels = image_features(dataset.train, "train")
            scores["linear_probe"] = linear_probe(train_features, train_labels, test_features, test_labels,
                                                  num_classes=len(dataset.classnames), device=device, topk=topk)
    return scores


def _retrieval_scores(encoder, dataset: RetrievalSet, benchmarks: Sequence[str], image_features,
                      device: torch.device) -> Dict[str, Dict[str, float]]:
    images, _ = image_features(dataset.images(encoder.preprocess), "images")
    captions = extract_text_features(encoder, dataset.captions, desc=f"{dataset.name} captions")
    images, captions = images.to(device), captions.to(device)
    scores: Dict[str, Dict[str, float]] = {}
    if "retrieval" in benchmarks:
        scores["retrieval"] = retrieval_metrics(images, captions, dataset.text_to_image)
    if "features" in benchmarks:
        scores["features"] = feature_statistics(images, captions)
    return scores
