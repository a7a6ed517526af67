"""Deployments: which models are served, with which adapters, on which instances.

    deploy / delete / status / list_models      control (plain Python, called from any thread)
    open(model, adapter, payload)               data path (async): pick or start an instance,
                                                stream its events back

A deployment starts no instance until a request arrives (cold start: the instance loads the base
model, then the server loads the adapters into it; requests that arrive meanwhile wait for it).
Requests go to the least-loaded instance below its concurrency target; when all are at target,
another instance starts (up to `max_instances`), else the request waits in a bounded queue
(full: 429; waited `queue_timeout`: 503). Instances draw CPUs/GPUs from the `ResourcePool` that
fine-tuning jobs use; when the pool cannot hold one and none runs, the request gets a 503 with
Retry-After. The reaper stops instances idle for `keep_alive` seconds (keeping `min_instances`),
frees their share and wakes the job supervisor. Instance lifecycle lives in `scaling.py`.

Fine-tuned models (`ft:<base>:<suffix>:<job id>`, see `finetuned.py`) need no deploy: a request
naming one goes to the deployment of its base model (the explicit one when there is one, else
one made on the spot with the defaults, `on_demand`, not saved), and carries the adapter's path
so that the instance loads it on demand into its LRU of `max_loras` adapters.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from sllm.errors import ConflictError, InvalidRequestError, NotFoundError, SllmError
from sllm.jobs.resources import ResourcePool, require_fit
from sllm.serve.adapters import (
    adapter_fingerprint,
    check_adapter_dir,
    check_finite_weights,
    check_fits_base,
    resolve_adapter_path,
)
from sllm.serve.client import GenerationStream, control
from sllm.serve.errors import InstanceError
from sllm.serve.fields import ADAPTER_NAME_RE
from sllm.serve.finetuned import PREFIX as FT_PREFIX
from sllm.serve.finetuned import FineTunedModels, OnDemandAdapter, parse_fine_tuned_model
from sllm.serve.protocol import (
    DeleteResponse,
    DeploymentConfig,
    DeploymentList,
    DeploymentStatus,
    DeployRequest,
    ModelCard,
    ModelDeleted,
    ModelList,
)
from sllm.serve.registry import DeploymentRegistry
from sllm.serve.scaling import Scaler
from sllm.serve.state import Deployment, Instance


@dataclass(frozen=True)
class Route:
    """Where a request goes: a deployment, and the adapter's name inside its instances."""

    model: str
    adapter: str | None = None
    on_demand: OnDemandAdapter | None = None  # a fine-tuned model the instance loads itself


class DeploymentService(Scaler):
    # --- control -----------------------------------------------------------------------------

    def __init__(
        self,
        storage: Path,
        pool: ResourcePool,
        wake=lambda: None,
        registry: DeploymentRegistry | None = None,
        finetuned: FineTunedModels | None = None,
        **options: Any,
    ) -> None:
        super().__init__(storage, pool, wake, **options)
        self._registry = registry
        self.finetuned = finetuned
        self._control = threading.Lock()
        self._aclient: httpx.AsyncClient | None = None

    def start(self) -> None:
        for config, created in self._registry.load() if self._registry else []:
            self._deps[config.model] = Deployment(config, created, self._fingerprints(config))
        super().start()

    def stop(self) -> None:
        super().stop()
        if self._registry is not None:
            self._registry.close()

    def deploy(self, req: DeployRequest) -> DeploymentStatus:
        """Create a deployment or update one; new or replaced adapters are loaded into running
        instances before this returns, so no later request sees an old version."""
        with self._control:
            with self._lock:
                dep = self._deps.get(req.model)
                old = dep.config if dep else None
            config = self._merge(old, req)
            added = {n: config.lora_adapters[n] for n in req.lora_adapters}
            fingerprints = self._validate_adapters(config, added)
            with self._lock:
                if dep is None:
                    dep = Deployment(config, time.time(), {})
                    self._deps[config.model] = dep
                dep.config = config
                dep.on_demand = False
                dep.fingerprints.update(fingerprints)
                for name in added:
                    dep.adapter_errors.pop(name, None)
            if self._registry is not None:
                self._registry.save(config, dep.created)
            errors = self.sync_running(dep)
            self.poke()
            if errors:
                name, message = next(iter(errors.items()))
                raise InvalidRequestError(
                    f"Adapter {name!r} could not be loaded: {message}", param="lora_adapters"
                )
            return self.describe(dep)

    def _merge(self, old: DeploymentConfig | None, req: DeployRequest) -> DeploymentConfig:
        from sllm.store import has_model

        if not has_model(self.storage, req.model):
            raise NotFoundError(
                f"Model {req.model!r} is not in the store at {self.storage}; save it first: "
                f"sllm-store save --model {req.model} --backend transformers",
                param="model",
            )
        base = old.model_dump() if old else {"model": req.model}
        fields = req.model_dump(exclude={"lora_adapters"}, exclude_none=True)
        merged = {**base, **fields}
        adapters = dict(base.get("lora_adapters") or {})
        for name, path in req.lora_adapters.items():
            _check_adapter_name(name, req.model)
            resolved = resolve_adapter_path(self.storage, name, path)
            adapters[name] = resolved.relative_to(self.root).as_posix()
        merged["lora_adapters"] = adapters
        try:  # the request is valid on its own; what it merges with may not be (old rows)
            config = DeploymentConfig.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "model"
            raise InvalidRequestError(
                f"`{field}`: {err['msg']} (in the deployment's merged settings); set it again.",
                param=field,
            ) from None
        self._check_config(config)
        return config

    def _check_config(self, config: DeploymentConfig) -> None:
        if config.lora_adapters and not config.enable_lora:
            raise InvalidRequestError(
                "`lora_adapters` needs `enable_lora`: true (sllm deploy --enable-lora ...).",
                param="enable_lora",
            )
        if config.min_instances > config.max_instances:
            raise InvalidRequestError(
                f"`min_instances` ({config.min_instances}) exceeds `max_instances` "
                f"({config.max_instances}).",
                param="min_instances",
            )
        require_fit(self.pool, config.num_cpus, config.num_gpus, "An instance")
        with self._lock:
            for other in self._deps.values():
                if other.config.model == config.model:
                    continue
                clash = set(config.lora_adapters) & (
                    set(other.config.lora_adapters) | {other.config.model}
                )
                if clash or config.model in other.config.lora_adapters:
                    name = next(iter(clash), config.model)
                    raise ConflictError(
                        f"{name!r} already names a model or adapter of {other.config.model!r}; "
                        "adapter names must be unique across deployments.",
                        param="lora_adapters",
                    )

    def _validate_adapters(self, config: DeploymentConfig, added: dict[str, str]) -> dict:
        model_dir = self.root / config.model
        fingerprints = {}
        for name, rel in added.items():
            path = self.root / rel
            try:
                adapter_config = check_adapter_dir(path)
                check_fits_base(model_dir, path, adapter_config)
                check_finite_weights(path)
            except InvalidRequestError as exc:
                raise InvalidRequestError(
                    f"`lora_adapters.{name}`: {exc.message}", param=f"lora_adapters.{name}"
                ) from None
            fingerprints[name] = adapter_fingerprint(path)
        return fingerprints

    def _fingerprints(self, config: DeploymentConfig) -> dict[str, str]:
        return {n: adapter_fingerprint(self.root / p) for n, p in config.lora_adapters.items()}

    def delete(self, model: str, adapters: list[str] | None = None) -> DeleteResponse:
        """Remove some adapters (instances keep running), or the whole deployment."""
        with self._control:
            with self._lock:
                dep = self._get(model)
                if adapters:
                    unknown = [a for a in adapters if a not in dep.config.lora_adapters]
                    if unknown:
                        raise NotFoundError(
                            f"{model!r} has no adapter {unknown[0]!r}.", param="lora_adapters"
                        )
                    kept = {n: p for n, p in dep.config.lora_adapters.items() if n not in adapters}
                    dep.config = dep.config.model_copy(update={"lora_adapters": kept})
                    for name in adapters:
                        dep.adapter_errors.pop(name, None)
                else:
                    del self._deps[model]
            if adapters:
                if self._registry is not None:
                    self._registry.save(dep.config, dep.created)
                self.sync_running(dep)
                return DeleteResponse(model=model, deleted="adapters", adapters=adapters)
            if self._registry is not None:
                self._registry.delete(model)
            self.stop_all(dep)
            return DeleteResponse(model=model, deleted="deployment")

    def _get(self, model: str) -> Deployment:
        dep = self._deps.get(model)
        if dep is None:
            raise NotFoundError(f"The model {model!r} is not deployed.", param="model")
        return dep

    def status(self, model: str | None = None) -> DeploymentList:
        with self._lock:
            deps = [self._get(model)] if model else list(self._deps.values())
        return DeploymentList(data=[self.describe(d) for d in deps])

    def list_models(self) -> ModelList:
        cards = []
        with self._lock:
            for dep in self._deps.values():
                m = dep.config.model
                cards.append(ModelCard(id=m, created=int(dep.created), root=m))
                for name, path in dep.config.lora_adapters.items():
                    cards.append(ModelCard(id=name, created=int(dep.created), root=path, parent=m))
        if self.finetuned is not None:
            cards += self.finetuned.cards()
        return ModelList(data=cards)

    def get_model(self, name: str) -> ModelCard:
        """One entry of `list_models` (OpenAI's retrieve)."""
        for card in self.list_models().data:
            if card.id == name:
                return card
        raise NotFoundError(f"The model {name!r} does not exist.", param="model")

    def resolve(self, model: str, adapter: str | None) -> Route:
        """Where a request goes; `model` may name an adapter (as in vLLM) or a fine-tuned
        model, which needs no deploy (`lora_adapter_name` may name one too)."""
        with self._lock:
            deployed = model in self._deps
        if not deployed and parse_fine_tuned_model(model) is not None:
            if adapter not in (None, model):
                raise InvalidRequestError(
                    f"`model` names the fine-tuned model {model!r} but `lora_adapter_name` asks "
                    f"for {adapter!r}.",
                    param="lora_adapter_name",
                )
            return self._on_demand(model)
        if parse_fine_tuned_model(adapter) is not None:
            route = self._on_demand(adapter)
            if route.model != model:
                raise InvalidRequestError(
                    f"`lora_adapter_name` {adapter!r} is a fine-tuned model of "
                    f"{route.model!r}, not of {model!r}.",
                    param="lora_adapter_name",
                )
            return route
        return Route(*self._resolve_deployed(model, adapter))

    def _on_demand(self, name: str) -> Route:
        if self.finetuned is None:
            raise NotFoundError(f"The model {name!r} is not deployed.", param="model")
        adapter = self.finetuned.resolve(name)
        return Route(self._deployment_for(adapter.base).config.model, adapter.key, adapter)

    def _deployment_for(self, base: str) -> Deployment:
        """The base model's deployment; made (on demand, with the defaults) when it has none."""
        from sllm.store import has_model

        with self._lock:
            dep = self._deps.get(base)
            if dep is not None:
                return dep
        if not has_model(self.storage, base):
            raise NotFoundError(
                f"The base model {base!r} of this fine-tuned model is no longer in the store: "
                f"save it again (sllm-store save --model {base} --backend transformers).",
                param="model",
            )
        config = DeploymentConfig(model=base, enable_lora=True)
        require_fit(self.pool, config.num_cpus, config.num_gpus, "An instance")
        with self._lock:  # another request may have made it meanwhile: use that one
            return self._deps.setdefault(base, Deployment(config, time.time(), {}, on_demand=True))

    def _resolve_deployed(self, model: str, adapter: str | None) -> tuple[str, str | None]:
        with self._lock:
            if model not in self._deps:
                owners = [d for d in self._deps.values() if model in d.config.lora_adapters]
                if not owners:
                    raise NotFoundError(f"The model {model!r} is not deployed.", param="model")
                if adapter not in (None, model):
                    raise InvalidRequestError(
                        f"`model` names the adapter {model!r} but `lora_adapter_name` asks for "
                        f"{adapter!r}.",
                        param="lora_adapter_name",
                    )
                return owners[0].config.model, model
            dep = self._deps[model]
            if adapter is not None and adapter not in dep.config.lora_adapters:
                raise NotFoundError(
                    f"The model {model!r} has no adapter {adapter!r}.", param="lora_adapter_name"
                )
            if adapter is not None and adapter in dep.adapter_errors:
                raise InstanceError(
                    f"Adapter {adapter!r} failed to load: {dep.adapter_errors[adapter]}"
                )
            return model, adapter

    # --- data path ---------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._aclient is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            timeout = httpx.Timeout(None, connect=10.0)
            self._aclient = httpx.AsyncClient(limits=limits, timeout=timeout)
        return self._aclient

    async def open(
        self,
        model: str,
        adapter: str | None,
        payload: dict,
        on_demand: OnDemandAdapter | None = None,
    ) -> GenerationStream:
        """Route one generation: its `start` event is read, so errors surface before streaming."""
        with self._lock:
            dep = self._get(model)
        inst = await self.acquire(dep)
        try:
            body = {**payload, "adapter": adapter}
            if on_demand is not None:
                body["adapter_path"] = str(on_demand.path)
                body["adapter_fingerprint"] = on_demand.fingerprint
            elif adapter is not None:
                await self._current_adapter(dep, inst, adapter)
            stream = await GenerationStream.open(
                self._client(), inst.url, body, lambda: self.release(inst), inst.headers
            )
            lora = stream.start.get("lora")
            if isinstance(lora, dict):
                with self._lock:
                    inst.lora_cache = [str(n) for n in lora.get("cached", [])]
                    inst.lora_loads += bool(lora.get("loaded"))
            return stream
        except BaseException:
            self.release(inst)
            raise

    async def _current_adapter(self, dep: Deployment, inst: Instance, adapter: str) -> None:
        """Make sure `inst` serves the adapter's files as they are now: a job that completed
        into a deployed adapter's directory replaced them, and the first request after that
        loads the new version (the fingerprint is a few `stat`s; nothing reloads otherwise)."""
        rel = dep.config.lora_adapters.get(adapter)
        if rel is None:
            return
        path = self.root / rel
        fingerprint = adapter_fingerprint(path)
        if not fingerprint or inst.loaded.get(adapter) == f"{path}|{fingerprint}":
            return
        with self._lock:
            dep.fingerprints[adapter] = fingerprint
        errors = await asyncio.to_thread(self._sync, dep, inst)
        self._record_errors(dep, errors)
        if adapter in errors:
            raise InstanceError(f"Adapter {adapter!r} failed to reload: {errors[adapter]}")

    # --- deleting a fine-tuned model ----------------------------------------------------------

    def delete_model(self, name: str) -> ModelDeleted:
        """Delete a fine-tuned model: its adapter leaves the store, then every instance. Base
        models and deployed adapters have their own ways out, named in the 400."""
        if parse_fine_tuned_model(name) is None or self.finetuned is None:
            raise self._not_deletable(name)
        adapter = self.finetuned.resolve(name)
        self.finetuned.check_unused(adapter)
        with self._lock:
            for dep in self._deps.values():
                for alias, rel in dep.config.lora_adapters.items():
                    if (self.root / rel).resolve().is_relative_to(adapter.path):
                        raise ConflictError(
                            f"The model {name!r} is deployed as the adapter {alias!r} of "
                            f"{dep.config.model!r}; remove it there first (sllm delete "
                            f"{dep.config.model} --lora-adapters {alias}).",
                            param="model",
                        )
            instances = [i for d in self._deps.values() for i in d.instances if i.port]
        self.finetuned.remove(adapter)  # first: no request can load it any more
        for inst in instances:
            self._unload_on_demand(inst, adapter.key)
        return ModelDeleted(id=name)

    def _not_deletable(self, name: str) -> Exception:
        from sllm.store import has_model

        with self._lock:
            owners = [d.config.model for d in self._deps.values() if name in d.config.lora_adapters]
            deployed = name in self._deps
        if owners:
            return InvalidRequestError(
                f"{name!r} is an adapter deployed on {owners[0]!r}; remove it with "
                f"`sllm delete {owners[0]} --lora-adapters {name}` (its files stay in the store).",
                param="model",
            )
        if deployed or has_model(self.storage, name):
            return InvalidRequestError(
                f"{name!r} is a base model; base models are not deleted through the API: "
                f"`sllm delete {name}` removes its deployment, `sllm-store delete {name}` its "
                "files.",
                param="model",
            )
        return NotFoundError(f"The model {name!r} does not exist.", param="model")

    def _unload_on_demand(self, inst: Instance, key: str) -> None:
        """Unload `key` and its checkpoints from one instance (requests holding them finish)."""
        try:
            health = control(self._http, "GET", f"{inst.url}/health", headers=inst.headers)
        except SllmError:
            return  # gone: nothing loaded there
        for name in health.get("adapters", {}):
            if name == key or name.startswith(f"{key}:"):
                self._unload(inst, name)


def _check_adapter_name(name: str, model: str) -> None:
    if not ADAPTER_NAME_RE.match(name) or name == model or name == "__base__":
        raise InvalidRequestError(
            f"Adapter name {name!r} is not allowed: use letters, digits, '.', '_', ':' or '-' "
            "(not the model's own name).",
            param="lora_adapters",
        )
    if name.startswith(FT_PREFIX):
        raise InvalidRequestError(
            f"Adapter name {name!r} is not allowed: names starting with {FT_PREFIX!r} are "
            "fine-tuned models, served without a deploy.",
            param="lora_adapters",
        )


__all__ = ["DeploymentService", "Instance"]
