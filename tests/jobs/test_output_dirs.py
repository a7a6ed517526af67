"""Where a job may write its adapter: never under the store's own names, never into another
adapter or model, and never into a directory that a pending or running job also writes (409)."""

from __future__ import annotations

import threading

import pytest

from sllm.config import Settings
from sllm.errors import ConflictError, InvalidRequestError
from sllm.services import Services
from sllm.store import layout
from tests.conftest import job_config

P = "backend_config.output_dir"


@pytest.fixture
def services(storage):
    """The server's services on a real store, supervisor not started: submitted jobs stay
    pending, which is exactly the state whose output_dir must stay reserved."""
    svc = Services.build(Settings(storage_path=storage, num_cpus=2, num_gpus=0))
    yield svc
    svc.stop()


def submit(svc: Services, output_dir: str) -> str:
    return svc.jobs.submit(job_config(svc.settings.storage_path, output_dir=output_dir))


def job_ids(svc: Services) -> list[str]:
    return [r.id for r in svc.store.list(limit=1000)[0]]


OWN_NAMES = [
    ".tmp-1234-abcdef-host",  # a save in progress: clean_stale deletes it once pid 1234 is gone
    ".old-1234-abcdef-host",  # a replaced model or adapter awaiting removal
    ".lock",  # the store's lock file
    ".hidden",
    "adapters/.tmp-x",  # scratch of an adapter save in adapters/
    "tiny-adapters/.old-1/a",
]


@pytest.mark.parametrize("output_dir", OWN_NAMES)
def test_the_stores_own_names_are_refused_and_nothing_is_created(services, output_dir):
    with pytest.raises(InvalidRequestError) as err:
        submit(services, output_dir)
    assert err.value.param == P
    assert "starts with '.'" in err.value.message and f"`{P}`" in err.value.message
    assert job_ids(services) == []
    root = services.settings.storage_path / "transformers"
    assert not (root / output_dir).is_dir()  # (`.lock` is the store's own lock file)


@pytest.mark.parametrize("output_dir", ["../_jobs/x", "../sllm.db", "../_jobs", "../sllm.lock"])
def test_the_stores_files_outside_the_model_root_are_unreachable(services, output_dir):
    with pytest.raises(InvalidRequestError, match="escapes") as err:
        submit(services, output_dir)
    assert err.value.param == P
    assert job_ids(services) == []


def test_the_refusal_covers_every_name_the_cleanup_deletes(storage, tmp_path):
    """What `clean_stale` deletes is exactly a dot-prefixed scratch name; each is refused."""
    root = tmp_path / "root"
    root.mkdir()
    dead = [root / f"{prefix}999999999-abc-{layout._host()}" for prefix in layout.SCRATCH_PREFIXES]
    for d in dead:
        d.mkdir()
    (root / "kept").mkdir()
    assert sorted(layout.clean_stale(root)) == sorted(dead)
    assert [p.name for p in root.iterdir()] == ["kept"]
    for d in dead:
        with pytest.raises(InvalidRequestError):
            layout.check_own_names(f"adapters/{d.name}", param=P)
    layout.check_own_names("adapters/kept", param=P)  # ordinary names pass


def test_an_adapter_inside_another_adapter_or_model_is_refused(services, storage):
    outer = storage / "transformers" / "adapters" / "outer"
    outer.mkdir(parents=True)
    (outer / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="inside the LoRA adapter"):
        submit(services, "adapters/outer/inner")
    with pytest.raises(InvalidRequestError, match="inside"):
        submit(services, "tiny/llama/adapter")
    assert job_ids(services) == []
    assert not (outer / "inner").exists()


def test_an_output_dir_that_an_active_job_writes_is_a_409_naming_it(services):
    first = submit(services, "adapters/x")
    for same in ["adapters/x", "adapters//x/", "./adapters/x", "adapters/x/inner", "adapters"]:
        with pytest.raises(ConflictError) as err:
            submit(services, same)
        assert first in err.value.message and "(pending)" in err.value.message
        assert err.value.param == P
    assert job_ids(services) == [first]  # nothing else was stored
    other = submit(services, "adapters/xy")  # a sibling with a common prefix is fine
    assert services.jobs.cancel(first).status.status.value == "cancelled"
    again = submit(services, "adapters/x")  # a finished job holds nothing
    assert set(job_ids(services)) == {first, other, again}


def test_racing_submissions_of_one_output_dir_admit_exactly_one(services):
    outcomes: list[object] = []
    barrier = threading.Barrier(6)

    def go() -> None:
        barrier.wait()
        try:
            outcomes.append(submit(services, "adapters/race"))
        except ConflictError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [o for o in outcomes if isinstance(o, str)]
    assert len(accepted) == 1 and len(outcomes) == 6
    assert job_ids(services) == accepted
    assert all(accepted[0] in o.message for o in outcomes if isinstance(o, ConflictError))
