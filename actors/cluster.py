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


def init_ray(address: str | None = None, log_to_driver: bool = False) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray; True if this call
    started or joined it (the caller then shuts it down). Ray's own warnings are kept to errors in
    every process of the job; the job's prints still reach the console when log_to_driver is set."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver, logging_level="ERROR",
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    return True


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


