"""Run a console command of this environment in a child forked from a server that has torch,
fairseq and eqssl imported already (one server per pytest process).

A fresh ``fairseq-train`` spends about 4.5 s of CPU importing them before it does anything; the
suite starts about a hundred such commands (docs/development.md, "Where the CPU goes"). A
forked child runs the command's own entry point with its own argv, working folder and
environment, its stdout and stderr going to one file, unbuffered, and exits with the status the
console script would have. What it cannot show is what a command prints while torch, fairseq
or eqssl is imported (that went to the server, once): tests of that start a fresh process
(``conftest.run(..., fresh=True)``).

The server imports no ``fairseq_cli`` module, each of which calls ``logging.basicConfig`` as it
is imported, so every command sets up its logging as a fresh process does (:func:`_load`); the handler
that importing fairseq gives the root logger is moved to the child's own unbuffered stderr. ``python forked_command.py`` is the server: one JSON request a line on stdin,
``{"pid": ...}`` and then ``{"status": ...}`` a line each on stdout.
"""

import atexit
import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from importlib.metadata import entry_points
from typing import Dict, List

# What the server imports before it forks anything: the costly part of every command's start.
PRELOAD = ("eqssl", "fairseq.tasks", "fairseq.models", "fairseq.criterions", "fairseq.trainer",
           "fairseq.checkpoint_utils", "hydra", "omegaconf")


def is_console_script(name: str) -> bool:
    """Whether ``name`` is a console script of this environment (nothing is imported here)."""
    return bool(entry_points(group="console_scripts", name=name))


def _unbuffered(descriptor: int) -> io.TextIOWrapper:
    """A text stream that writes through to ``descriptor`` at once, as PYTHONUNBUFFERED gives."""
    return io.TextIOWrapper(io.FileIO(descriptor, "w", closefd=False), encoding="utf-8", write_through=True)


def _stream_handlers() -> List[logging.StreamHandler]:
    """Every logging handler that writes to a stream, on the root logger and on any other."""
    loggers = [logging.root, *(logger for logger in logging.root.manager.loggerDict.values()
                               if isinstance(logger, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers if isinstance(handler, logging.StreamHandler)]


def _load(name: str):
    """Console script ``name``'s function, imported with logging as a fresh process has it.

    fairseq configures the root logger as it is imported (fairseq.models.wav2vec's
    wav2vec2_classification calls ``logging.basicConfig(level=DEBUG)``), which the server did. A
    fresh ``fairseq-train`` configures it first (fairseq_cli.train calls ``basicConfig`` before it
    imports fairseq), and fairseq's call is then a no-op: so the script's module is imported
    with the root logger bare, and given fairseq's configuration only if it set up none itself.
    """
    (script,) = entry_points(group="console_scripts", name=name)
    handlers, level = logging.root.handlers[:], logging.root.level
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)
    function = script.load()
    if not logging.root.handlers:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    return function


def _exit_status(error: SystemExit) -> int:
    """The status the interpreter gives ``sys.exit(error.code)``; it prints a non-integer code."""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


def _child(request: dict, replies: int) -> None:
    """In the forked child: the console script ``request["name"]`` as a fresh process runs it;
    ``replies``: the server's end of the reply pipe, not the child's business."""
    os.close(replies)
    null = os.open(os.devnull, os.O_RDONLY)
    output = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(null)
    os.close(output)
    streams = {id(sys.stdout): _unbuffered(1), id(sys.stderr): _unbuffered(2)}
    for handler in _stream_handlers():  # importing fairseq gave the root logger one, on stderr
        if id(handler.stream) in streams:
            handler.setStream(streams[id(handler.stream)])
    sys.stdout = sys.__stdout__ = streams[id(sys.stdout)]
    sys.stderr = sys.__stderr__ = streams[id(sys.stderr)]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    try:
        status = _exit_status(SystemExit(_load(request["name"])()))
    except SystemExit as error:
        status = _exit_status(error)
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        status = 1
    try:
        atexit._run_exitfuncs()  # fairseq closes its TensorBoard writers at exit, for one
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve() -> None:
    """The server: import PRELOAD, then fork a child for each request and report its status."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, replies.fileno())
        print(json.dumps({"pid": pid}), file=replies)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=replies)


class Server:
    """The client's end: a server process started on first use, one request at a time."""

    def __init__(self) -> None:
        self.process = None
        self.received = b""
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            # its stderr is the test process's: what torch and fairseq print as they import
            self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, bufsize=0)
            self.received = b""
        return self.process

    def _reply(self, timeout=None):
        """The server's next reply line, or None if none came within ``timeout`` seconds."""
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self.received:
            if not select.select([descriptor], [], [], timeout)[0]:
                return None
            chunk = os.read(descriptor, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ({__file__}) exited with status {self.process.wait()}")
            self.received += chunk
        line, self.received = self.received.split(b"\n", 1)
        return json.loads(line)

    def run(self, name: str, argv: List[str], cwd, env: Dict[str, str], output: str,
            timeout: float) -> subprocess.CompletedProcess:
        """Console script ``name`` with ``argv`` (``argv[0]`` its path) in a forked child, as
        ``subprocess.run`` with stdout and stderr together would give it; ``output``: a file."""
        with self.lock:
            server = self._start()
            server.stdin.write(json.dumps({"name": name, "argv": argv, "cwd": str(cwd), "env": env,
                                           "output": output}).encode() + b"\n")
            pid = self._reply()["pid"]
            reply = self._reply(timeout)
            if reply is None:
                os.kill(pid, signal.SIGKILL)
                self._reply()
                raise subprocess.TimeoutExpired(argv, timeout)
        with open(output, encoding="utf-8", errors="replace") as printed:
            return subprocess.CompletedProcess(argv, reply["status"], printed.read())


SERVER = Server()


if __name__ == "__main__":
    serve()
