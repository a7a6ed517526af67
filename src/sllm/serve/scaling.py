"""Instance lifecycle for `DeploymentService`: cold start, routing slots, adapter sync, reaping.

All state (`sllm.serve.state`) lives under one lock; slow work (spawning, HTTP, killing) happens
outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from sllm.errors import NotFoundError, OverloadedError, SllmError
from sllm.jobs.resources import ResourcePool
from sllm.paths import backend_root
from sllm.serve.client import control
from sllm.serve.errors import ColdStartError, QueueFullError
from sllm.serve.notify import Notifier
from sllm.serve.process import InstanceProcess
from sllm.serve.protocol import DeploymentStatus
from sllm.serve.state import Deployment, Instance, describe

log = logging.getLogger(__name__)
CAPACITY_RETRY_S = 5.0


class Scaler:
    def __init__(
        self,
        storage: Path,
        pool: ResourcePool,
        wake=lambda: None,
        *,
        start_timeout: float = 300.0,
        stop_grace: float = 3.0,
        reap_interval: float = 0.2,
        process_factory=InstanceProcess,
    ) -> None:
        self.storage = Path(storage)
        self.process_factory = process_factory  # (workdir, name) -> InstanceProcess-like
        self.root = backend_root(self.storage).resolve()
        self.workdir = self.storage / "_serve"
        self.pool = pool
        self._wake_jobs = wake
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.reap_interval = reap_interval
        self._deps: dict[str, Deployment] = {}
        self.cold_starts: Counter[str] = Counter()  # instances started, by model (for /metrics)
        self._lock = threading.RLock()
        self._changed = Notifier()
        self._http = httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0))
        self._stopping = threading.Event()
        self._poke = threading.Event()
        self._reaper: threading.Thread | None = None
        # Instances get PR_SET_PDEATHSIG, which fires when the *thread* that spawned them ends,
        # so they are spawned from this one long-lived thread, never from a boot thread.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="serve-spawn")

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = threading.Thread(target=self._reap_loop, name="serve-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stopping.set()
        self._poke.set()
        if self._reaper is not None:
            self._reaper.join(timeout=10)
        with self._lock:
            deps = list(self._deps.values())
        for dep in deps:
            self.stop_all(dep)
        self._spawner.shutdown(wait=True)
        self._http.close()

    def poke(self) -> None:
        """Run the reaper now (e.g. to start `min_instances` after a deploy)."""
        self._poke.set()

    # --- slots -------------------------------------------------------------------------------

    async def acquire(self, dep: Deployment) -> Instance:
        """A slot on a ready instance of `dep`, starting one or queueing when needed."""
        cfg = dep.config
        deadline = time.monotonic() + cfg.queue_timeout
        inst, queued = None, False
        try:
            while inst is None:
                waiter = self._changed.waiter()
                with self._lock:
                    inst = self._take_slot(dep)
                    if inst is None and not queued:
                        if dep.queued >= dep.config.max_queue:
                            raise _queue_full(dep)
                        dep.queued += 1
                        queued = True
                if inst is None:
                    if time.monotonic() >= deadline:
                        raise OverloadedError(
                            f"{cfg.model!r} is busy: no instance slot within "
                            f"{cfg.queue_timeout:g}s.",
                            retry_after=1,
                        )
                    await waiter.wait(min(1.0, deadline - time.monotonic()))
                else:
                    self._changed.discard(waiter)
        finally:
            if queued:
                with self._lock:
                    dep.queued -= 1
        await self._until_ready(dep, inst)
        return inst

    def _take_slot(self, dep: Deployment) -> Instance | None:
        """Under the lock: reserve a slot on the least-loaded instance, or start one."""
        if self._deps.get(dep.config.model) is not dep:
            raise NotFoundError(f"The model {dep.config.model!r} is not deployed.", param="model")
        target = dep.config.concurrency()
        open_ = [i for i in dep.live() if i.in_flight < target]
        if open_:
            inst = min(open_, key=lambda i: (i.state != "ready", i.in_flight))
        elif len(dep.live()) < dep.config.max_instances:
            self._check_model_stored(dep)
            inst = self._start_instance(dep)
            if inst is None and not dep.live():
                raise OverloadedError(
                    f"No capacity to start {dep.config.model!r}: its {dep.config.num_cpus} CPU(s) "
                    f"and {dep.config.num_gpus} GPU(s) are held by fine-tuning jobs or other "
                    "instances.",
                    retry_after=CAPACITY_RETRY_S,
                )
        else:
            inst = None
        if inst is not None:
            inst.in_flight += 1
            inst.last_used = time.monotonic()
        return inst

    def _check_model_stored(self, dep: Deployment) -> None:
        """A cold start of a model that left the store (`sllm-store delete --force`) is the
        client's 404 with the fix, not an instance that dies loading a missing path."""
        model = dep.config.model
        if not self._model_stored(dep):
            raise NotFoundError(
                f"The deployed model {model!r} is no longer in the store, so no instance can "
                f"start: save it again (sllm-store save --model {model} --backend transformers) "
                f"or delete the deployment (sllm delete {model}).",
                param="model",
            )

    def _model_stored(self, dep: Deployment) -> bool:
        from sllm.store import has_model

        return has_model(self.storage, dep.config.model)

    async def _until_ready(self, dep: Deployment, inst: Instance) -> None:
        while True:
            waiter = self._changed.waiter()
            with self._lock:
                state, error = inst.state, inst.error
            if state == "ready":
                self._changed.discard(waiter)
                return
            if state != "starting":
                self._changed.discard(waiter)
                self.release(inst)
                if self._deps.get(dep.config.model) is not dep:
                    raise NotFoundError(f"{dep.config.model!r} was deleted.", param="model")
                raise ColdStartError(cold_start_message(dep.config.model, error, self.storage))
            await waiter.wait(1.0)

    def release(self, inst: Instance) -> None:
        with self._lock:
            inst.in_flight -= 1
            inst.last_used = time.monotonic()
        self._changed.notify_all()

    # --- starting and stopping ---------------------------------------------------------------

    def _start_instance(self, dep: Deployment) -> Instance | None:
        cfg = dep.config
        owner = f"instance:{cfg.model}:{dep.counter + 1}"
        alloc = self.pool.try_acquire(owner, cfg.num_cpus, cfg.num_gpus)
        if alloc is None:
            return None
        dep.counter += 1
        self.cold_starts[cfg.model] += 1
        name = f"{cfg.model.replace('/', '--')}-{dep.counter}"
        proc = self.process_factory(self.workdir, name)
        inst = Instance(f"{cfg.model}#{dep.counter}", owner, alloc, proc, cfg.max_batch_size)
        dep.instances.append(inst)
        threading.Thread(target=self._boot, args=(dep, inst), daemon=True).start()
        return inst

    def _boot(self, dep: Deployment, inst: Instance) -> None:
        t0 = time.monotonic()
        cfg = dep.config
        try:
            spawn = inst.proc.spawn
            args = (self.storage, cfg.model, inst.alloc, inst.max_batch_size, cfg.dtype)
            self._spawner.submit(spawn, *args).result()
            info = inst.proc.wait_ready(self.start_timeout, lambda: inst.state != "starting")
            with self._lock:
                inst.port = int(info["port"])
                inst.host = info.get("host", inst.host)
            t_sync = time.monotonic()
            self._record_errors(dep, self._sync(dep, inst))
            phases = {**info.get("phases", {}), "adapters_s": time.monotonic() - t_sync}
            with self._lock:
                if inst.state != "starting":
                    raise ColdStartError("stopped while starting")
                inst.state = "ready"
                inst.cold_start_s = time.monotonic() - t0
                inst.phases = {k: round(float(v), 4) for k, v in phases.items()}
                inst.last_used = time.monotonic()
            log.info("%s ready in %.2fs (%s)", inst.id, inst.cold_start_s, inst.phases)
        except Exception as exc:  # noqa: BLE001 - reported to waiters and in status
            message = f"{type(exc).__name__}: {exc}"
            log.warning("%s failed to start: %s", inst.id, message)
            with self._lock:
                if inst.state == "starting":
                    inst.state, inst.error = "failed", message
                    dep.last_error = message
            self._teardown(dep, inst)
        finally:
            self._changed.notify_all()

    def _teardown(self, dep: Deployment, inst: Instance) -> None:
        inst.proc.stop(self.stop_grace)
        self.pool.release(inst.owner)
        with self._lock:
            if inst in dep.instances:
                dep.instances.remove(inst)
        self._wake_jobs()
        self._changed.notify_all()

    def stop_all(self, dep: Deployment) -> None:
        with self._lock:
            victims = list(dep.instances)
            for inst in victims:
                inst.state = "stopping"
        threads = [threading.Thread(target=self._teardown, args=(dep, i)) for i in victims]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # --- adapters on instances ---------------------------------------------------------------

    def sync_running(self, dep: Deployment) -> dict[str, str]:
        with self._lock:
            targets = [i for i in dep.instances if i.live and i.port is not None]
        errors: dict[str, str] = {}
        for inst in targets:
            errors.update(self._sync(dep, inst))
        self._record_errors(dep, errors)
        return errors

    def _sync(self, dep: Deployment, inst: Instance) -> dict[str, str]:
        """Make `inst` hold exactly the deployment's adapters; {name: error} for failures."""
        errors: dict[str, str] = {}
        with inst.sync_lock:
            with self._lock:
                want = {
                    name: (str(self.root / rel), dep.fingerprints.get(name, ""))
                    for name, rel in dep.config.lora_adapters.items()
                }
                max_loras = dep.config.max_loras
            if inst.max_loras != max_loras:
                self._set_max_loras(inst, max_loras)
            for name in [n for n in inst.loaded if n not in want]:
                self._unload(inst, name)
            for name, (path, fingerprint) in want.items():
                if inst.loaded.get(name) == f"{path}|{fingerprint}":
                    continue
                body = {"name": name, "path": path, "fingerprint": fingerprint}
                try:
                    url = f"{inst.url}/adapters"
                    control(self._http, "POST", url, json=body, headers=inst.headers)
                    inst.loaded[name] = f"{path}|{fingerprint}"
                except SllmError as exc:
                    errors[name] = exc.message
                    self._unload(inst, name)  # never leave an older version answering
        return errors

    def _set_max_loras(self, inst: Instance, max_loras: int) -> None:
        try:
            body = {"max_loras": max_loras}
            control(self._http, "PUT", f"{inst.url}/lora-cache", json=body, headers=inst.headers)
            inst.max_loras = max_loras
        except SllmError as exc:  # it keeps its current cap; the next sync tries again
            log.warning("%s: could not set max_loras: %s", inst.id, exc.message)

    def _unload(self, inst: Instance, name: str) -> None:
        try:
            url = f"{inst.url}/adapters/{name}"
            control(self._http, "DELETE", url, headers=inst.headers)
        except SllmError:
            pass  # not loaded there (or the instance is gone): nothing to serve stale
        inst.loaded.pop(name, None)

    def _record_errors(self, dep: Deployment, errors: dict[str, str]) -> None:
        with self._lock:
            dep.adapter_errors.update(errors)

    # --- the reaper --------------------------------------------------------------------------

    def _reap_loop(self) -> None:
        while not self._stopping.is_set():
            self._poke.wait(self.reap_interval)
            self._poke.clear()
            if self._stopping.is_set():
                return
            try:
                self._reap_once()
            except Exception:  # noqa: BLE001 - the reaper must keep running
                log.exception("reaper pass failed")

    def _reap_once(self) -> None:
        now = time.monotonic()
        doomed: list[tuple[Deployment, Instance]] = []
        with self._lock:
            for dep in self._deps.values():
                doomed += [(dep, i) for i in self._crashed(dep)]
                doomed += [(dep, i) for i in self._idle(dep, now)]
                while len(dep.live()) < dep.config.min_instances:
                    if not self._model_stored(dep) or self._start_instance(dep) is None:
                        break
        for dep, inst in doomed:
            threading.Thread(target=self._teardown, args=(dep, inst), daemon=True).start()

    def _crashed(self, dep: Deployment) -> list[Instance]:
        out = []
        for inst in dep.instances:
            if inst.state == "ready" and inst.proc.poll() is not None:
                inst.state = "failed"
                inst.error = f"the instance exited with code {inst.proc.poll()}"
                dep.last_error = f"{inst.id}: {inst.error}\n{inst.proc.log_tail(5)}"
                out.append(inst)
        return out

    def _idle(self, dep: Deployment, now: float) -> list[Instance]:
        spare = len(dep.live()) - dep.config.min_instances
        idle = [
            i
            for i in dep.instances
            if i.state == "ready"
            and i.in_flight == 0
            and now - i.last_used >= dep.config.keep_alive
        ]
        out = sorted(idle, key=lambda i: i.last_used)[: max(0, spare)]
        for inst in out:
            inst.state = "stopping"
        return out

    def describe(self, dep: Deployment) -> DeploymentStatus:
        with self._lock:
            return describe(dep, time.monotonic())


def _queue_full(dep: Deployment) -> OverloadedError:
    return QueueFullError(
        f"{dep.config.model!r} is overloaded: {dep.queued} requests are already waiting "
        f"(max_queue={dep.config.max_queue}).",
        retry_after=1,
    )


def cold_start_message(model: str, error: str | None, storage: Path) -> str:
    """One line for the API: the failure's first line, no paths outside the store; the log tail
    stays in the instance's log."""
    from sllm.jobs.messages import scrub_paths

    first = (error or "unknown error").strip().splitlines()[0].rstrip(":")
    first = scrub_paths(first, storage)
    return (
        f"The instance for {model!r} could not start ({first}); its log is under "
        "`_serve/` in the storage path."
    )
