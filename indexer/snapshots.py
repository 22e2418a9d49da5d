"""Crash-safe snapshots of the HNSW index, so a restart replays only what changed after one.

hnswlib's `save_index` overwrites a file in place: a crash midway leaves a torn index that
hnswlib may load without complaint. So a snapshot is published in steps:

1. on the store's thread, `save_index` into `snapshot-<seq>.hnsw.tmp` (a copy from memory
   into the page cache; searches wait only for that);
2. off that thread: sha256 of the file, fsync; a manifest (sequence covered, checksum,
   size) into `snapshot-<seq>.json.tmp`, fsync; rename the index, then the manifest, into
   place; fsync the folder. The manifest's rename is the commit point: an index file
   without its manifest is debris from a crash and is swept away;
3. the newest `keep` snapshots stay; older ones are deleted.

Loading walks the manifests newest first and takes the first whose file has the recorded
size and checksum and that hnswlib loads; a torn or corrupt one is deleted and the next
older one tried. With none left the store rebuilds the index from SQLite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FOLDER = "snapshots"
_FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What a published snapshot covers: every write up to `sequence`, and nothing after."""

    sequence: int
    sha256: str
    bytes: int
    store_id: int
    dimension: int
    #: Labels in the file not marked deleted.
    live: int
    #: Unix time the snapshot was taken.
    created: float
    format: int = _FORMAT


@dataclass(frozen=True)
class Staged:
    """A snapshot written by `save_index` but not yet published."""

    path: Path
    manifest: Manifest


class SnapshotDir:
    """The snapshots of one shard, newest first."""

    def __init__(self, folder: Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def stage(self, sequence: int, store_id: int, dimension: int, live: int) -> Staged:
        """Where to save the index covering `sequence`, and its manifest-to-be (no checksum yet)."""
        path = self.folder / f"{_stem(sequence)}.hnsw.tmp"
        return Staged(path, Manifest(sequence, "", 0, store_id, dimension, live, time.time()))

    def publish(self, staged: Staged) -> Manifest:
        """Checksums, syncs and renames a staged snapshot into place, then prunes old ones.

        Safe to run on any thread while the store goes on, as long as one runs at a time.
        """
        path, manifest = staged.path, staged.manifest
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as file:
            while block := file.read(_CHUNK):
                digest.update(block)
                size += len(block)
            os.fsync(file.fileno())
        manifest = Manifest(**{**asdict(manifest), "sha256": digest.hexdigest(), "bytes": size})
        stem = _stem(manifest.sequence)
        manifest_tmp = self.folder / f"{stem}.json.tmp"
        with open(manifest_tmp, "w") as file:
            json.dump(asdict(manifest), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(path, self.folder / f"{stem}.hnsw")
        os.replace(manifest_tmp, self.folder / f"{stem}.json")
        self._sync_folder()
        for old in self.manifests()[self.keep :]:
            self.discard(old)
        return manifest

    def manifests(self) -> list[Manifest]:
        """Published snapshots, newest first; an unreadable manifest is deleted with its snapshot."""
        found = []
        for path in self.folder.glob("snapshot-*.json"):
            try:
                manifest = Manifest(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("snapshot manifest %s unreadable (%s): deleting it", path.name, exc)
                self._remove(path.stem)
                continue
            if manifest.format == _FORMAT:
                found.append(manifest)
        return sorted(found, key=lambda m: m.sequence, reverse=True)

    def index_path(self, manifest: Manifest) -> Path:
        return self.folder / f"{_stem(manifest.sequence)}.hnsw"

    def verify(self, manifest: Manifest) -> str | None:
        """Why the snapshot's file cannot be trusted, or None when it is whole."""
        path = self.index_path(manifest)
        try:
            size = path.stat().st_size
            if size != manifest.bytes:
                return f"{path.name} holds {size} bytes, its manifest says {manifest.bytes}"
            digest = hashlib.sha256()
            with open(path, "rb") as file:
                while block := file.read(_CHUNK):
                    digest.update(block)
        except OSError as exc:
            return f"{path.name}: {exc}"
        if digest.hexdigest() != manifest.sha256:
            return f"{path.name} does not match its checksum"
        return None

    def discard(self, manifest: Manifest) -> None:
        self._remove(_stem(manifest.sequence))

    def sweep(self) -> None:
        """Deletes what a crash can leave: staged files and index files without a manifest."""
        for path in self.folder.iterdir():
            if path.name.endswith(".tmp") or (path.suffix == ".hnsw" and not path.with_suffix(".json").exists()):
                path.unlink(missing_ok=True)

    def _remove(self, stem: str) -> None:
        # The manifest goes first: an index without one is ignored, never the other way round.
        (self.folder / f"{stem}.json").unlink(missing_ok=True)
        (self.folder / f"{stem}.hnsw").unlink(missing_ok=True)

    def _sync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _stem(sequence: int) -> str:
    return f"snapshot-{sequence:020d}"
