"""A warm pool of pre-started Python processes for job workers and inference instances.

Most of a cold start on a small model is Python importing torch, transformers and peft (3-5 s on
a small CPU), not the model. The pool keeps `size` idle children (`python -m sllm.procpool`,
warmed one at a time) that have done those imports (`warm_imports`) and nothing else, each
blocked reading one launch spec from its stdin. `WarmPool.launch` hands a child a spec; the
child then becomes the job worker or instance:

1. it takes the spec's environment (`CUDA_VISIBLE_DEVICES`, thread counts, secrets, ...),
2. points its stdout and stderr at the job's (or instance's) log,
3. sizes torch's intra-op thread pool to `SLLM_NUM_CPUS`,
4. runs `<module>.main(args)` and exits with its code (skipping the module teardown).

Isolation is what a fresh process gets: each child is started in its own session (its pid is its
process group, which the supervisor signals), dies with the server (PR_SET_PDEATHSIG, tied to
the pool's long-lived refill thread), and never touches CUDA while idle (`PYTORCH_NVML_BASED_CUDA_
CHECK` keeps a stray `torch.cuda.is_available()` from initialising the driver), so the devices it
sees are the ones its spec names. No torch op runs in an idle child, so the thread pools are
sized by the taker. A spec whose environment differs from the child's in anything but the
per-launch keys (`LATE_KEYS`) gets a fresh process instead, as does every launch when the pool
is empty or off (size 0). A child that dies while idle is replaced by the refill thread.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sllm.procgroup import signal_group, spawn
from sllm.serve.auth import SECRET_ENV, new_secret

log = logging.getLogger(__name__)

# Set per launch (the devices, threads and secrets of one job or instance); any other difference
# between the server's environment and a warm child's sends the launch to a fresh process, since
# modules imported while warming may have read it.
LATE_KEYS = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "SLLM_NUM_CPUS",
        "SLLM_PARENT_PID",
        SECRET_ENV,
        "SLLM_API_KEY",
        "SLLM_SPAWNED_AT",
        "SLLM_POOLED",
        "TOKENIZERS_PARALLELISM",
        "PYTHONUNBUFFERED",
        "PYTORCH_NVML_BASED_CUDA_CHECK",
        "PYTEST_CURRENT_TEST",  # changes with every test of a server run in-process
        "SLLM_OWNER_PID",
        "SLLM_OWNER_STARTED",
        "RAY_JOB_ID",  # set per Ray worker process; a node pool's children are not Ray workers
    }
)
WARM_SIGNAL = b"W"
ACK_SIGNAL = b"A"
ACK_TIMEOUT_S = 5.0  # a loaded machine may be slow to answer; a dead child answers EOF at once
REFILL_BACKOFF_S = 5.0


@dataclass
class _Child:
    proc: subprocess.Popen
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    warm: bool = False


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An idle child's environment: the server's, minus its key, with no per-launch sizing yet."""
    env = dict(os.environ if base is None else base)
    env.pop("SLLM_API_KEY", None)
    env.update(
        SLLM_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        PYTORCH_NVML_BASED_CUDA_CHECK="1",
        # An instance taking this child adopts this secret (the server reads it from the
        # launch's env), so `sllm.serve.auth.secret_of(pid)` finds it in /proc as before; a
        # child that becomes a job worker drops it and no instance ever holds it.
        SLLM_INSTANCE_SECRET=new_secret(),
        OMP_NUM_THREADS="1",  # nothing runs while idle; the taker sizes torch's pool
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def differing(child: dict[str, str], launch: dict[str, str]) -> set[str]:
    """The variables, other than the per-launch ones, on which the two environments differ."""
    keys = (set(child) | set(launch)) - LATE_KEYS
    return {k for k in keys if child.get(k) != launch.get(k)}


def compatible(child: dict[str, str], launch: dict[str, str]) -> bool:
    """Whether a child warmed with `child` may run a launch wanting `launch`."""
    return not differing(child, launch)


class WarmPool:
    """Keeps `size` warm children; `launch` takes one (or spawns a fresh process)."""

    def __init__(self, size: int, log_path: Path) -> None:
        self.size = max(0, int(size))
        self.log_path = Path(log_path)
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0  # idle children that died before being taken
        self.taken = 0
        self.cold = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> WarmPool:
        if self.size > 0 and self._thread is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # PR_SET_PDEATHSIG fires when the *thread* that spawned a child ends: children are
            # spawned only from this thread, which lives until `stop`.
            self._thread = threading.Thread(target=self._refill_loop, name="warm-pool", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Kill every idle child (taken ones belong to their owners) and end the refill thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            _discard(child)

    def idle_pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self._idle]

    def warm_count(self) -> int:
        with self._lock:
            return sum(1 for c in self._idle if _check_warm(c))

    # --- taking ------------------------------------------------------------------------------

    def launch(
        self, module: str, args: list[str], *, env: dict[str, str], log_path: Path
    ) -> subprocess.Popen:
        """Run `module.main(args)` in a warm child if one fits, else in a fresh process.

        The returned process's `launch_env` is the environment it got: an instance secret in
        `env` is replaced by the one the warm child was started with (see `child_env`)."""
        env = {"SLLM_SPAWNED_AT": repr(time.time()), **env}
        proc = self.take(module, args, env=env, log_path=log_path, adopt_secret=True)
        if proc is not None:
            return proc
        self.cold += 1
        proc = spawn([sys.executable, "-m", module, *args], env=env, log_path=log_path)
        proc.launch_env = env  # type: ignore[attr-defined]
        return proc

    def take(
        self,
        module: str,
        args: list[str],
        *,
        env: dict[str, str],
        log_path: Path,
        stdin: str | None = None,
        adopt_secret: bool = False,
    ) -> subprocess.Popen | None:
        """Hand the launch to a warm child that fits `env`; None when none does.

        `stdin` is what the process reads on its standard input. With `adopt_secret`, an
        instance secret in `env` is replaced by the child's own (so that `secret_of(pid)` reads
        it from /proc); without, the process gets the one in `env`."""
        env = {"SLLM_SPAWNED_AT": repr(time.time()), **env}
        # The log exists from the launch on, as a fresh process's does: a warm child opens it
        # only once it has the spec, and a job killed before then still has a (short) log.
        log_path.touch(exist_ok=True)
        while True:
            child = self._take(env)
            if child is None:
                return None
            launch_env = dict(env)
            if adopt_secret and SECRET_ENV in env:
                launch_env[SECRET_ENV] = child.env[SECRET_ENV]
            spec = {"module": module, "args": list(args), "env": launch_env}
            if stdin is not None:
                spec["stdin"] = stdin
            if _hand_over(child, {**spec, "log_path": str(log_path)}):
                self.taken += 1
                child.proc.launch_env = launch_env  # type: ignore[attr-defined]
                return child.proc
            _discard(child)  # died between the check and the hand-over: try the next one

    def why_not(self, env: dict[str, str]) -> str:
        """Why a launch wanting `env` finds no idle child to take (read from the pool now)."""
        with self._lock:
            idle = [c for c in self._idle if c.proc.poll() is None]
        if not idle:
            return "had no idle process"
        keys = sorted(differing(idle[0].env, env))
        return f"has no idle process for this environment (differs in {keys})"

    def _take(self, env: dict[str, str]) -> _Child | None:
        """The best idle child for `env`: a warm one, else the one warming longest."""
        with self._lock:
            fits = [c for c in self._idle if c.proc.poll() is None and compatible(c.env, env)]
            fits.sort(key=lambda c: (not _check_warm(c), c.started))
            if fits:
                self._idle.remove(fits[0])
        if not fits:
            log.info("warm pool: %s", self.why_not(env))
            return None
        self._wake.set()  # refill in the background
        return fits[0]

    # --- the refill thread -------------------------------------------------------------------

    def _refill_loop(self) -> None:
        while not self._stopping.is_set():
            self._reap_dead()
            with self._lock:
                short = self.size - len(self._idle)
                # One child imports at a time: two at once on a small machine slow each other
                # (and the server's own start-up) down, and the first is ready sooner alone.
                warming = any(not _check_warm(c) for c in self._idle)
            if warming and short > 0:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            if short > 0 and not self._stopping.is_set():
                try:
                    child = self._spawn_child()
                except OSError:
                    log.exception("warm pool: could not start a process")
                    self._stopping.wait(REFILL_BACKOFF_S)
                    continue
                with self._lock:
                    self._idle.append(child)
                continue
            self._wake.wait(1.0)
            self._wake.clear()

    def _reap_dead(self) -> None:
        with self._lock:
            dead = [c for c in self._idle if c.proc.poll() is not None]
            self._idle = [c for c in self._idle if c not in dead]
        for child in dead:
            self.failures += 1
            log.warning(
                "warm pool: idle process %d exited with %s; replacing it (log: %s)",
                child.proc.pid,
                child.proc.returncode,
                self.log_path,
            )
            _discard(child)
        if dead:  # something kills them (memory?): do not spin
            self._stopping.wait(min(REFILL_BACKOFF_S, 0.5 * len(dead)))

    def _spawn_child(self) -> _Child:
        env = child_env()
        with open(self.log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sllm.procpool"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        return _Child(proc, env)


def _check_warm(child: _Child) -> bool:
    """Whether the child has finished its imports (it writes one byte to its stdout then)."""
    if not child.warm and child.proc.stdout is not None:
        ready, _, _ = select.select([child.proc.stdout], [], [], 0)
        if ready:
            child.warm = child.proc.stdout.read(1) == WARM_SIGNAL
    return child.warm


def _hand_over(child: _Child, spec: dict) -> bool:
    """Send the spec to the child; False if it is gone. A warm child acknowledges at once, so a
    child that died just before (the spec still fits in the pipe) is caught here, not by the
    job's owner as a crash; one still importing is not waited for."""
    assert child.proc.stdin is not None and child.proc.stdout is not None
    try:
        child.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        child.proc.stdin.close()
    except (BrokenPipeError, OSError):
        return False
    ok = True
    if child.warm:
        ready, _, _ = select.select([child.proc.stdout], [], [], ACK_TIMEOUT_S)
        ok = not ready or child.proc.stdout.read(1) == ACK_SIGNAL  # EOF: it died
    child.proc.stdout.close()
    return ok


def _discard(child: _Child) -> None:
    signal_group(child.proc.pid, signal.SIGKILL)
    for pipe in (child.proc.stdin, child.proc.stdout):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass
    try:
        child.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# --- the child ---------------------------------------------------------------------------------


def warm_imports() -> None:
    """Everything a worker or an instance imports before it knows its job. `datasets` reads
    `HF_DATASETS_CACHE` at import; the worker points it at the job's directory afterwards
    (`sllm.jobs.worker.use_job_dirs`)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401

    import sllm.finetune.peft_lora  # noqa: F401
    import sllm.jobs.worker  # noqa: F401
    import sllm.serve.engine  # noqa: F401
    import sllm.serve.instance  # noqa: F401


def _become(spec: dict) -> int:
    """Turn this idle child into the process `spec` describes and run it."""
    import importlib
    import tempfile

    os.environ.clear()
    os.environ.update(spec["env"])
    os.environ["SLLM_POOLED"] = "1"
    owner = os.environ.get("SLLM_OWNER_PID")
    if owner:
        die_with_owner(int(owner), os.environ.get("SLLM_OWNER_STARTED"))
    tempfile.tempdir = None
    fd = os.open(spec["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if spec.get("stdin") is not None:
        data = tempfile.TemporaryFile()  # unlinked: only this process can read it
        data.write(spec["stdin"].encode())
        data.seek(0)
        os.dup2(data.fileno(), 0)
        data.close()
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as fd 0
    else:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    threads = int(os.environ.get("SLLM_NUM_CPUS") or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    module = importlib.import_module(spec["module"])
    sys.argv = [spec["module"], *spec["args"]]
    return int(module.main(spec["args"]) or 0)


def start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, from /proc): a pid with another start time is
    another process that reused the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def die_with_owner(pid: int, started: str | None) -> None:
    """Kill this process group when process `pid` (the owner that took us) ends.

    A pooled child's parent is the pool, not the owner (on a Ray node, the job's or instance's
    actor), so PR_SET_PDEATHSIG cannot tie the two; a thread waits on a pidfd of the owner
    instead, and the group goes with it (SIGKILL, as the death signal would send)."""
    try:
        handle: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # the owner is gone already
    except (AttributeError, OSError):  # no pidfd (old kernel): look every half second
        handle = None
    started = started or start_time(pid)
    if started is None or start_time(pid) != started:
        os._exit(1)  # gone, or the pid was reused: our owner is gone

    def wait() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while start_time(pid) == started:
                time.sleep(0.5)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=wait, name="owner-watch", daemon=True).start()


def probe(out: str, hold_s: float = 0.0) -> int:
    """`probe OUT [HOLD_S]`: write what this process got (environment, threads, CUDA state,
    standard input) to OUT, then live HOLD_S seconds more; for tests and `bench coldstart`."""
    import torch

    info = {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "ppid": os.getppid(),
        "pooled": os.environ.get("SLLM_POOLED") == "1",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "cuda_initialized": torch.cuda.is_initialized(),
        "idle_cuda_initialized": os.environ.get("SLLM_IDLE_CUDA_INIT") == "1",
        "process_wait_s": process_wait_s(),
        "secret": os.environ.get("SLLM_INSTANCE_SECRET"),
        "stdin": sys.stdin.read() if sys.stdin is not None else None,
    }
    Path(out).write_text(json.dumps(info))
    print(f"probe: {info}", flush=True)
    time.sleep(hold_s)
    return 0


def process_wait_s() -> float | None:
    """Seconds from the launch call until this process could start its own work (for a fresh
    process: its interpreter start and imports so far)."""
    spawned = os.environ.get("SLLM_SPAWNED_AT")
    return round(time.time() - float(spawned), 4) if spawned else None


def main(argv: list[str] | None = None) -> int:
    """`python -m sllm.procpool`: an idle warm child; `... probe OUT`: see `probe`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return probe(argv[1], *(float(a) for a in argv[2:3]))
    from sllm.jobs.worker import die_with_parent

    die_with_parent()
    warm_imports()
    import torch

    if torch.cuda.is_initialized():  # a bug in an import: say so to whoever takes us
        os.environ["SLLM_IDLE_CUDA_INIT"] = "1"
    try:
        os.write(1, WARM_SIGNAL)
    except OSError:
        pass  # taken before we were warm: the pool stopped listening
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the pool closed us
    try:
        os.write(1, ACK_SIGNAL)
    except OSError:
        pass
    spec = json.loads(line)
    idle_cuda = os.environ.get("SLLM_IDLE_CUDA_INIT")
    if idle_cuda:
        spec["env"]["SLLM_IDLE_CUDA_INIT"] = idle_cuda
    try:
        rc = _become(spec)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the log gets the traceback, the owner the code
        import traceback

        traceback.print_exc()
        rc = 1
    _quick_exit(rc)
    return rc


def _quick_exit(rc: int) -> None:
    """Exit without tearing down every module torch and transformers loaded (about a second on
    a small CPU): atexit handlers and the logs still run and flush, nothing else is left."""
    import atexit
    import logging as logging_module

    atexit._run_exitfuncs()
    logging_module.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
