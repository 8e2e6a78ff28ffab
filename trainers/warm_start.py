"""torchrun whose ranks start from its own pre-imported process (`cluster.rank_start: fork`).

    python -u -m hpctrain.trainers.warm_start -m torch.distributed.run [torchrun args] -m MODULE ...

Every rank of a node imports the same torch, transformers and trainer modules: on this
project's CPU nodes that is 4-6 CPU-seconds per rank before its first step, most of a short
run, and on a shared file system every rank reads the same thousands of files. Here torchrun's
agent imports them once, then starts each rank by forking itself instead of exec'ing a fresh
interpreter. Everything else is torchrun's own: its rendezvous, its worker environment, its log
redirects, its monitoring and its shutdown (SIGTERM, then SIGKILL, to the rank's session).

A forked rank is made to look like the exec'd one to everything outside it and to itself:
- its own session (torchrun starts ranks with `start_new_session`), stdout and stderr on the
  files torchrun opened for it;
- signal handlers and mask as exec leaves them (ignored ones stay ignored) and Python sets
  them; the agent's exit handlers dropped;
- the environment torchrun built for it, in `os.environ` and in `/proc/PID/environ`, and its
  command line (`python -u -m MODULE ...`) in `/proc/PID/cmdline` (ps, pkill -f, the tests);
- exit codes as Python's: SystemExit's code, 1 after a traceback, death by SIGINT after an
  uncaught KeyboardInterrupt.
The agent never starts a thread pool or touches a device before forking (it only imports);
CUDA cannot be initialised before a fork, so `auto` forks only where torch has no GPU
(launcher/node.py).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback

ENV_ROOM = "HPCTRAIN_ENV_ROOM"  # room in the agent's environment for a rank's (set by launcher/node.py)
# what every trainer rank imports; a missing one (peft, an old transformers) is simply not preloaded
PRELOAD = (
    "torch",
    "numpy",
    "transformers",
    "transformers.modeling_utils",
    "transformers.modeling_layers",
    "transformers.masking_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.tokenization_utils_tokenizers",
    "hpctrain.trainers.entry",
    "hpctrain.trainers.loop",
)
# what a run's spec adds (`spec_modules`). Not DeepSpeed, though its ranks import it too (2-3 CPU-s
# each here): importing it logs to stdout (torchrun's console, not the rank logs), and the memory
# it takes belongs to each rank in `plan`'s estimate, measured above a rank's start
PEFT = ("peft",)


class ForkedRank:
    """The parts of `subprocess.Popen` torchrun's agent uses, for a forked rank."""

    def __init__(self, pid: int, args: tuple) -> None:
        self.pid, self.args, self.returncode = pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode


def spec_modules(run_dir: str) -> list[str]:
    """The modules a run's ranks import beyond PRELOAD, from its frozen spec: its model family's
    modeling module, peft. Read loosely: the ranks validate the spec, not this."""
    import yaml

    try:
        with open(os.path.join(run_dir, "spec.yaml"), encoding="utf-8") as f:
            spec = yaml.safe_load(f)
        model = spec.get("model") or {}
        config = model.get("config") or {}
        if not config and model.get("path") and os.path.isdir(model["path"]):
            import json

            with open(os.path.join(model["path"], "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        family = str(config.get("model_type", "")).replace("-", "_")
        out = [f"transformers.models.{family}.modeling_{family}"] if family.isidentifier() else []
        if (spec.get("finetune") or {}).get("method", "full") not in ("full", "freeze"):
            out += PEFT
        return out
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError):
        return []


def rank_module(args: tuple) -> tuple[str, list[str]] | None:
    """(module, its argv) when torchrun starts `python [-u] -m MODULE ARGS` of this interpreter."""
    args = [str(a) for a in args]
    if not args or os.path.realpath(args[0]) != os.path.realpath(sys.executable):
        return None
    rest = args[1:]
    while rest and rest[0] == "-u":
        rest = rest[1:]
    if len(rest) < 2 or rest[0] != "-m":
        return None
    return rest[1], rest[2:]


def _proc_areas() -> tuple[int, int, int, int]:
    """arg_start, arg_end, env_start, env_end of this process (proc(5), fields 48-51)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return tuple(int(x) for x in fields[45:49])  # type: ignore[return-value]


def _overwrite(start: int, end: int, items: list[bytes]) -> bool:
    """Write NUL-terminated `items` over [start, end), padding with NULs; False if they do not fit."""
    block = b"".join(i + b"\0" for i in items)
    if not start or len(block) > end - start:
        return False
    ctypes.memmove(start, block.ljust(end - start, b"\0"), end - start)
    return True


def _become(args: list[str], env: dict[str, str]) -> None:
    """Show the exec'd rank's command line and environment in /proc, and use that environment."""
    try:
        arg_start, arg_end, env_start, env_end = _proc_areas()
    except (OSError, ValueError, IndexError):
        arg_start = arg_end = env_start = env_end = 0
    # unsetenv reads the old strings, so the environment is emptied before its memory is reused
    os.environ.clear()
    _overwrite(arg_start, arg_end, [a.encode() for a in args])
    try:  # the name top and pgrep show (torchrun named its thread pt_elastic): the executable's
        with open("/proc/self/comm", "w") as f:
            f.write(os.path.basename(args[0])[:15])
    except OSError:
        pass
    _overwrite(env_start, env_end, [f"{k}={v}".encode() for k, v in env.items()])
    os.environ.update(env)


def _fresh_signals() -> None:
    """Signal dispositions and mask as an exec'd Python has them: exec keeps an ignored signal
    ignored (the launcher starts torchrun with SIGUSR2 ignored, so a USR2 during a rank's
    start-up is dropped, not fatal) and resets a handled one to its default; then Python's own."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) != signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _run_rank(module: str, argv: list[str], cmdline: list[str], env: dict[str, str], out, err) -> int:
    """The child's side of a fork: become the rank and run it; its exit code."""
    os.setsid()
    if out is not None:
        os.dup2(out.fileno(), 1)
    if err is not None:
        os.dup2(err.fileno(), 2)
    _fresh_signals()
    atexit._clear()
    env = {k: v for k, v in env.items() if k != ENV_ROOM}
    _become(cmdline, env)
    sys.argv = ["-m", *argv]
    try:
        runpy._run_module_as_main(module, alter_argv=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _end(130, die_of=signal.SIGINT)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _end(code)
    return code


def _end(code: int, die_of: int | None = None) -> None:
    """As the interpreter ends: non-daemon threads joined, exit handlers run, output flushed."""
    import threading

    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if die_of is not None:
            signal.signal(die_of, signal.SIG_DFL)
            os.kill(os.getpid(), die_of)
        os._exit(code)


def _install() -> bool:
    """Make torchrun's subprocess handler fork this process for trainer ranks; False where this
    torch starts its workers some other way (the ranks are then exec'd as usual)."""
    try:
        from torch.distributed.elastic.multiprocessing.subprocess_handler import (
            subprocess_handler as sh,
        )

        exec_popen = sh.SubprocessHandler._popen
    except (ImportError, AttributeError):
        return False

    def popen(self, args: tuple, env: dict[str, str]):
        target = rank_module(args)
        if target is None:  # not one of ours: exec it as torchrun would
            return exec_popen(self, args, env)
        module, argv = target
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_rank(module, argv, [str(a) for a in args], env, self._stdout, self._stderr)
            finally:
                os._exit(code)
        return ForkedRank(pid, args)

    sh.SubprocessHandler._popen = popen
    return True


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: python -m hpctrain.trainers.warm_start -m torch.distributed.run [torchrun args]")
    # the rank's own module too (`-m MODULE` among torchrun's arguments): imported, not run
    ranks = [sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "-m"][-1:]
    run_dirs = [sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--run-dir"][-1:]
    for name in (*PRELOAD, *ranks, *(spec_modules(run_dirs[0]) if run_dirs else [])):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if not _install():
        print("hpctrain: this torch's torchrun has no subprocess handler to fork from: its ranks "
              "start as fresh interpreters (cluster.rank_start: exec)", file=sys.stderr, flush=True)
    gc.collect()
    gc.freeze()  # the imported objects stay in pages the forked ranks share with the agent
    module = sys.argv[2]
    sys.argv = ["-m", *sys.argv[3:]]
    runpy._run_module_as_main(module, alter_argv=True)


if __name__ == "__main__":
    main()
