"""A save that dies part-way never leaves a complete-looking model, and the next save recovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sllm.store import has_model, layout, list_models, model_checksum, save_model, verify_model

# Runs save_model in a child and SIGKILLs itself when the progress callback reports `stage`.
_CRASHER = """
import os, signal, sys
from pathlib import Path
from sllm.store import save_model

storage, src, stage = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def progress(msg):
    print(msg, flush=True)
    if msg.startswith(stage):
        os.kill(os.getpid(), signal.SIGKILL)

save_model("org/tiny", storage, local_model_path=src, progress=progress)
print("finished", flush=True)
"""


def _crash_save(storage: Path, src: Path, stage: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(storage), str(src), stage],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert "finished" not in out.stdout
    return out


def _scratch(storage: Path) -> list[str]:
    root = storage / "transformers"
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_sigkill_mid_save_leaves_no_model_and_next_save_cleans_up(tmp_path, tiny_model_src):
    storage = tmp_path / "store"
    # Killed after weights and manifest were written, just before the rename into place.
    _crash_save(storage, tiny_model_src, "moving into place")

    assert not has_model(storage, "org/tiny")
    assert not (storage / "transformers" / "org").exists()
    assert list_models(storage) == []
    leftovers = _scratch(storage)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")
    assert (storage / "transformers" / leftovers[0] / "model.safetensors").is_file()
    assert (storage / "transformers" / leftovers[0] / "sllm_manifest.json").is_file()

    save_model("org/tiny", storage, local_model_path=tiny_model_src)
    assert has_model(storage, "org/tiny") and verify_model(storage, "org/tiny")
    assert _scratch(storage) == []  # the dead process's scratch dir was removed


def test_sigkill_during_a_resave_keeps_the_old_model(tmp_path, tiny_model_src):
    storage = tmp_path / "store"
    save_model("org/tiny", storage, local_model_path=tiny_model_src)
    before = model_checksum(storage, "org/tiny")
    _crash_save(storage, tiny_model_src, "hashing files")  # new weights written, no manifest
    assert model_checksum(storage, "org/tiny") == before
    assert verify_model(storage, "org/tiny")
    assert [m["name"] for m in list_models(storage)] == ["org/tiny"]


def test_failure_writing_the_manifest_leaves_nothing(tmp_path, tiny_model_src, monkeypatch):
    storage = tmp_path / "store"

    def boom(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(layout, "write_json_durably", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model("org/tiny", storage, local_model_path=tiny_model_src)
    assert not has_model(storage, "org/tiny")
    assert not (storage / "transformers" / "org").exists()
    assert _scratch(storage) == []  # our own scratch dir is removed on the way out

    monkeypatch.undo()
    save_model("org/tiny", storage, local_model_path=tiny_model_src)
    assert verify_model(storage, "org/tiny")


def test_failed_swap_puts_the_old_model_back(tmp_path, tiny_model_src, monkeypatch):
    from sllm.testing import make_tiny_model_dir

    storage = tmp_path / "store"
    save_model("org/tiny", storage, local_model_path=tiny_model_src)
    before = model_checksum(storage, "org/tiny")
    other = make_tiny_model_dir(tmp_path / "other", seed=3)

    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".tmp-") and Path(dst).name == "tiny":
            raise OSError("rename failed")  # after the old copy was moved aside
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_model("org/tiny", storage, local_model_path=other)
    monkeypatch.undo()
    assert any(dst.startswith(".old-") for _, dst in calls)
    assert model_checksum(storage, "org/tiny") == before
    assert verify_model(storage, "org/tiny")
    assert _scratch(storage) == []


def test_stale_scratch_dirs_are_cleaned_only_when_their_owner_is_gone(tmp_path):
    root = tmp_path / "transformers"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = layout._host()
    mine = root / f".tmp-{os.getpid()}-aaaa-{host}"
    gone = root / f".tmp-{dead.pid}-bbbb-{host}"
    gone_old = root / f".old-{dead.pid}-cccc-{host}"
    elsewhere = root / ".tmp-1-dddd-otherhost"  # another container: only removed when old
    for d in (mine, gone, gone_old, elsewhere):
        d.mkdir()
    removed = layout.clean_stale(root)
    assert sorted(removed) == sorted([gone, gone_old])
    assert mine.exists() and elsewhere.exists()
    old = 2 * layout.STALE_AFTER_S
    os.utime(elsewhere, (os.path.getatime(elsewhere) - old, os.path.getmtime(elsewhere) - old))
    assert layout.clean_stale(root) == [elsewhere]
