"""compress.ops.profile.time_interleaved, the one latency timer: interleaved rounds after warm-up, wall and
process CPU time per callable (no assertion on how fast anything is)."""
from __future__ import annotations

import time

import pytest
import torch

from compress.ops.profile import Latency, profile_model, time_interleaved

SLEEP_S = 0.05


def test_calls_are_interleaved_after_the_warmup_rounds():
    order = []
    latency = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b"),
                                "c": lambda: order.append("c")}, repeats=3, warmup=2)
    assert order == ["a", "b", "c"] * (2 + 3)
    assert set(latency) == {"a", "b", "c"}
    for timing in latency.values():
        assert isinstance(timing, Latency)
        assert len(timing.wall_ms) == len(timing.cpu_ms) == 3
        assert all(t >= 0 for t in timing.wall_ms + timing.cpu_ms)


def test_medians_are_of_the_repeats():
    timing = Latency(wall_ms=(3.0, 1.0, 2.0), cpu_ms=(5.0, 4.0, 9.0))
    assert timing.median_wall_ms == 2.0 and timing.median_cpu_ms == 5.0


def test_a_sleeping_call_takes_wall_time_but_almost_no_cpu_time():
    def spin():  # busy for as long as the sleeper sleeps: CPU time close to its wall time
        end = time.perf_counter() + SLEEP_S
        while time.perf_counter() < end:
            pass

    latency = time_interleaved({"sleep": lambda: time.sleep(SLEEP_S), "spin": spin}, repeats=3, warmup=0)
    sleep, spin_timing = latency["sleep"], latency["spin"]
    assert min(sleep.wall_ms) >= SLEEP_S * 1000  # time.sleep sleeps at least that long
    assert sleep.median_cpu_ms < 0.2 * sleep.median_wall_ms
    # the spinning call burns CPU for the whole of its wall time (less whatever the OS gave to others)
    assert spin_timing.median_cpu_ms > sleep.median_cpu_ms


def test_calls_run_without_autograd_and_their_results_are_not_kept():
    weight = torch.ones(3, requires_grad=True)
    seen = []
    time_interleaved({"forward": lambda: seen.append((weight * 2).requires_grad)}, repeats=2, warmup=1)
    assert seen == [False, False, False]


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, repeats=0)


class _TwoTowers(torch.nn.Module):
    """encode_image / encode_text that record the order they are called in."""

    def __init__(self, order):
        super().__init__()
        self.image, self.text, self.order = torch.nn.Linear(3 * 4 * 4, 2), torch.nn.Embedding(10, 2), order

    def encode_image(self, images):
        self.order.append("image")
        return self.image(images.flatten(1))

    def encode_text(self, tokens):
        self.order.append("text")
        return self.text(tokens).mean(1)


def test_profile_model_times_both_towers_in_interleaved_rounds():
    order = []
    model = _TwoTowers(order)
    result = profile_model(model, image_size=4, text_input=torch.ones(2, 5, dtype=torch.long), batch_size=2,
                           repeats=3, warmup=1)
    timed = order[-2 * (1 + 3):]  # after tower_costs's counted forwards: warm-up round, then the repeats
    assert timed == ["image", "text"] * 4
    assert result["latency_image_ms"] > 0 and result["latency_text_ms"] > 0 and result["latency_batch_size"] == 2
