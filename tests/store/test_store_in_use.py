"""`sllm-store delete` keeps a model that a deployment or a pending/running job uses, says what
uses it, and with `--force` deletes it and spells out what that breaks."""

from __future__ import annotations

import asyncio

import pytest

from sllm.config import Settings
from sllm.errors import ConflictError, NotFoundError
from sllm.paths import db_path
from sllm.serve.protocol import DeploymentConfig, DeployRequest
from sllm.serve.registry import DeploymentRegistry
from sllm.services import Services
from sllm.store import delete_model, has_model, model_users
from tests.conftest import TINY, job_config
from tests.store.test_store_cli import run_cli


@pytest.fixture
def services(storage):
    """The server's services on a real store and database; supervisor and reaper not started,
    so a submitted job stays pending and a deployment starts no instance."""
    svc = Services.build(Settings(storage_path=storage, num_cpus=2, num_gpus=0))
    yield svc
    svc.stop()


def test_a_model_without_users_is_deleted_and_a_store_without_a_database_has_none(storage):
    assert model_users(storage, TINY) == []
    assert delete_model(storage, TINY) == []
    assert not has_model(storage, TINY)
    assert not (storage / "sllm.db").exists()  # the check created nothing


def test_a_pending_job_keeps_its_base_model(services, storage):
    job = services.jobs.submit(job_config(storage))
    with pytest.raises(ConflictError) as err:
        delete_model(storage, TINY)
    assert f"fine-tuning job {job} (pending)" in err.value.message
    assert "--force" in err.value.message and err.value.param == "model"
    assert has_model(storage, TINY)
    services.jobs.cancel(job)
    assert model_users(storage, TINY) == []  # a finished job uses nothing


def test_a_deployment_keeps_its_model_and_force_says_what_breaks(services, storage):
    services.deployments.deploy(DeployRequest(model=TINY))
    out = run_cli("delete", "--model", TINY, "--storage-path", str(storage))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith(f"error: {TINY} is in use, so it was not deleted:")
    assert f"deployment {TINY!r}" in out.stderr and "sllm delete" in out.stderr
    assert "Traceback" not in out.stderr
    assert has_model(storage, TINY)

    out = run_cli("delete", "--model", TINY, "--storage-path", str(storage), "--force")
    assert out.returncode == 0, out.stderr
    assert f"deleted {TINY}" in out.stdout
    assert "this breaks:" in out.stderr and "cold start answers 404" in out.stderr
    assert not has_model(storage, TINY)

    # the deployment's next cold start is a clear 404, not an instance dying on a missing path
    with pytest.raises(NotFoundError, match="no longer in the store") as err:
        asyncio.run(services.deployments.open(TINY, None, {"prompt": "hi"}))
    assert "sllm-store save --model tiny/llama" in err.value.message
    assert services.deployments.status(TINY).data[0].instances == []


def test_an_adapter_served_from_inside_the_models_directory_counts(storage):
    """A deployment (recorded by an earlier server) of another model whose adapter was placed
    inside this model's directory: deleting this model would leave it in a non-model dir."""
    registry = DeploymentRegistry(db_path(storage))
    config = DeploymentConfig(
        model="other/model", enable_lora=True, lora_adapters={"a": f"{TINY}/adapters/mine"}
    )
    registry.save(config, 0.0)
    registry.close()
    users = model_users(storage, TINY)
    assert [u.what for u in users] == [
        f"adapter 'a' of deployment 'other/model' (at {TINY}/adapters/mine, inside the model's "
        "directory)"
    ]
    assert "files are kept" in users[0].breaks
    with pytest.raises(ConflictError, match="adapter 'a' of deployment 'other/model'"):
        delete_model(storage, TINY)
    assert delete_model(storage, TINY, force=True) == users
    assert not has_model(storage, TINY)
