"""Where a job meets the cluster: start or join Ray with quiet logs, and carry small local
directories (the embedded task's model, a trained reward model) to actors and workers on other nodes
through the object store, so a job submitted to a multi-node cluster needs no shared filesystem.
"""
from __future__ import annotations

import io
import logging
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sweetspot.cluster")

# Directories larger than this are passed by path: they must then be visible to every node
# (shared storage), as a hub name always is.
SHIP_LIMIT_BYTES = 512 * 2**20


def init_ray(address: str | None = None, log_to_driver: bool = False, connect_timeout_s: float = 30.0) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else the local cluster `ray start` recorded
    if it still answers, else start a Ray here with node address 127.0.0.1 (Ray 2.60's own servers
    still listen on every interface: docs/security.md). True if this call started or joined it (the
    caller then shuts it down). A recorded
    cluster that is gone is said so and replaced by a new one; an address where nothing answers within
    connect_timeout_s is a ConnectionError naming it (Ray itself would retry without end). One line
    says which cluster the job is on. Ray's own warnings are kept to errors in every process of the
    job; the job's prints still reach the console when log_to_driver is set."""
    import os

    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None:
        from ray._private.utils import read_ray_address

        recorded = read_ray_address(None)  # what the last `ray start` on this machine wrote
        if recorded and not gcs_answers(recorded, min(connect_timeout_s, 5.0)):
            log.warning("the local Ray cluster recorded at %s is gone (stopped, or its machine restarted); starting a "
                        "new one here", recorded)
            recorded = None
        target = recorded or "local"
    elif target not in ("local", "auto") and "://" not in target and not gcs_answers(target, connect_timeout_s):
        raise ConnectionError(f"ray_address / RAY_ADDRESS: no Ray cluster answers at {target} within "
                              f"{connect_timeout_s:g} s (is it running? `ray status --address {target}`)")
    extra = {"_node_ip_address": "127.0.0.1"} if target == "local" else {}
    if target == "local":  # inherited by the Ray started here: Train's controller notices a finished or
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # failed step in 0.25 s, not 2 s
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    ray.init(address=target, include_dashboard=False, log_to_driver=log_to_driver, logging_level="ERROR",
             logging_config=ray.LoggingConfig(log_level="ERROR"), **extra)
    if handlers:  # Ray's logging_config also sets this process's root logger to ERROR: the job's own log lines stay
        root.handlers[:] = handlers
        root.setLevel(level)
    cpus = ray.cluster_resources().get("CPU", 0)
    if target == "local":
        print(f"  started a local Ray ({cpus:g} CPUs, node address 127.0.0.1); it stops with this job", flush=True)
    else:
        print(f"  joined the Ray cluster at {ray.get_runtime_context().gcs_address} "
              f"({len([n for n in ray.nodes() if n['Alive']])} nodes, {cpus:g} CPUs)", flush=True)
    return True


def gcs_answers(address: str, timeout_s: float) -> bool:
    """Whether something accepts a TCP connection at `address` ("host:port") within timeout_s."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def reserved_device(device: str, num_gpus: float | None = None) -> str:
    """The device an actor should use for `device`: "auto" is the CPU when the actor reserved no GPU.
    Ray hides no GPU from an actor without a GPU reservation (CUDA_VISIBLE_DEVICES is left alone), so
    "auto" would pick one Ray gave to another actor. num_gpus: the actor's reservation when known (a
    pool creating it); None: ask Ray from inside the actor (a Serve replica, whose options come from
    the config file). Outside Ray, and for a device named explicitly, `device` is kept."""
    if device != "auto":
        return device
    if num_gpus is None:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return device
        num_gpus = len(ray.get_gpu_ids())
    return device if num_gpus else "cpu"


@dataclass(frozen=True)
class ShippedDir:
    """A local directory packed into the object store; `local_dir` unpacks it once per node."""

    name: str
    digest: str
    ref: object  # ray.ObjectRef of the tar archive's bytes


def free_ports(k: int) -> list[int]:
    """k distinct free TCP ports on loopback (held together while chosen, so they differ)."""
    import socket

    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ship_dir(path: str) -> str | ShippedDir:
    """A ShippedDir for a local directory under SHIP_LIMIT_BYTES; anything else (a hub name, a large
    directory) is returned as it is."""
    import ray

    from align.runtime.runstate import path_fingerprint

    p = Path(path)
    if not p.is_dir():
        return path
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if size > SHIP_LIMIT_BYTES:
        log.info("%s is %.1f GB: passed by path, so it must be on storage every node can read", path, size / 2**30)
        return path
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(p), arcname=p.name)
    return ShippedDir(p.name, path_fingerprint(p), ray.put(buf.getvalue()))


def local_dir(source: str | ShippedDir) -> str:
    """The directory on this node: a path as it is, or a ShippedDir unpacked (once per node and
    content digest) under the temporary directory, via a temporary name and a rename."""
    if not isinstance(source, ShippedDir):
        return source
    import ray

    target = Path(tempfile.gettempdir()) / "sweetspot_shipped" / source.digest
    if not (target / source.name).is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        with tarfile.open(fileobj=io.BytesIO(ray.get(source.ref)), mode="r") as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(target)
        except OSError:  # another process on this node unpacked it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target / source.name)


