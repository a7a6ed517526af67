"""`ray start` for tests: a multi-node Ray cluster on one machine that never leaves loopback.

Ray 2.60 on Linux resolves `--node-ip-address=127.0.0.1` to the machine's outward address and
binds its servers to every interface. With `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` it keeps
127.0.0.1 and binds only there, but then `ray start --address` refuses to add a second node
("multi-node clusters are not supported on Windows and OSX"). This wrapper keeps the variable at
0 for every process the node starts and lifts only that one refusal, in this process.

    python ray_loopback.py start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...
"""

import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray._private.ray_constants as ray_constants  # noqa: E402
import ray._private.services as ray_services  # noqa: E402

ray_constants.ENABLE_RAY_CLUSTER = True  # lifts the refusal; the node's processes keep 0
ray_services.resolve_ip_for_localhost = lambda host: host  # and --node-ip-address stays as given

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
