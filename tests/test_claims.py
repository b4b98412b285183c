"""scripts/reproduce_claims.py's table, built from a small synthetic result set whose means, standard deviations
and verdicts are worked out by hand (the trainings and scorings that feed it are the entry points the other
tests run)."""
from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("reproduce_claims", REPO / "scripts" / "reproduce_claims.py")
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)

I2T, T2I = "retrieval/coco2017/text_retrieval_recall@1", "retrieval/coco2017/image_retrieval_recall@1"
ZS1, ZS20, LP1 = "zeroshot/shapes/acc1", "zeroshot/shapes/acc20", "linear_probe/shapes/lp_acc1"
TEACHER_I2T, TEACHER_T2I = 0.7, 0.65  # the dense teacher's own R@1 on the retrieval set


def result_set(cfg, per_seed, teacher_acc1, lowrank_acc1):
    """{(run, benchmark, epoch): metrics} as the harness collects them. `per_seed` maps (run prefix, benchmark,
    epoch, metric) to one value per seed; each benchmark also reports a metric the table does not use."""
    scores = {}
    for (prefix, benchmark, epoch, key), values in per_seed.items():
        for seed, value in zip(cfg["seeds"], values):
            scores.setdefault((f"{prefix}_s{seed}", benchmark, epoch), {})[key] = value
    scores[("teacher", "zeroshot", cfg["teacher_epochs"])] = {ZS1: teacher_acc1, ZS20: 1.0}
    scores[("teacher", "retrieval", cfg["teacher_epochs"])] = {I2T: TEACHER_I2T, T2I: TEACHER_T2I}
    for n, value in enumerate(lowrank_acc1, start=1):
        scores[(f"lowrank_{n}", "zeroshot", 0)] = {ZS1: value, ZS20: 1.0}
    for metrics in scores.values():
        metrics["features/coco2017/modality_gap"] = 0.5
    return scores


def parse(row):
    """(label, arm A, its mean ± std, arm B, its mean ± std, n, holds) of one claim row (its teacher column:
    `teacher_column`)."""
    fields = [f.strip() for f in row.split("|")]
    assert len(fields) == 6, row
    label, a, b, _teacher, n, holds = fields
    a_name, a_stat = re.fullmatch(r"(.*\S) +(\d\.\d{4} ± \d\.\d{4})", a).groups()
    b_name, b_stat = re.fullmatch(r"(.*\S) +(\d\.\d{4} ± \d\.\d{4})", b).groups()
    return label, a_name, a_stat, b_name, b_stat, n, holds


def teacher_column(row):
    return row.split("|")[3].strip()


def table_rows(lines):
    header = next(i for i, line in enumerate(lines) if line.startswith("claim "))
    return lines[header - 1], lines[header + 1:-1], lines[-1]


def test_three_seeds_give_each_arms_mean_and_std_and_the_verdict_of_the_means():
    cfg = claims.MODES["small"]
    assert len(cfg["seeds"]) == 3
    e = cfg["arm_epochs"]
    per_seed = {
        ("prune_kd", "retrieval", 1, I2T): [0.5, 0.6, 0.7], ("prune_nokd", "retrieval", 1, I2T): [0.2, 0.3, 0.4],
        ("prune_kd", "retrieval", 1, T2I): [0.1, 0.2, 0.6], ("prune_nokd", "retrieval", 1, T2I): [0.4, 0.4, 0.4],
        ("prune_kd", "retrieval", 2, I2T): [0.3, 0.3, 0.3], ("prune_nokd", "retrieval", 2, I2T): [0.3, 0.3, 0.3],
        ("prune_kd", "retrieval", 2, T2I): [0.9, 0.8, 0.7], ("prune_nokd", "retrieval", 2, T2I): [0.6, 0.7, 0.8],
        ("protorkd", "linear_probe", e, LP1): [0.5, 0.5, 0.8],
        ("protorkd_noteacher", "linear_probe", e, LP1): [0.7, 0.7, 0.7],
        ("clipkd", "zeroshot", e, ZS1): [0.25, 0.5, 0.75], ("clipkd", "zeroshot", e, ZS20): [0.9, 1.0, 0.8],
        ("cosine", "zeroshot", e, ZS1): [0.1, 0.2, 0.3], ("cosine", "zeroshot", e, ZS20): [1.0, 1.0, 1.0],
    }
    lines = claims.claims_table(result_set(cfg, per_seed, 0.85, [0.5, 0.5]), cfg, "small", [1, 2], 7.2)
    title, rows, lowrank = table_rows(lines)
    assert title == f"claims (small: 3 seeds; teacher {cfg['model']}, {cfg['train_size']} samples; 7 s)"
    # sample standard deviations: [0.1, 0.2, 0.6] -> sqrt(0.07), [0.5, 0.5, 0.8] -> sqrt(0.03)
    assert [parse(row) for row in rows] == [
        ("001 p=0.75 after search R@1 I→T", "KD", "0.6000 ± 0.1000", "no KD", "0.3000 ± 0.1000", "3/3", "yes"),
        ("001 p=0.75 after search R@1 T→I", "KD", "0.3000 ± 0.2646", "no KD", "0.4000 ± 0.0000", "3/3", "no"),
        # equal means: the claim (KD beats no KD) does not hold
        ("001 p=0.75 after fine-tune R@1 I→T", "KD", "0.3000 ± 0.0000", "no KD", "0.3000 ± 0.0000", "3/3", "no"),
        ("001 p=0.75 after fine-tune R@1 T→I", "KD", "0.8000 ± 0.1000", "no KD", "0.7000 ± 0.1000", "3/3", "yes"),
        ("004 ProtoRKD linear probe acc1", "ProtoRKD", "0.6000 ± 0.1732", "no teacher", "0.7000 ± 0.0000", "3/3",
         "no"),
        ("CLIP-KD zero-shot acc1", "FD+ICL+CRD", "0.5000 ± 0.2500", "cosine", "0.2000 ± 0.1000", "3/3", "yes"),
        # the student's three top-20 accuracies against the teacher's one top-1
        ("002 student top-20 vs teacher top-1", "student acc20", "0.9000 ± 0.1000", "teacher acc1",
         "0.8500 ± 0.0000", "3/1", "yes"),
    ]
    # beside the arms, the teacher's own value of the row's metric: its R@1 in each direction (the same before
    # and after the fine-tune: the dense model both arms start from), its zero-shot acc1 and acc20; ProtoRKD's
    # teacher is a text tower, which has no linear probe of its own
    assert [teacher_column(row) for row in rows] == ["0.7000", "0.6500", "0.7000", "0.6500", "-", "0.8500", "1.0000"]
    # the teacher (no layer factorised), then one and two factorised image layers
    assert lowrank.startswith("003 zero-shot acc1 by low-rank image layers")
    assert lowrank.endswith("| 0: 0.8500, 1: 0.5000, 2: 0.5000 | monotone falling: yes")


@pytest.mark.parametrize("lowrank_acc1, falls", [([0.5, 0.4], "yes"), ([0.4, 0.5], "no"), ([0.85, 0.85], "no")])
def test_one_quick_seed_has_no_spread_and_low_rank_must_fall_below_the_teacher(lowrank_acc1, falls):
    cfg = claims.MODES["quick"]
    e = cfg["arm_epochs"]
    per_seed = {(arm, "retrieval", epoch, key): [0.25] for arm in ("prune_kd", "prune_nokd") for epoch in (1, 2)
                for key in (I2T, T2I)}
    per_seed.update({("protorkd", "linear_probe", e, LP1): [0.75],
                     ("protorkd_noteacher", "linear_probe", e, LP1): [0.5],
                     ("clipkd", "zeroshot", e, ZS1): [0.5], ("clipkd", "zeroshot", e, ZS20): [0.75],
                     ("cosine", "zeroshot", e, ZS1): [0.5], ("cosine", "zeroshot", e, ZS20): [1.0]})
    lines = claims.claims_table(result_set(cfg, per_seed, 0.85, lowrank_acc1), cfg, "quick", [1, 2], 61.0)
    title, rows, lowrank = table_rows(lines)
    assert "quick: 1 seed" in title
    parsed = [parse(row) for row in rows]
    assert [(p[2], p[4], p[5], p[6]) for p in parsed] == [("0.2500 ± 0.0000", "0.2500 ± 0.0000", "1/1", "no")] * 4 + [
        ("0.7500 ± 0.0000", "0.5000 ± 0.0000", "1/1", "yes"),
        ("0.5000 ± 0.0000", "0.5000 ± 0.0000", "1/1", "no"),
        ("0.7500 ± 0.0000", "0.8500 ± 0.0000", "1/1", "no")]
    values = ", ".join(f"{n}: {v:.4f}" for n, v in enumerate([0.85, *lowrank_acc1]))
    assert lowrank.endswith(f"| {values} | monotone falling: {falls}")


def test_a_metric_is_the_one_key_with_its_suffix():
    scores = {ZS1: 0.5, ZS20: 0.75, LP1: 0.25}
    assert claims.metric(scores, claims.ZS1) == 0.5
    assert claims.metric(scores, claims.ZSK) == 0.75
    with pytest.raises(KeyError, match="acc1: 2 matches"):
        claims.metric(scores, "acc1")
