"""Shared entry-point plumbing: library errors become one-line messages and exit code 2; a run stopped
by SIGINT or SIGTERM says so in one line and exits 130 or 143 (128 + the signal, as a shell reports it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import NoReturn

from prunenet.errors import ConfigurationError, PruneNetError, PruneNetWarning, is_user_error

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived where no training loop could stop at a safe point (loading, slicing,
    writing, evaluating). A BaseException, like KeyboardInterrupt: nothing catches it by accident, and
    the writers' ``finally`` blocks remove what was being written.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopState:
    """What the signal handler knows: who can stop gracefully, where to pass a signal on, which signal
    came, what was saved."""

    graceful: Callable[[], None] | None = None  # asks a running training loop to stop after its step
    forward: Callable[[int], None] | None = None  # passes a signal on to the run's other processes
    received: int | None = None
    note: str | None = None


_stop = _StopState()


def set_signal_hooks(graceful: Callable[[], None] | None = None, forward: Callable[[int], None] | None = None) -> None:
    """How this process answers SIGINT / SIGTERM (``callbacks.StopOnSignal`` sets both for a fit or a recovery).

    Args:
        graceful: while set, the first signal calls it (the training loop then stops after the step in
            progress, on every rank together, and saves what resume needs) instead of raising
            :class:`Interrupted` at once; a second signal still raises at once.
        forward: called with the signal before :class:`Interrupted` is raised, to stop the run's other
            processes too (Lightning's launcher on the rank that started them).
    """
    _stop.graceful, _stop.forward = graceful, forward


def note_interruption(note: str) -> None:
    """What the stopped run saved (``"the state after step 40 is in ...; resume with ..."``): the end of
    the one-line message."""
    _stop.note = note


def received_signal() -> int | None:
    """The number of the SIGINT/SIGTERM this process received, or None."""
    return _stop.received


def install_signal_handlers() -> dict[int, object]:
    """Make SIGINT and SIGTERM this module's (``callbacks.StopOnSignal`` takes SIGTERM back from Lightning,
    whose handler makes a collective inside the signal handler). Main thread only; returns the handlers
    replaced (those Python cannot restore, set from C, are left out)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    return {s: handler for s, handler in previous.items() if handler is not None}


def _on_signal(signum: int, frame) -> None:
    first = _stop.received is None
    _stop.received = signum
    if first and _stop.graceful is not None:
        _stop.graceful()
        return
    if _stop.forward is not None:
        _stop.forward(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT / SIGTERM back (delivered when the block ends) around steps that must not be cut in
    two, such as the two renames that replace an output folder."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    except (AttributeError, OSError):  # a platform without pthread_sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def report_interruption(signum: int) -> int:
    """Print the one ``error: stopped by <signal>; <what was saved>`` line (on the first process of the
    run only) and return the exit code, 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
    if _process_rank() == 0:
        what = _stop.note or "what was being written was removed unfinished; earlier outputs are as they were"
        print(f"error: stopped by {signal.Signals(signum).name}; {what}", file=sys.stderr, flush=True)
    return 128 + int(signum)


def _process_group():
    """``torch.distributed`` when this process is in a process group of several (never imports torch)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed if distributed.get_world_size() > 1 else None
    return None


def _process_rank() -> int:
    group = _process_group()
    return group.get_rank() if group is not None else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` after flushing stdout and stderr, skipping interpreter teardown: a
    rank of a multi-process run, whose gloo teardown (in ``destroy_process_group`` or at interpreter
    exit) sometimes aborts the process with SIGABRT ("terminate called without an active exception",
    seen in CI after successful runs and after a peer failed)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not keep the process alive
            stream.flush()
    os._exit(code)


def _exit(code: int) -> NoReturn:
    if _process_group() is not None:
        exit_now(code)
    sys.exit(code)


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; a :class:`PruneNetError` (or Lightning's MisconfigurationException, e.g.
    more devices than the machine has), a full disk or a permission error prints ``error: <message>``
    and exits 2. A :class:`PruneNetWarning` prints ``warning: <message>`` and the work goes on.
    SIGINT / SIGTERM print ``error: stopped by SIGINT|SIGTERM ...`` and exit 130 / 143, also when the
    signal came so late that the work finished.

    Set ``PRUNENET_VERBOSE=1`` to get the traceback instead.
    """
    warnings.showwarning = _show_warning
    _stop.received, _stop.note, _stop.graceful, _stop.forward = None, None, None, None
    previous = install_signal_handlers()
    try:
        main()
    except (Interrupted, KeyboardInterrupt) as exc:
        _exit(report_interruption(getattr(exc, "signum", signal.SIGINT)))
    except Exception as exc:
        if not report_user_error(exc):
            raise
        _exit(2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if _stop.received is not None:  # after the last point that could stop: the work is complete
        if _stop.note is None:
            note_interruption("it came after the work was done: every output was written")
        _exit(report_interruption(_stop.received))
    group = _process_group()
    if group is not None:  # a rank of a finished multi-process run: leave together, without gloo's teardown
        with contextlib.suppress(Exception):  # a peer that already left: this rank's work is done all the same
            group.barrier()
        exit_now(0)


def report_user_error(exc: BaseException) -> bool:
    """Print ``error: <message>`` to stderr if ``exc`` is a user error (:func:`is_user_error`), a full
    disk or a permission error (:func:`os_error_message`), and ``PRUNENET_VERBOSE`` does not ask for the
    traceback; returns whether it printed."""
    if not isinstance(exc, Exception) or os.environ.get("PRUNENET_VERBOSE"):
        return False
    message = str(exc) if is_user_error(exc) else os_error_message(exc)
    if message is None:
        return False
    print(f"error: {message}", file=sys.stderr)
    return True


def os_error_message(exc: BaseException) -> str | None:
    """One line for a full disk, a file size or quota limit, or a denied permission met anywhere in
    ``exc``'s chain (:mod:`prunenet.diskspace`); None for anything else. The line names the file, the
    room left in its folder, and what to do. Writers that know how much they need say so themselves
    (``artifacts.atomic_write_dir``)."""
    from prunenet.diskspace import disk_errno, permission_errno, room

    code = disk_errno(exc)
    name = next((e.filename for e in (exc, exc.__cause__, exc.__context__) if getattr(e, "filename", None)), None)
    where = f" {str(name)!r}" if name else ""
    if code is not None:
        return f"cannot write{where} ({os.strerror(code)}; {room(name)}); free some space, or write to another folder"
    code = permission_errno(exc)
    if code is not None:
        return f"permission denied for{where} ({os.strerror(code)}); check its permissions, or use another folder"
    return None


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A :class:`PruneNetWarning` is one ``warning: <message>`` line; other warnings as Python shows them."""
    if issubclass(category, PruneNetWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


#: LightningCLI ``parser_kwargs`` of PruneNet's entry points: a refused flag or config key raises (and
#: :func:`parse_errors_in_one_line` turns it into one line) instead of printing the usage and exiting.
PARSER_KWARGS = {"exit_on_error": False}


@contextlib.contextmanager
def parse_errors_in_one_line() -> Iterator[None]:
    """Around building a LightningCLI with :data:`PARSER_KWARGS`: jsonargparse's refusal (a misspelt key or
    class, a value of the wrong type; several indented lines) becomes one :class:`ConfigurationError` line
    that names the key and the reason.

    Raises:
        ConfigurationError: for any parse error.
    """
    from jsonargparse import ArgumentError

    try:
        yield
    except ArgumentError as exc:
        raise ConfigurationError(one_line_parse_error(str(exc))) from None
    except ValueError as exc:  # a plug point's own check, wrapped by jsonargparse while instantiating
        if isinstance(exc, PruneNetError):
            raise
        raise ConfigurationError(one_line_parse_error(str(exc))) from None


def one_line_parse_error(text: str) -> str:
    """jsonargparse's multi-line message in one line: ``<key> (<inner key>): <the specific reasons>``."""
    import re

    keys = re.findall(r'Parser key "([^"]+)"', text)
    text = re.sub(r'(Type \S+ expects [^:]*: )?Parser key "[^"]+":', "", text)
    text = re.sub(r"\.? Got value: Namespace\(.*", "", text)
    # The wrappers and the "not a short name" branch of a ``str | class`` union say nothing specific.
    skip = ("Does not validate against", "Given value", "Expected a <class 'str'>", "Subtypes", "Errors", "Type ", "tip:",
            "usage:")
    parts = [line.strip().lstrip("- ").strip().rstrip(":") for line in text.splitlines()]
    reasons = [part for part in parts if part and not part.startswith(skip)]
    message = "; ".join(dict.fromkeys(reasons)) or "invalid value"
    if "dot import path" in message and keys:  # ``--model.learner=baseline --model.learner.init_args.momentum=...``
        message += (f" (a short name takes no init_args: give the class, --{keys[0]}=<ClassName> or "
                    f"--{keys[0]}.class_path=<module.ClassName>)")
    if not keys:
        return message
    return f"{keys[0]}{f' ({chr(46).join(keys[1:])})' if keys[1:] else ''}: {message}"
