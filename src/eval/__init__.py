"""Evaluation of image–text encoders: zero-shot classification, linear probe, retrieval, feature analysis.

Knows nothing of training. Typical use:

    import eval
    encoder = eval.load_encoder("logs/run/checkpoints/epoch_3.pt")      # or an open_clip name / loaded dict
    metrics = eval.run_benchmarks(encoder, "data/eval")               # {"zeroshot/shapes/acc1": ..., ...}

Metric names follow CLIP_benchmark: acc1, acc5, mean_per_class_recall, lp_acc1…,
image_retrieval_recall@k, text_retrieval_recall@k, mean_recall.
"""
from eval.benchmarks import BENCHMARKS, check_eval_data, evaluate_dataset, run_benchmarks
from eval.data import discover_datasets
from eval.features import extract_image_features, extract_text_features
from eval.linear_probe import fit_logistic_regression, linear_probe, select_weight_decay
from eval.metrics import classification_metrics, feature_statistics, retrieval_metrics
from eval.models import Encoder, encoder_from_model, load_encoder, read_params_file
from eval.zeroshot import zero_shot_classifier, zero_shot_metrics

__all__ = [
    "BENCHMARKS",
    "Encoder",
    "check_eval_data",
    "classification_metrics",
    "discover_datasets",
    "encoder_from_model",
    "evaluate_dataset",
    "extract_image_features",
    "extract_text_features",
    "feature_statistics",
    "fit_logistic_regression",
    "linear_probe",
    "load_encoder",
    "read_params_file",
    "retrieval_metrics",
    "run_benchmarks",
    "select_weight_decay",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
