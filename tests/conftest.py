"""Shared fixtures: a tiny generated corpus and a helper to run the trainer as a real subprocess."""
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def subprocess_env(**extra):
    """Environment for child processes: our sources importable, one thread each (2-core CI)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick), for a rendezvous: test files run in parallel
    workers, so no two torchrun groups may meet on torchrun's default port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int):
    """Every live process below `pid` (from /proc: no psutil needed)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the field after the parenthesised command name is the state, then the parent pid
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def launched(cmd, **popen_kwargs):
    """Popen whose whole process tree (a torchrun launcher *and its workers*, which torchrun starts in
    sessions of their own) is killed on the way out, so a failed or timed-out test leaves nothing running."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run_bounded(args, data_bytes=2 << 30, timeout=120, env=None):
    """`python ARGS` (`["-c", code, ...]`, `["-m", "training.main", ...]`) in a child whose private writable
    memory (heap, anonymous maps: what an allocation takes) is limited to `data_bytes` by RLIMIT_DATA (RLIMIT_AS
    would also count the ~3.6 GB of libraries torch maps), its whole process tree killed after `timeout` seconds
    (subprocess.TimeoutExpired). Loader workers it forks inherit the limit."""
    args = [str(a) for a in args]
    if env is None and args[0] in ("-c", "-m"):  # a child of the fork server, the imports done
        module, code = (args[1], None) if args[0] == "-m" else (None, args[1])
        return fork_server().run(module, args[2:], cwd=REPO, timeout=timeout, code=code, data_bytes=data_bytes)

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))

    cmd = [sys.executable, *args]
    with launched(cmd, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True, preexec_fn=limit) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


_fork_server = None


def fork_server():
    """This test process's ForkServer (tests/forkserver.py), started on first use, ended with the process."""
    global _fork_server
    if _fork_server is None:
        from forkserver import ForkServer

        _fork_server = ForkServer(subprocess_env(), cwd=str(REPO))
        atexit.register(_fork_server.close)
    return _fork_server


def run_trainer(args, timeout=300, nproc=None, extra_torchrun=(), check=True, env=None):
    """`python -m training.main ARGS` (or under torchrun with `nproc` processes). A one-process run in the default
    environment is a child of the fork server, which has the imports done; any other starts a fresh interpreter."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master-port={free_port()}", *extra_torchrun, "-m", "training.main", *args]
    else:
        cmd = [sys.executable, "-m", "training.main", *args]
    if not nproc and env is None:
        result = fork_server().run("training.main", [str(a) for a in args], cwd=REPO, timeout=timeout)
    else:
        with launched(cmd, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True) as proc:
            stdout, stderr = proc.communicate(timeout=timeout)
        result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (a real ENOSPC, unlike RLIMIT_FSIZE's EFBIG); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """256 training pictures, 36 classes of eval pictures, in the real layouts."""
    from utils.make_corpus import make_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    make_corpus(str(out), train_size=256, eval_size=72, image_size=32, seed=0, shard_size=64)
    return out


@pytest.fixture()
def cascade_logs_in_tmp(tmp_path, monkeypatch):
    """The cascade command line's experiment logs (default logs/cascade, under the working directory) go under the
    test's tmp_path instead of into the repository."""
    import utils.cascade

    monkeypatch.setattr(utils.cascade, "DEFAULT_LOG_DIR", str(tmp_path / "cascade_logs"))


@pytest.fixture()
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads cost more than they bring."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def loader_args(train_data, cache_dir, **overrides):
    """The namespace of the trainer's flags that training.data.get_data reads, for a loader built in-process."""
    args = dict(train_data=str(train_data), dataset_type="auto", csv_separator="\t", csv_img_key="filepath",
                csv_caption_key="title", dataset_size=None, episode_size=0, train_num_samples=None,
                dataset_resampled=False, allow_empty_captions=False, workers=2, batch_size=16, seed=0,
                token_cache_dir=str(cache_dir), no_token_cache=False, log_level="warning")
    args.update(overrides)
    return types.SimpleNamespace(**args)
