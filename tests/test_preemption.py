"""Runs that survive a cluster, with real signals sent to real trainer processes (docs/cluster.md):

- a stop signal (SIGTERM, SIGINT, --stop-signal) makes every rank finish the same step, write epoch_latest.pt
  and exit 75, and the resumed run ends with the weights of an uninterrupted one;
- the SLURM batch script, run with a stand-in srun (tasks started directly with SLURM_* variables, no torchrun)
  and scontrol, requeues itself on that exit code;
- two nodes with nothing shared on disk resume from node 0's checkpoint after a SIGKILL;
- one trainer and one monitor per run folder;
- an in-loop eval longer than --dist-timeout-minutes does not fail the job.
"""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, _descendants, free_port, launched, run_trainer, subprocess_env

pytestmark = pytest.mark.slow  # every test here starts trainers or other processes

MODEL = "clipc-vit-t2-32"
EPOCHS = 6  # 8 steps an epoch at 2 x 16 of the 256 pictures: 48 steps, enough to be signalled mid-run
STEPS = EPOCHS * 256 // 32


def trainer_args(corpus, logs, name, *extra):
    """The flags every 2-rank run here shares, so each ends with the reference run's weights."""
    return ["--train-data", str(corpus / "train.tsv"), "--model", MODEL, "--logs-root", str(logs), "--name", name,
            "--batch-size", "16", "--workers", "0", "--warmup", "2", "--lr", "1e-3", "--log-every-n-steps", "1",
            "--seed", "3", "--epochs", str(EPOCHS), "--save-every-n-steps", "3", "--local-loss",
            "--gather-with-grad", *extra]


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
            *args]


def logged_steps(run_dir: Path) -> list:
    path = run_dir / "results.jsonl"
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written
                steps.append(json.loads(line)["step"])
    return steps


def last_step(run_dir: Path) -> int:
    return max(logged_steps(run_dir), default=0)


def wait_until(condition, procs, what, stderr_file=None, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                tail = stderr_file.read_text()[-3000:] if stderr_file else ""
                raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{tail}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def process_table():
    """{pid: (ppid, cmdline bytes, environ bytes)} of this user's processes (from /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                table[int(entry.name)] = (ppid, (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes())
            except (OSError, ValueError, IndexError):
                continue
    return table


def trainer_ranks(marker: Path) -> dict:
    """{global rank: pid} of the trainer processes whose command line names `marker` (a run's logs root):
    `python [options] -m training.main ...` itself, not a launcher that names it (torchrun's agent, srun), and
    not a trainer's forked loader workers (whose parent is a trainer)."""
    table = process_table()

    def is_trainer(pid):
        argv = table.get(pid, (0, b"", b""))[1].split(b"\0")
        if b"-m" not in argv or str(marker).encode() not in b" ".join(argv):
            return False
        module = argv.index(b"-m")
        return all(a.startswith(b"-") for a in argv[1:module]) and argv[module + 1:module + 2] == [b"training.main"]

    ranks = {}
    for pid, (ppid, _, environ) in table.items():
        if is_trainer(pid) and not is_trainer(ppid):
            variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
            rank = variables.get(b"RANK", variables.get(b"SLURM_PROCID", b"0"))
            ranks[int(rank)] = pid
    return ranks


def final_weights(run_dir: Path):
    return torch.load(run_dir / "checkpoints" / f"epoch_{EPOCHS}.pt", weights_only=True)


def assert_same_weights(run_dir: Path, reference: dict):
    resumed = final_weights(run_dir)
    assert resumed["step"] == reference["step"] == STEPS
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def stops_in(text: str) -> dict:
    """{rank: step} of each rank's "rank R: stopping after step N" line."""
    return {int(rank): int(step) for rank, step in re.findall(r"rank (\d+): stopping after step (\d+)", text)}


def assert_no_steps_lost(run_dir: Path, step: int):
    """The checkpoint holds the step every rank stopped after, the last step logged: nothing trained is lost."""
    latest = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert latest["step"] == step == last_step(run_dir), (latest["step"], step, last_step(run_dir))
    assert 0 < step < STEPS


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """The final checkpoint of an uninterrupted 2-process torchrun run."""
    logs = tmp_path_factory.mktemp("reference")
    run_trainer(trainer_args(tiny_corpus, logs, "straight"), nproc=2, timeout=300)
    return final_weights(logs / "straight")


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(tiny_corpus, tmp_path):
    """The resume from such a checkpoint is exact: the srun test below resumes one and compares weights."""
    run_dir, stderr = tmp_path / "term", tmp_path / "term.stderr"
    # a loader worker each: the agent signals each worker's whole process group, loader included
    args = trainer_args(tiny_corpus, tmp_path, "term", "--workers", "1")
    with launched(torchrun("-m", "training.main", *args), cwd=REPO, env=subprocess_env(),
                  stdout=subprocess.DEVNULL, stderr=stderr.open("w")) as agent:
        wait_until(lambda: last_step(run_dir) >= 3, [agent], "step 3", stderr)
        agent.send_signal(signal.SIGTERM)  # the agent forwards it to both workers (as SLURM or a Ctrl-C does)
        agent.wait(timeout=120)
    stops = stops_in(stderr.read_text())
    assert sorted(stops) == [0, 1] and len(set(stops.values())) == 1, stops
    assert_no_steps_lost(run_dir, stops[0])
    assert "(SIGTERM); epoch_latest.pt holds it; exiting 75" in (run_dir / "out.log").read_text()


def test_slurm_script_tasks_stop_together_and_the_job_requeues_itself(tiny_corpus, tmp_path, reference):
    """scripts/slurm_example.sh with a stand-in srun that starts the two ranks itself with SLURM_* variables
    (no torchrun): one world of 2. A SIGTERM to rank 1 alone stops both after one step; the script sees exit
    75 and requeues the job; the job run again resumes and ends with the uninterrupted run's weights."""
    run_dir, stderr, slurm_log = tmp_path / "srun", tmp_path / "srun.stderr", tmp_path / "slurm.log"
    env = subprocess_env(PATH=f"{REPO / 'tests' / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}",
                         FAKE_SLURM_NTASKS="2", FAKE_SLURM_LOG=str(slurm_log), SLURM_JOB_ID="4242",
                         SLURM_JOB_NODELIST="node01", SLURM_SUBMIT_DIR=str(REPO), MASTER_PORT=str(free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(name, None)
    job = ["bash", str(REPO / "scripts" / "slurm_example.sh"), *trainer_args(tiny_corpus, tmp_path, "srun")]
    with launched(job, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr.open("w")) as script:
        wait_until(lambda: last_step(run_dir) >= 3, [script], "step 3", stderr)
        ranks = trainer_ranks(tmp_path)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)
        script.wait(timeout=120)
    assert script.returncode == 75, stderr.read_text()[-3000:]
    assert slurm_log.read_text() == "requeue 4242\n"
    text = stderr.read_text()
    stops = stops_in(text)
    assert sorted(stops) == [0, 1] and len(set(stops.values())) == 1, stops
    assert "rank 0: stopping after step" in text and "(a stop signal to another rank)" in text
    assert_no_steps_lost(run_dir, stops[0])
    assert "run srun: job clip, 2 process(es) on cpu, launched by srun" in (run_dir / "out.log").read_text()

    # what SLURM runs after the requeue: the same script, the same line
    with launched(job, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr.open("w")) as script:
        script.wait(timeout=300)
    assert script.returncode == 0, stderr.read_text()[-3000:]
    assert slurm_log.read_text() == "requeue 4242\n"  # finished: not requeued again
    assert_same_weights(run_dir, reference)
    assert final_weights(run_dir)["world_size"] == 2


def test_two_nodes_without_a_shared_disk_resume_from_rank_0s_checkpoint(tiny_corpus, tmp_path, reference):
    """Two torchrun launches as two nodes, each in its own folder with its own --logs-root. SIGKILLed mid-run
    and launched again with --resume latest: node 1 has no checkpoint and receives node 0's bytes."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]

    def node_command(node_rank, port):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
                "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "training.main",
                *trainer_args(tiny_corpus, nodes[node_rank] / "logs", "nodes", "--resume", "latest")]

    def launch_both(stack, tag):
        port = free_port()
        return [stack.enter_context(launched(node_command(rank, port), cwd=nodes[rank], env=subprocess_env(),
                                             stdout=subprocess.DEVNULL,
                                             stderr=(nodes[rank] / f"{tag}.stderr").open("w")))
                for rank in (0, 1)]

    for node in nodes:
        node.mkdir()
    run0, run1 = nodes[0] / "logs" / "nodes", nodes[1] / "logs" / "nodes"
    with contextlib.ExitStack() as stack:
        procs = launch_both(stack, "first")
        wait_until(lambda: (run0 / "checkpoints" / "epoch_latest.pt").exists() and last_step(run0) >= 4, procs,
                   "node 0's first epoch_latest.pt", nodes[0] / "first.stderr")
    # leaving the stack SIGKILLed both launchers and their workers
    killed_at = torch.load(run0 / "checkpoints" / "epoch_latest.pt", weights_only=True)["step"]
    assert 0 < killed_at < STEPS
    assert not list((run1 / "checkpoints").glob("*.pt")), "only global rank 0 writes checkpoints"

    with contextlib.ExitStack() as stack:
        for proc in launch_both(stack, "second"):
            proc.wait(timeout=300)
            assert proc.returncode == 0, (nodes[0] / "second.stderr").read_text()[-3000:]
    log = (run0 / "out.log").read_text()
    assert re.search(r"sending \S+\.pt \([\d.]+ MB\) to rank\(s\) 1, whose disks do not hold it", log), log
    assert "resumed from" in log
    assert not list((run1 / "checkpoints").glob("*.pt"))
    assert_same_weights(run0, reference)


def one_process_args(corpus, logs, name, *extra):
    return ["--train-data", str(corpus / "train.tsv"), "--model", MODEL, "--logs-root", str(logs), "--name", name,
            "--batch-size", "16", "--warmup", "2", "--log-every-n-steps", "1", "--epochs", "40", *extra]


def test_one_process_stack_dump_sigterm_to_the_group_sigint_twice_and_stale_temp_files(tiny_corpus, tmp_path):
    run_dir, stderr = tmp_path / "one", tmp_path / "one.stderr"
    # what a save killed mid-write leaves behind
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = run_dir / "checkpoints" / ".epoch_latest.pt.tmp.4194000"
    stale.write_bytes(b"\0" * (1 << 20))
    args = [sys.executable, "-m", "training.main",
            *one_process_args(tiny_corpus, tmp_path, "one", "--workers", "1", "--resume", "latest")]
    with launched(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr.open("w")) as proc:
        wait_until(lambda: last_step(run_dir) >= 3, [proc], "step 3", stderr)
        assert not stale.exists()
        for _ in range(5):  # the stack dump signal: prints every thread's stack and goes on, as often as asked
            os.kill(proc.pid, signal.SIGUSR2)
            time.sleep(0.2)
        wait_until(lambda: stderr.read_text().count("Current thread") >= 5, [proc], "five stack dumps", stderr)
        assert "in train_epochs" in stderr.read_text()  # the training thread's stack is among them
        dumped_at = last_step(run_dir)
        wait_until(lambda: last_step(run_dir) > dumped_at + 2, [proc], "training after the dump", stderr)
        # to the whole process group, as SLURM (every process of a task) and torchrun's agent send it: the loader
        # worker gets it too and must not die of it
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 75, stderr.read_text()[-3000:]
    log = (run_dir / "out.log").read_text()
    assert "removed 1 temp file(s) of interrupted checkpoint writes (1.0 MB): .epoch_latest.pt.tmp.4194000" in log
    stops = stops_in(stderr.read_text())
    assert list(stops) == [0]
    assert_one_process_no_steps_lost(run_dir, stops[0])

    # SIGINT twice: at once, no checkpoint. The loader worker is held (SIGSTOP), so the step in progress
    # cannot finish between the two signals: the second one meets a run that is still stopping.
    first_stop = stops[0]
    with launched(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr.open("w")) as proc:
        wait_until(lambda: last_step(run_dir) >= first_stop + 3, [proc], "steps after the resume", stderr)
        held = []
        try:
            wait_until(lambda: _hold_loader(proc.pid, held, run_dir), [proc], "the loader held", stderr)
            proc.send_signal(signal.SIGINT)
            wait_until(lambda: "SIGINT received: finishing this step" in stderr.read_text(), [proc],
                       "the first SIGINT", stderr)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)  # at once: it does not wait for its (held) loader worker
            text = stderr.read_text()
        finally:
            for worker in held:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
    assert proc.returncode == 130, text[-3000:]
    assert "stopped at once by a second SIGINT, without writing a checkpoint" in text and "Traceback" not in text
    latest = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert latest["step"] < last_step(run_dir)  # steps since the last save are gone, as asked
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def assert_one_process_no_steps_lost(run_dir: Path, step: int):
    latest = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert latest["step"] == step == last_step(run_dir), (latest["step"], step, last_step(run_dir))


def _hold_loader(trainer: int, held: list, run_dir: Path) -> bool:
    """SIGSTOP the trainer's loader workers (a new one each epoch), and say whether it has stopped stepping:
    no step logged for a second, so it waits for a batch that cannot come."""
    for pid, (ppid, _, _) in process_table().items():
        if ppid == trainer and pid not in held:
            os.kill(pid, signal.SIGSTOP)
            held.append(pid)
    before = last_step(run_dir)
    time.sleep(1.0)
    return bool(held) and last_step(run_dir) == before


def test_one_trainer_and_one_monitor_per_run(tiny_corpus, tmp_path):
    run_dir, stderr = tmp_path / "locked", tmp_path / "a.stderr"
    args = one_process_args(tiny_corpus, tmp_path, "locked", "--workers", "0", "--save-every-n-steps", "2",
                            "--resume", "latest")
    monitor = [sys.executable, str(REPO / "src" / "utils" / "evaluate_checkpoints.py"), "--logs-dir", str(run_dir),
               "--eval-data-dir", str(tiny_corpus / "eval"), "--epoch", "999", "--poll-seconds", "1"]
    host = socket.gethostname()
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(launched([sys.executable, "-m", "training.main", *args], cwd=REPO,
                                             env=subprocess_env(), stdout=subprocess.DEVNULL,
                                             stderr=stderr.open("w")))
        wait_until(lambda: last_step(run_dir) >= 3, [first], "the first trainer's step 3", stderr)

        second = run_trainer(args, check=False, timeout=180)
        assert second.returncode == 2, second.stderr[-3000:]
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith("error: another trainer holds") and f"pid {first.pid} on {host}" in error, error
        assert (run_dir / "out.log").read_text().count("run locked: job clip") == 1  # it wrote nothing there

        # a monitor runs beside the trainer; a second monitor on the same run does not
        monitor_log = tmp_path / "monitor.stderr"
        watcher = stack.enter_context(launched(monitor, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                               stderr=monitor_log.open("w")))
        wait_until(lambda: "watching" in monitor_log.read_text(), [watcher, first], "the monitor", monitor_log)
        again = subprocess.run(monitor, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert again.returncode == 2, again.stderr[-3000:]
        error = again.stderr.strip().splitlines()[-1]
        assert error.startswith("error: another monitor holds") and f"pid {watcher.pid} on {host}" in error, error
        assert first.poll() is None and watcher.poll() is None

        # a killed trainer's lock is free (the kernel drops it), though its file still names the dead pid
        first.kill()
        first.wait(timeout=60)
        assert json.loads((run_dir / "trainer.lock").read_text())["pid"] == first.pid
        stopped_at = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True)["step"]
        run_trainer(args + ["--stop-after-steps", str(stopped_at + 3)], timeout=180)
    log = (run_dir / "out.log").read_text()
    assert f"took over trainer.lock from pid {first.pid} on {host} (no longer running)" in log


def test_in_loop_eval_longer_than_the_collective_timeout_does_not_fail_the_job(tiny_corpus, tmp_path):
    """Rank 0 is held (SIGSTOP) in its in-loop eval for twice --dist-timeout-minutes, so the eval takes longer
    than any collective may wait; rank 1 waits outside the collectives and the run ends normally."""
    timeout_s = 6
    run_dir, stderr = tmp_path / "slow_eval", tmp_path / "slow_eval.stderr"
    args = ["-m", "training.main", "--train-data", str(tiny_corpus / "train.tsv"), "--model", MODEL,
            "--logs-root", str(tmp_path), "--name", "slow_eval", "--batch-size", "16", "--workers", "0",
            "--epochs", "1", "--zeroshot-frequency", "1", "--eval-data-dir", str(tiny_corpus / "eval"),
            "--dist-timeout-minutes", str(timeout_s / 60)]
    with launched(torchrun(*args), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                  stderr=stderr.open("w")) as agent:
        wait_until(lambda: "in-loop eval at epoch 1" in stderr.read_text(), [agent], "the in-loop eval", stderr)
        rank0 = trainer_ranks(tmp_path)[0]
        os.kill(rank0, signal.SIGSTOP)
        time.sleep(2 * timeout_s)  # the point of the test: held past the collective timeout
        os.kill(rank0, signal.SIGCONT)
        agent.wait(timeout=240)
    text = stderr.read_text()
    assert agent.returncode == 0, text[-3000:]
    assert "eval at epoch 1: {" in text and "imed out" not in text
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert any("eval/zeroshot/shapes/acc1" in row for row in rows)


LOADER_ITEMS = 4  # what the rank below takes: one, then three after the job signal

A_RANK_WITH_A_LOADER_WORKER = f"""
import multiprocessing, sys, time
import torch
from training.preemption import StopRequest, loader_worker_init


class Items(torch.utils.data.IterableDataset):
    def __iter__(self):  # the rank's items, then one that never comes: the worker cannot read the loader's
        for _ in range({LOADER_ITEMS}):  # end-of-work message, so the loader's shutdown has to terminate() it
            yield torch.zeros(2)
        time.sleep(3600)


StopRequest().install()
batches = iter(torch.utils.data.DataLoader(Items(), batch_size=None, num_workers=1,
                                           worker_init_fn=loader_worker_init))
next(batches)
(worker,) = multiprocessing.active_children()
print(worker.pid, flush=True)
sys.stdin.readline()  # meanwhile the job signal reaches the worker
for _ in range({LOADER_ITEMS} - 1):  # more than the loader prefetches (2): one is made after the signal
    next(batches)
print("served", flush=True)
del batches  # the loader's shutdown: a join that times out, then the worker's terminate() and a join
print(worker.exitcode, flush=True)
"""


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_loader_worker_outlives_one_job_signal_and_ends_on_its_ranks_terminate():
    """A signal to the whole job (here from the test, another process) leaves the worker serving; its rank's
    terminate() (the loader's shutdown and multiprocessing's at exit, which then joins it without a timeout) ends
    it at once: a worker that ignored it would still be running after the loader's join, its exit code None."""
    cmd = [sys.executable, "-c", A_RANK_WITH_A_LOADER_WORKER]
    with launched(cmd, cwd=REPO, env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True) as rank:
        line = rank.stdout.readline()
        assert line, rank.stderr.read()[-3000:]
        worker = int(line)
        assert _descendants(rank.pid) == [worker]
        os.kill(worker, signal.SIGTERM)
        time.sleep(1)
        assert _running(worker)
        stdout, stderr = rank.communicate("go\n", timeout=120)
    assert rank.returncode == 0, stderr[-3000:]
    # the worker's handler exits 128 + the signal (a worker killed by it would read -SIGTERM)
    assert stdout.splitlines() == ["served", str(128 + signal.SIGTERM)], stdout + stderr[-3000:]
    assert not _running(worker)


SECOND_SIGINT_IN_A_FINALIZER = """
import os, signal
from training.preemption import StopRequest

StopRequest().install()
os.kill(os.getpid(), signal.SIGINT)  # the first: the run is stopping


class Loader:
    def __del__(self):  # as a data loader's iterator joining its workers at an epoch's end
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass


Loader()
print("still running", flush=True)
"""


def test_a_second_sigint_ends_the_run_even_inside_a_finalizer():
    """An exception raised in a __del__ is printed and dropped, so a Ctrl-C that must stop the run at once
    cannot be one: the clean-clone suite saw the second SIGINT swallowed by a loader's __del__ and the run
    write its checkpoint and exit 75."""
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGINT_IN_A_FINALIZER], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "still running" not in proc.stdout
    assert "stopped at once by a second SIGINT, without writing a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
