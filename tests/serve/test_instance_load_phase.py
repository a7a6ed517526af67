"""An instance reports how fast its base model reached the device, beside the load's seconds."""

from __future__ import annotations

import argparse
import shutil

from sllm.serve.instance import load_engine


def test_load_engine_reports_load_gb_per_s(tmp_path, monkeypatch):
    from sllm.testing import make_tiny_model_dir

    src = make_tiny_model_dir(tmp_path / "src")
    shutil.copytree(src, tmp_path / "storage" / "transformers" / "m")
    monkeypatch.setenv("SLLM_NUM_CPUS", "1")
    args = argparse.Namespace(
        storage=str(tmp_path / "storage"), model="m", device="cpu", dtype="auto", max_batch_size=2
    )
    phases: dict[str, float] = {}
    engine = load_engine(args, phases)
    try:
        assert phases["model_load_s"] > 0
        weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        # the rate is the weights over (part of) the load's time: at least what the phase shows
        assert phases["model_load_gb_per_s"] >= weights / phases["model_load_s"] / 1e9 * 0.99
    finally:
        engine.close()
