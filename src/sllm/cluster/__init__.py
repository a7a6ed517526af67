"""Running sllm on a Ray cluster: node-aware capacity, job runners and their launcher.

Nothing here is imported unless the server is started with `--ray-address`.
"""
