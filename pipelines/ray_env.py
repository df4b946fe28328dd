"""Starting or joining Ray the way every pipeline does."""

from __future__ import annotations

import os
import socket

# Keep an embedded local Ray on loopback and lean (set before ray is imported anywhere).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# torch's CPU allocator backs its large tensors (>= 2 MB: logits over the vocabulary, a segment's
# activations) with transparent huge pages, read when torch is first imported: without them every
# fresh vocabulary-sized tensor costs a page fault per 4 KiB, a large part of a CPU training step.
TORCH_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local head, a serve proxy, a dashboard)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_torch_env() -> None:
    """Set TORCH_ENV for this process and the Ray workers it starts; call it before torch is imported."""
    for key, value in TORCH_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True):
    """Join the cluster at `address` (or RAY_ADDRESS); else start an embedded local Ray on 127.0.0.1."""
    for key, value in {**LOCAL_ENV, **TORCH_ENV}.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    return ray
