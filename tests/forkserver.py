"""A fork server for the trainer runs the tests start: `python -m MODULE ARGS` as a real process, without paying
the imports each time.

Every `python -m training.main` spends 5-7 s of CPU importing torch, open_clip and what they pull in (torchvision's
ops import torch._dynamo, open_clip's hf_model imports transformers) before it reads its first flag; the suite
starts such a process dozens of times. The server is one process (per test worker) that imports
`training.main` once and never runs a tensor operation; for each request it forks a child that becomes the run:
a new session (as `start_new_session=True`), the request's working directory, environment, argv and output files,
then `runpy` executes the module as `__main__`, and the child exits with the code `python -m` would give
(SystemExit's code, 1 and a traceback for an uncaught exception, -N when killed by signal N). The child is a real
process: signals, kill -9, loader workers and exit codes behave as in a fresh interpreter.

`python -c CODE` runs the same way, and a child may have its private writable memory bounded (RLIMIT_DATA, set
in the child after the fork: the server's own heap of imports, a few hundred MB, counts in it as it would in a
fresh interpreter that imported the same).

What the imports fix for the server's life is the same for every child: the interpreter, `sys.path` and the
environment variables read at import time (thread counts, the Hugging Face cache). `run` therefore takes the
default environment only; a caller with its own environment starts a fresh interpreter.

pytest-forked and multiprocessing's "forkserver" start method do the same for Python functions; neither runs a
module as `python -m` does with its own output files and session, which is what these tests need.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

SERVER = r"""
import atexit, json, os, runpy, sys, traceback

replies = os.fdopen(os.dup(1), "w")
requests = os.fdopen(os.dup(0), "r")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(2, 1)  # nothing the imports print can reach the reply channel

import training.main  # noqa: F401  (the imports every run shares, paid once here)

for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        replies.close()
        requests.close()
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, fd)
            os.close(out)
        if request["data_bytes"]:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (request["data_bytes"], request["data_bytes"]))
        code = 0
        try:
            if request["module"] is not None:
                sys.argv = [request["module"], *request["args"]]
                # run as __main__ from its source, as `python -m` does; its imports stay cached
                sys.modules.pop(request["module"], None)
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            else:  # python -c CODE ARGS
                sys.argv = ["-c", *request["args"]]
                exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                code = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), file=replies, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)
"""


class ForkServer:
    def __init__(self, env: Dict[str, str], cwd: str):
        self.env = env
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)

    def _reply(self, deadline: Optional[float]) -> Optional[dict]:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.process.stdout], [], [], wait)
        if not ready:
            return None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the test fork server ended (exit {self.process.poll()})")
        return json.loads(line)

    def run(self, module: Optional[str], args: List[str], cwd: str, timeout: float, code: Optional[str] = None,
            data_bytes: Optional[int] = None) -> subprocess.CompletedProcess:
        """`python -m MODULE ARGS` (or `python -c CODE ARGS`) in `cwd` with the server's environment, as a forked
        child whose private writable memory RLIMIT_DATA bounds to `data_bytes` if given; its whole session is
        killed after `timeout` seconds (subprocess.TimeoutExpired, as Popen.communicate raises)."""
        cmd = [sys.executable, *(["-m", module] if module is not None else ["-c", code]), *args]
        with tempfile.TemporaryDirectory(prefix="forkserver-") as folder:
            outputs = {name: os.path.join(folder, name) for name in ("stdout", "stderr")}
            request = {"module": module, "code": code, "args": list(args), "cwd": str(cwd), "env": self.env,
                       "data_bytes": data_bytes, **outputs}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._reply(None)["pid"]
            timed_out = False
            try:
                reply = self._reply(time.monotonic() + timeout)
                if reply is None:
                    timed_out = True
                    os.killpg(pid, signal.SIGKILL)
                    reply = self._reply(None)
            finally:
                try:  # loader workers or anything else the run left in its session
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            stdout, stderr = (open(outputs[name], encoding="utf-8", errors="replace").read()
                              for name in ("stdout", "stderr"))
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
