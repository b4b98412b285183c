"""Stopping on a signal: every rank finishes its step, `epoch_latest.pt` is written, the trainer exits 75.

SLURM (preemption, time limit, `--signal`), torchrun's agent (which forwards SIGTERM/SIGINT to its workers)
and Ctrl-C all end a run with a signal. The trainer's handler only records it; the step loop all-reduces the
record together with its non-finite check (one host sync per step serves both), so a signal that reaches one
rank, or every rank at slightly different moments, stops all of them after the same step. Then they write
epoch_latest.pt together and exit with STOP_EXIT_CODE.

Where stopping after a step would wait on work that need not finish, the handler raises StopRequested instead
(`stop.abortable()`): during start-up, before the first step (nothing trained yet, so nothing is lost), and
during rank 0's in-loop evaluation (the epoch checkpoint it scores is already written; the monitor can score
it later). A second SIGINT means "now": the handler itself ends the process, exit 130, no checkpoint (the last
one on disk is whole: writes are atomic). It does not raise KeyboardInterrupt, which Python drops when the
signal lands in a finalizer (a data loader's __del__ joining its workers at an epoch's end). A repeated SIGTERM
does not stop at once: torchrun's agent and SLURM may both deliver one.

Data-loader workers must outlive a stop signal too: SLURM signals every process of a task, torchrun's agent
signals its workers' process groups (`killpg`), a terminal's Ctrl-C its foreground group, and a worker that dies
mid-step makes its rank raise "DataLoader worker ... is killed by signal". Forked workers inherit the handler,
but torch's worker loop installs its own SIGTERM handler, so `loader_worker_init` (the trainer's loaders'
worker_init_fn) takes the stop signals over in the worker: it blocks them and a thread waits for them with
sigwaitinfo, which tells who sent each one. A signal from the worker's own rank (the loader's or
multiprocessing's terminate() at shutdown and at exit) ends the worker at once; one sent to the whole job
(SLURM, killpg, Ctrl-C) is ignored the first time, so the rank can finish its step, and ends it the second.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import threading
import time
from typing import Optional

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": run it again with --resume latest
STOP_EXIT_CODE = 75
# a second SIGINT: stopped at once, like an uncaught Ctrl-C in a shell (128 + SIGINT)
INTERRUPT_EXIT_CODE = 130

# the trainer always stops on these; --stop-signal adds one
ALWAYS_STOP = ("TERM", "INT")
_UNCATCHABLE = ("KILL", "STOP")


_stack_dump_signals: set = set()  # those served by a thread in this process
_installed: Optional["StopRequest"] = None  # the trainer's handler, for forked loader workers to re-arm


class StopRequested(BaseException):
    """Raised by the handler inside `StopRequest.abortable()`. A BaseException, like KeyboardInterrupt, so
    no `except Exception` on the way up swallows it."""


def signal_flag(value: str) -> Optional[str]:
    """argparse type of a signal flag: 'USR1', 'SIGUSR1' or 'usr1' -> 'USR1'; 'none' -> None."""
    name = value.strip().upper()
    if name in ("NONE", ""):
        return None
    name = name[3:] if name.startswith("SIG") else name
    if not isinstance(getattr(signal, "SIG" + name, None), signal.Signals) or name in _UNCATCHABLE:
        raise argparse.ArgumentTypeError(f"{value!r} is no signal a process can catch (e.g. USR1, HUP; or none)")
    return name


class StopRequest:
    """The trainer's stop signals: `install()` at start, then `requested` (the first signal's name or None)."""

    def __init__(self, extra_signal: Optional[str] = None):
        names = list(ALWAYS_STOP) + ([extra_signal] if extra_signal and extra_signal not in ALWAYS_STOP else [])
        self.signals = [getattr(signal, "SIG" + name) for name in names]
        self.requested: Optional[str] = None  # e.g. "SIGTERM"
        self.requested_at: Optional[float] = None  # time.monotonic() of that signal
        self._owner = os.getpid()
        self._abortable = 0
        self._previous = {}
        self._seen_in_child = set()

    def install(self) -> "StopRequest":
        global _installed
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        _installed = self
        return self

    def uninstall(self) -> None:
        global _installed
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if _installed is self:
            _installed = None

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._owner:
            self._in_forked_child(signum)
            return
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                _interrupt_now()
            return
        self.requested, self.requested_at = name, time.monotonic()
        # os.write, not logging: a handler may interrupt the main thread inside a logging call
        what = ("stopping now" if self._abortable else
                "finishing this step, then writing epoch_latest.pt (SIGINT again: stop now, without it)")
        os.write(2, f"{name} received: {what}\n".encode())
        if self._abortable:
            raise StopRequested(name)

    def _in_forked_child(self, signum: int) -> None:
        """A forked loader worker: the first stop signal is its rank's business (Ctrl-C and SLURM signal every
        process), so it goes on serving batches until the rank shuts it down. A second one (the loader's own
        terminate() of a worker that does not end) acts as it would without this handler."""
        if signum in self._seen_in_child:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
        self._seen_in_child.add(signum)

    @contextlib.contextmanager
    def abortable(self):
        """Inside, a stop signal raises StopRequested at once (also one that came just before)."""
        if self.requested is not None:
            raise StopRequested(self.requested)
        self._abortable += 1
        try:
            yield
        finally:
            self._abortable -= 1

    def seconds_since(self) -> float:
        return time.monotonic() - self.requested_at if self.requested_at is not None else 0.0


def _interrupt_now() -> None:
    """Ctrl-C on a stopping run: gone at once, clean-up included (the interrupted step's loader would be joined
    at exit). Its loader workers see their rank gone and end; the kernel drops the run folder's lock."""
    try:
        os.write(2, b"stopped at once by a second SIGINT, without writing a checkpoint\n")
        logging.shutdown()  # what the log files hold so far stays there
    finally:  # the signal may have come inside a write to one of those files, whose flush then raises
        os._exit(INTERRUPT_EXIT_CODE)


def loader_worker_init(worker_id: int) -> None:
    """worker_init_fn of the trainer's data loaders: the stop signals are handled by a thread that knows their
    sender, over the SIGTERM handler torch's worker loop installs (which lets any SIGTERM kill the worker).
    Its rank's terminate() ends it now (a handler that ignored it would leave the rank's exit joining it for
    ever); a signal to the whole job is ignored once."""
    if _installed is None or os.getpid() == _installed._owner:
        return
    rank_pid, seen = os.getppid(), set()

    def on_signal(info) -> None:
        if info.si_pid == rank_pid or info.si_signo in seen:
            os._exit(128 + info.si_signo)
        seen.add(info.si_signo)

    _serve_signals({int(sig) for sig in _installed.signals}, on_signal, "stop-signals")


@contextlib.contextmanager
def stop_signals_blocked():
    """Inside, this thread blocks the run's stop signals, so loader workers forked here start with them blocked:
    one that comes before the worker reaches `loader_worker_init` waits there, pending, for its thread (torch's
    worker loop would otherwise let it kill the worker). Here it is delivered when the block ends."""
    if _installed is None or os.getpid() != _installed._owner:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {int(sig) for sig in _installed.signals})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def serve_stack_dumps(name: Optional[str]) -> None:
    """`kill -USR2 <pid>` (--stack-dump-signal): every thread's Python stack on stderr, and the run goes on.

    The dump runs in a thread that holds the GIL meanwhile, so no other thread moves its frames.
    faulthandler.register() would read them from inside the signal handler while the other threads run, which
    can crash the process (CPython #116008; seen here as a trainer's SIGSEGV). Native threads started before
    this call do not block the signal; one delivered to them runs the same dump in the main thread."""
    signum = getattr(signal, "SIG" + name) if name is not None else None
    if signum is None or signum in _stack_dump_signals:  # a caller that runs the trainer again in-process
        return
    _stack_dump_signals.add(signum)
    signal.signal(signum, lambda *_: faulthandler.dump_traceback(all_threads=True))
    _serve_signals({signum}, lambda _: faulthandler.dump_traceback(all_threads=True), "stack-dumps")


def _serve_signals(signums: set, on_signal, name: str) -> None:
    """Blocks `signums` in this thread and every thread it starts from now on, and hands each one that comes
    to `on_signal(siginfo)` in a daemon thread waiting for them with sigwaitinfo: ordinary Python code, not a
    handler that interrupts whatever runs, and the siginfo says who sent it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)

    def serve() -> None:
        while True:
            on_signal(signal.sigwaitinfo(signums))

    threading.Thread(target=serve, name=name, daemon=True).start()
