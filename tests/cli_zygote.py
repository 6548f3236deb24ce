"""``python -m tests.cli_zygote <spec.json>``: several ``python -m <module> <args>`` runs that share one
start-up (used by ``tests.conftest.run_fit_many``).

Most of a refused command's time is importing torch, Lightning and transformers (5-8 s each on a
2-core machine). This process imports what ``<module>`` imports at its top level, once, then forks
one child per run. Each child is a real process of its own, as ``python -m <module> <args>`` would
be: the module runs as ``__main__`` (runpy, as ``-m`` does) with its own ``sys.argv``, its stdout and
stderr are its own files (starting with whatever the imports printed, as they would in a fresh
process), its exit code is the status it exits with (``SystemExit`` as the interpreter maps it, an
uncaught exception's traceback and 1, a signal as -N), and the atexit handlers run before it ends.
The children of one spec run at the same time, as the separate processes did.

``warm`` (optional) names more modules to import before forking: third-party libraries that the
runs import later anyway once they reach a model (torch, transformers' model code), which holds
no PruneNet code. Importing them earlier changes nothing a run does or prints (PruneNet only looks
in ``sys.modules`` for ``torch.distributed``, to find a process group none of these runs has, and
for Lightning, which is never in ``warm``).

spec: {"module": "prunenet.fit", "timeout": seconds, "warm": [module, ...],
       "jobs": {name: {"argv": [...], "stdout": path, "stderr": path}}, "result": path}
result: {name: returncode}
"""

from __future__ import annotations

import ast
import atexit
import importlib.util
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback


def _top_level_imports(module: str) -> list[ast.stmt]:
    """The module-level ``import`` / ``from ... import`` statements of ``module``'s source, in order."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return []
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    return [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]


def _preimport(module: str, warm: list[str]) -> bytes:
    """Run ``module``'s top-level imports here (not the module itself), then import the ``warm``
    modules; returns what they printed."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        try:
            for node in _top_level_imports(module):
                try:
                    exec(compile(ast.Module(body=[node], type_ignores=[]), "<preimport>", "exec"), {})
                except Exception:  # noqa: BLE001 - the child imports it again and fails as a fresh process would
                    break
            else:
                for name in warm:
                    try:
                        importlib.import_module(name)
                    except Exception:  # noqa: BLE001 - as above
                        break
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        captured.seek(0)
        output = captured.read()
    # ``python -m`` runs the module fresh as __main__; a copy imported here would make runpy warn.
    sys.modules.pop(module, None)
    return output


def _exit_code(exc: SystemExit) -> int:
    """The status the interpreter exits with for ``exc`` (a non-int code is printed and exits 1)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(module: str, argv: list[str], stdout: str, stderr: str, prefix: bytes) -> None:
    """In the forked child: become ``python -m module *argv``; never returns."""
    code = 1
    try:
        for fd, path in ((1, stdout), (2, stderr)):
            with open(path, "wb") as f:
                if fd == 2:
                    f.write(prefix)
                    f.flush()
                os.dup2(f.fileno(), fd)
        sys.argv = [module, *argv]  # runpy sets argv[0] to the module's file, as -m does
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        try:
            import threading

            threading._shutdown()  # non-daemon threads end before the interpreter does
        except Exception:  # noqa: BLE001
            pass
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    module, jobs = spec["module"], spec["jobs"]
    prefix = _preimport(module, spec.get("warm", []))
    children: dict[int, str] = {}
    for name, job in jobs.items():
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(module, job["argv"], job["stdout"], job["stderr"], prefix)
        children[pid] = name
    codes: dict[str, int] = {}
    deadline = time.monotonic() + float(spec["timeout"])
    while children:
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
        if children and time.monotonic() > deadline:  # a hang: kill what is left, as run_fit_many did
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.01)
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(codes, f)


if __name__ == "__main__":
    main(sys.argv[1])
