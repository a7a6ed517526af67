"""Validation data and early stopping through the real server: bad keys are a 400 that stores
nothing; a job with a validation share reports `valid_loss` in its progress and as events."""

from __future__ import annotations

import pytest

from tests.api.test_jobs_validation import _set, assert_refused
from tests.conftest import job_config


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_src):
    from tests.conftest import stored_server

    root = tmp_path_factory.mktemp("validation") / "store"
    server = stored_server(root, tiny_model_src, "--num-cpus", "2", "--num-gpus", "0")
    yield server
    server.stop()


BC = "backend_config"
BAD = [
    (f"{BC}.early_stopping_patience", 2, "validation data"),
    (f"{BC}.early_stopping_threshold", 0.1, "early_stopping_threshold"),
    (f"{BC}.dataset_config.validation_split", 24, "leaves 0 to train on"),  # the file has 24
    (f"{BC}.dataset_config.validation_split", 1.0, "validation_split"),
    (f"{BC}.training_config.eval_strategy", "steps", "no validation data"),
    (f"{BC}.init_adapter", "tiny/adapters/none_here", "no LoRA adapter"),
    (f"{BC}.init_adapter", "/etc", "init_adapter"),
    (f"{BC}.validation_dataset_config", {"dataset_source": "local"}, "validation_dataset_config"),
]


@pytest.mark.parametrize("field,value,expect", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_validation_keys_are_400_and_create_nothing(srv, field, value, expect):
    assert_refused(srv, expect, json=_set(job_config(srv.storage), field, value))


def test_validation_data_outside_the_roots_is_400(srv):
    cfg = job_config(srv.storage)
    cfg[BC]["validation_dataset_config"] = {
        **cfg[BC]["dataset_config"],
        "data_files": "/etc/passwd",
    }
    err = assert_refused(srv, "validation_dataset_config", json=cfg)
    assert err["param"] == f"{BC}.validation_dataset_config.data_files"


def test_a_job_with_a_validation_share_reports_valid_loss(srv):
    cfg = job_config(srv.storage)
    cfg[BC]["dataset_config"]["validation_split"] = 0.25
    cfg[BC]["training_config"].update(num_train_epochs=1, auto_find_batch_size=False)
    cfg[BC]["output_dir"] = "tiny/adapters/validated"
    r = srv.client.post("/v1/fine-tuning/jobs", json=cfg)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    body = srv.wait_status(job_id, {"completed", "failed"}, timeout=240)
    st = body["status"]
    assert st["status"] == "completed", st.get("error")
    progress = st["progress"]
    assert progress["valid_loss"] > 0 and 0 <= progress["valid_mean_token_accuracy"] <= 1
    assert 0 <= progress["train_mean_token_accuracy"] <= 1
    events = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    metrics = [e for e in events if e["type"] == "metric"]
    # 18 training rows, 4 per step: 5 steps, evaluated at each (eval_steps 0.1 of 5 -> 1)
    assert [e["data"]["step"] for e in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["data"]["valid_loss"] == progress["valid_loss"]
    assert any("best evaluation" in e["message"] for e in events)
