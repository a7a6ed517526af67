"""Benchmarks of sllm against the obvious implementation; see bench/README.md."""
