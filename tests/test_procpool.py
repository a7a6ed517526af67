"""The warm process pool (`sllm.procpool`): real idle children, real launches of the pool's probe,
then a real server whose job worker and instance come from the pool and leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from sllm.jobs.launcher import kill_stale_worker, worker_env
from sllm.jobs.resources import Allocation
from sllm.procpool import WarmPool, start_time
from tests.conftest import TINY, job_config, pid_alive, stored_server, wait_dead, wait_for


def probe(pool: WarmPool, tmp: Path, name: str, alloc: Allocation, **extra_env) -> dict:
    """Launch the pool's probe with `alloc`'s environment; what the process saw."""
    out = tmp / f"{name}.json"
    env = {**worker_env(alloc), "SLLM_PARENT_PID": str(os.getpid()), **extra_env}
    proc = pool.launch("sllm.procpool", ["probe", str(out)], env=env, log_path=tmp / f"{name}.log")
    assert proc.wait(timeout=120) == 0, (tmp / f"{name}.log").read_text()
    return {**json.loads(out.read_text()), "launched_pid": proc.pid}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pool = WarmPool(2, tmp_path_factory.mktemp("pool") / "warm-pool.log").start()
    wait_for(lambda: pool.warm_count() == 2, 240, "two warm children")
    yield pool
    pool.stop()


def test_takers_get_their_own_devices_threads_and_group(pool, tmp_path):
    idle = set(pool.idle_pids())
    gpu = probe(pool, tmp_path, "gpu", Allocation("job:a", 1, (1,)))
    cpu = probe(pool, tmp_path, "cpu", Allocation("instance:b", 2, ()))
    for got in (gpu, cpu):
        assert got["pooled"] and got["pid"] in idle  # warm children, not fresh processes
        assert got["pid"] == got["pgid"] == got["sid"]  # its own session and process group
        assert got["ppid"] == os.getpid()  # dies with its parent (the server)
        assert not got["cuda_initialized"] and not got["idle_cuda_initialized"]
        assert got["process_wait_s"] < 5
    assert gpu["pid"] != cpu["pid"]
    assert (gpu["cuda_visible_devices"], gpu["omp_num_threads"], gpu["torch_threads"]) == (
        "1",
        "1",
        1,
    )
    assert (cpu["cuda_visible_devices"], cpu["omp_num_threads"], cpu["torch_threads"]) == (
        "",
        "2",
        2,
    )
    # refilled in the background: two new warm children
    wait_for(lambda: pool.warm_count() == 2, 240, "the refill")
    assert not idle & set(pool.idle_pids())


def test_a_launch_with_a_different_environment_gets_a_fresh_process(pool, tmp_path):
    wait_for(lambda: pool.warm_count() == 2, 240, "warm children")
    idle = set(pool.idle_pids())
    got = probe(pool, tmp_path, "fresh", Allocation("job:c", 1, ()), HF_HOME=str(tmp_path))
    assert not got["pooled"] and got["pid"] not in idle
    assert got["torch_threads"] == 1 and got["pid"] == got["pgid"]
    assert set(pool.idle_pids()) == idle  # the warm ones stay for launches they fit


def test_a_dead_idle_child_is_replaced_and_launches_still_run(pool, tmp_path):
    wait_for(lambda: pool.warm_count() == 2, 240, "warm children")
    failures = pool.failures
    victim, other = pool.idle_pids()
    os.kill(victim, signal.SIGKILL)
    got = probe(pool, tmp_path, "after-kill", Allocation("job:d", 1, ()))  # right away
    assert got["pid"] != victim and got["torch_threads"] == 1
    wait_for(lambda: victim not in pool.idle_pids(), 30, "the dead child to leave the pool")
    wait_for(lambda: len(pool.idle_pids()) == 2, 240, "the pool to refill")
    assert victim not in pool.idle_pids()
    # whether the launch found the dead one first or not, it is counted once at most
    assert pool.failures <= failures + 1


def owned_launch(pool: WarmPool, tmp: Path, name: str, owner: int, started: str | None, **kw):
    """A pooled probe that lives 300 s unless its owner (not its parent) ends first."""
    env = {
        **worker_env(Allocation(f"job:{name}", 1, ())),
        "SLLM_PARENT_PID": str(os.getpid()),
        "SLLM_OWNER_PID": str(owner),
        "SLLM_OWNER_STARTED": started or "",
    }
    out = tmp / f"{name}.json"
    proc = pool.take(
        "sllm.procpool", ["probe", str(out), "300"], env=env, log_path=tmp / f"{name}.log", **kw
    )
    assert proc is not None, "a warm child fits this launch"
    return proc, out


def test_a_pooled_process_dies_with_its_owner_not_only_its_parent(pool, tmp_path):
    """On a Ray node the pool (the parent) is one actor and the owner another: the taken child
    must end when its owner does, as a fresh child of the owner would (PR_SET_PDEATHSIG)."""
    wait_for(lambda: pool.warm_count() >= 1, 240, "a warm child")
    owner = subprocess.Popen(["sleep", "300"])
    try:
        proc, out = owned_launch(
            pool, tmp_path, "owned", owner.pid, start_time(owner.pid), stdin="the job spec\n"
        )
        got = json.loads(wait_for(lambda: out.is_file() and out.read_text(), 60, "the probe"))
        assert got["pooled"] and got["stdin"] == "the job spec\n"  # stdin handed over too
        assert got["ppid"] == os.getpid() != owner.pid
        time.sleep(0.5)
        assert proc.poll() is None  # lives while its owner does
    finally:
        owner.kill()
        owner.wait()
    assert proc.wait(timeout=10) == -signal.SIGKILL  # the whole group, as a death signal would


def test_a_pooled_process_whose_owner_is_already_gone_does_not_run(pool, tmp_path):
    wait_for(lambda: pool.warm_count() >= 1, 240, "a warm child")
    owner = subprocess.Popen(["sleep", "300"])
    started = start_time(owner.pid)
    owner.kill()
    owner.wait()  # gone before the launch: the pid may even be reused by then
    proc, out = owned_launch(pool, tmp_path, "orphan", owner.pid, started)
    assert proc.wait(timeout=30) == 1 and not out.exists()


def test_stop_leaves_no_process_behind(tmp_path):
    pool = WarmPool(2, tmp_path / "warm-pool.log").start()
    wait_for(lambda: len(pool.idle_pids()) == 2, 240, "two children")
    pids = pool.idle_pids()
    pool.stop()
    for pid in pids:
        wait_dead(pid, 10)
    me = psutil.Process()
    assert not [c for c in me.children(recursive=True) if c.pid in pids]


def test_size_zero_spawns_nothing_and_launches_fresh(tmp_path):
    pool = WarmPool(0, tmp_path / "warm-pool.log").start()
    try:
        assert pool.idle_pids() == []
        got = probe(pool, tmp_path, "off", Allocation("job:e", 1, ()))
        assert not got["pooled"] and got["pid"] == got["pgid"]
    finally:
        pool.stop()


def test_kill_stale_worker_knows_a_pooled_worker_by_its_log(tmp_path):
    """After a server crash, a worker running in a pooled process (command line
    `python -m sllm.procpool`) is found by its output: the job's `worker.log`."""
    import subprocess
    import sys

    log = tmp_path / "job-abc" / "worker.log"
    log.parent.mkdir()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sllm.procpool"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        wait_for(lambda: b"sllm.procpool" in cmdline.read_bytes(), 30, "the exec")
        assert not kill_stale_worker(proc.pid, "job-other")
        assert proc.poll() is None
        assert kill_stale_worker(proc.pid, "job-abc")
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("bad", ["-1", "65", "two"])
def test_start_refuses_a_bad_pool_size_before_anything_starts(tmp_path, bad):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sllm.cli.main", "start", "--storage-path", str(tmp_path)]
    out = subprocess.run([*cmd, "--warm-pool", bad], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--warm-pool" in out.stderr
    assert not list(tmp_path.iterdir())  # no store, no lock, no server


# --- through the server --------------------------------------------------------------------


def pool_children(server) -> set[int]:
    """The server's idle warm children (command line `python -m sllm.procpool`)."""
    out = set()
    for child in psutil.Process(server.proc.pid).children():
        try:
            if "sllm.procpool" in child.cmdline():
                out.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.mark.slow
def test_server_job_and_instance_run_in_warm_processes(tmp_path, tiny_model_src):
    srv = stored_server(tmp_path / "store", tiny_model_src, "--warm-pool", "2", "--num-cpus", "2")
    try:
        warm = wait_for(lambda: len(pool_children(srv)) == 2 and pool_children(srv), 240, "pool")
        cfg = job_config(srv.storage, training_config={"num_train_epochs": 1, "max_steps": 2})
        r = srv.client.post("/v1/fine_tuning/jobs", json=cfg)
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        done = srv.wait_status(job_id, {"completed", "failed"}, timeout=180)
        assert done["status"]["status"] == "completed", done
        events = srv.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
        (started,) = [e for e in events if "Worker started" in e["message"]]
        assert started["data"]["pooled"] and started["data"]["pid"] in warm
        assert started["data"]["torch_threads"] == 1  # the job's num_cpus
        assert started["data"]["cuda_visible_devices"] == ""
        assert not pid_alive(started["data"]["pid"])
        assert not kill_stale_worker(started["data"]["pid"], job_id)  # gone: nothing to kill

        warm = wait_for(lambda: len(pool_children(srv)) == 2 and pool_children(srv), 240, "refill")
        srv.cli("deploy", "--model", TINY, "--backend", "transformers")
        r = srv.client.post(
            "/v1/chat/completions",
            json={"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
        (inst,) = srv.client.get(f"/v1/deployments/{TINY}").json()["instances"]
        assert inst["pid"] in warm
        phases = inst["cold_start_phases"]
        assert set(phases) >= {"process_s", "model_load_s", "first_forward_s", "adapters_s"}
        assert 0 <= phases["process_s"] < 5
        everything = warm | {inst["pid"]} | pool_children(srv)
    finally:
        srv.stop()
    for pid in everything:
        wait_dead(pid, 15)
