"""training/distributed.py's compute_on_master: the waiting ranks outlast the collective timeout while rank 0
computes, and a failure on rank 0 reaches them as one line."""
import logging
import os
from datetime import timedelta

import pytest
import torch
from test_protorkd import fork_ranks

from foundation.errors import UserError


def _wait_main(rank: int, out: str) -> None:
    from training.distributed import compute_on_master

    torch.set_num_threads(1)
    # a 2 s collective timeout: rank 0's 6 s job must not trip it on the waiting rank
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=2))
    log_lines = []
    handler = logging.Handler()
    handler.emit = lambda record: log_lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        import time

        def slow():
            time.sleep(6)
            return {"centroids": torch.arange(4)}

        result = compute_on_master(slow, "a k-means", report_every_s=2, poll_s=0.1)

        def fails():
            raise RuntimeError("faiss ran out of memory")

        failure = None
        try:
            compute_on_master(fails, "the second k-means", poll_s=0.1)
        except (RuntimeError, UserError) as error:
            failure = f"{type(error).__name__}: {error}"
        torch.save({"result": result, "log": log_lines, "failure": failure}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_waiting_ranks_outlast_the_collective_timeout(tmp_path):
    fork_ranks(_wait_main, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0["result"]["centroids"], rank1["result"]["centroids"])
    assert any("still waiting for rank 0 (a k-means)" in line and "--dist-timeout-minutes does not apply" in line
               for line in rank1["log"])
    assert rank0["failure"] == "RuntimeError: faiss ran out of memory"
    assert rank1["failure"] == "UserError: rank 0 failed while the second k-means; its log says why"
