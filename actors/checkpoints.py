"""A training run's directory, storage_path/name, as this project uses it: one checkpoint_<step>
directory per checkpoint, a `.complete` marker once every rank has written its part, resume from
the newest complete checkpoint, and no more than `keep` of them left on disk.

The marker holds a manifest, the size and SHA-256 of every file of the checkpoint, so a checkpoint
truncated or altered on disk after it was written is recognised: resume names it and falls back to
the newest one that still verifies (`newest_valid`). Every rank reads the same files and so decides
the same.

Ray Train's controller remembers the last checkpoint *it registered*, which after a hard worker
failure can be one older than the newest complete one; and its own retention leaves behind any
directory it never registered. So the workers pick the checkpoint and prune the directory
themselves, and Ray's retention stays off (CheckpointConfig(num_to_keep=None)). Ray Train refuses to
start a run whose snapshot names a checkpoint that no longer exists, so the launcher removes Ray's
snapshot before resuming: which checkpoint to resume from is decided here, not there.
Paths may be local or storage URIs (s3://, gs://, ...), through pyarrow's filesystems, as Ray's are.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

MARKER = ".complete"
RUN_FILE = "sweetspot_run.json"  # the config the run's checkpoints were made under
LOG_FILE = "train_log.jsonl"  # rank 0's per-step metrics (one run's rows only)
START_FILE = "worker_starts.jsonl"  # a line per start of the worker group: the step it resumed at (the driver prints it)
MODEL_DIR = "model"  # the final model, in Hugging Face format
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it registered
_NAME = re.compile(r"^checkpoint_(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


@dataclass
class RunDir:
    """storage_path/name of one training run."""

    storage_path: str
    name: str

    def __post_init__(self):
        import pyarrow.fs as pafs

        if "://" in self.storage_path:
            self.fs, base = pafs.FileSystem.from_uri(self.storage_path)
        else:
            self.fs, base = pafs.LocalFileSystem(), self.storage_path
        self.path = f"{base.rstrip('/')}/{self.name}"

    def _info(self, path: str):
        return self.fs.get_file_info(path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info(self.path).type != pafs.FileType.NotFound

    def checkpoints(self) -> list[tuple[int, str, bool]]:
        """(step, directory, complete) for every checkpoint directory, oldest first."""
        import pyarrow.fs as pafs

        if not self.exists():
            return []
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.path)):
            m = _NAME.match(info.base_name)
            if info.type == pafs.FileType.Directory and m:
                complete = self._info(f"{info.path}/{MARKER}").type == pafs.FileType.File
                out.append((int(m.group(1)), info.path, complete))
        return sorted(out)

    def newest_complete(self) -> tuple[int, str] | None:
        done = [(s, p) for s, p, c in self.checkpoints() if c]
        return done[-1] if done else None

    def newest_valid(self) -> tuple[tuple[int, str] | None, list[tuple[str, str]]]:
        """The newest complete checkpoint whose files match its manifest, and the (path, problem) of
        every newer complete one that does not."""
        bad = []
        for step, path, complete in reversed(self.checkpoints()):
            if not complete:
                continue
            problem = self.verify(path)
            if problem is None:
                return (step, path), bad
            bad.append((path, problem))
        return None, bad

    def _files(self, path: str) -> dict[str, int]:
        """{relative path: size} of every file under a checkpoint directory but the marker."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return {i.path[len(path) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File and i.base_name != MARKER}

    def _sha256(self, path: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def manifest(self, path: str) -> dict[str, list]:
        return {name: [size, self._sha256(f"{path}/{name}")] for name, size in sorted(self._files(path).items())}

    def verify(self, path: str) -> str | None:
        """None when the checkpoint's files match its manifest, else what is wrong (a marker written
        before manifests existed is trusted)."""
        try:
            with self.fs.open_input_stream(f"{path}/{MARKER}") as f:
                raw = f.read().decode()
            if not raw.strip():
                return None
            expected = json.loads(raw)["files"]
            sizes = self._files(path)
            for name, (size, digest) in expected.items():
                if name not in sizes:
                    return f"{name} is missing"
                if sizes[name] != size:
                    return f"{name} has {sizes[name]} bytes, the manifest says {size}"
                if self._sha256(f"{path}/{name}") != digest:
                    return f"{name} does not match its SHA-256 in the manifest"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable ({type(e).__name__}: {e})"
        return None

    def mark_complete(self, step: int) -> None:
        """Write the marker, with the manifest of every file the ranks have written (call after all have)."""
        path = f"{self.path}/{checkpoint_name(step)}"
        text = json.dumps({"step": step, "files": self.manifest(path)})
        with self.fs.open_output_stream(f"{path}/{MARKER}") as f:
            f.write(text.encode())

    def prune(self, keep: int) -> list[str]:
        """Delete every checkpoint but the newest `keep` complete ones, except directories newer than
        those (a checkpoint other ranks may still be writing); returns what was deleted."""
        ckpts = self.checkpoints()
        kept = [p for _, p, c in ckpts if c][-keep:]
        if not kept:
            return []
        newest = max(s for s, p, _ in ckpts if p in kept)
        doomed = [p for s, p, _ in ckpts if p not in kept and s < newest]
        for p in doomed:
            self.fs.delete_dir(p)
        return doomed

    def remove_incomplete(self) -> list[str]:
        """Delete checkpoint directories without the marker (call only while no rank is writing)."""
        doomed = [p for _, p, c in self.checkpoints() if not c]
        for p in doomed:
            self.fs.delete_dir(p)
        return doomed

    def remove_file(self, filename: str) -> None:
        import pyarrow.fs as pafs

        if self._info(f"{self.path}/{filename}").type == pafs.FileType.File:
            self.fs.delete_file(f"{self.path}/{filename}")

    def read_text(self, filename: str) -> str | None:
        import pyarrow.fs as pafs

        path = f"{self.path}/{filename}"
        if self._info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, filename: str, text: str) -> None:
        self.fs.create_dir(self.path, recursive=True)
        tmp = f"{self.path}/.{filename}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, f"{self.path}/{filename}")

    def upload_dir(self, local: str, name: str) -> None:
        """Copy a local directory to <run>/<name>, replacing what was there (as a whole, via a
        temporary name, where the filesystem can move directories)."""
        import pyarrow.fs as pafs

        tmp, target = f"{self.path}/.{name}.tmp", f"{self.path}/{name}"
        if self._info(tmp).type != pafs.FileType.NotFound:
            self.fs.delete_dir(tmp)
        self.fs.create_dir(tmp, recursive=True)
        pafs.copy_files(local, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        if self._info(target).type != pafs.FileType.NotFound:
            self.fs.delete_dir(target)
        self.fs.move(tmp, target)

    def has_dir(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(f"{self.path}/{name}").type == pafs.FileType.Directory

    def download_dir(self, name: str, local: str) -> bool:
        """Copy <run>/<name> to the local directory `local` (which must not exist); False if absent."""
        import pyarrow.fs as pafs

        if self._info(f"{self.path}/{name}").type != pafs.FileType.Directory:
            return False
        pafs.LocalFileSystem().create_dir(local, recursive=True)
        pafs.copy_files(f"{self.path}/{name}", local, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return True

    def remove(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def local_copy(self, path: str):
        """A context manager giving a local directory with the checkpoint's files."""
        from ray.train import Checkpoint

        return Checkpoint(path=path, filesystem=self.fs).as_directory()
