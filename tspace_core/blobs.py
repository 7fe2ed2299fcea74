"""Content-addressed blob store (by SHA-256) with resumable, verified uploads."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tspace_core.errors import BlobError
from tspace_core.fsio import CHUNK_BYTES, fsync_dir, sha256_file

_SHA256 = re.compile(r"[0-9a-f]{64}")
_UPLOAD_KEY = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class CorruptBlob(BlobError):
    """A blob's bytes on disk no longer hash to its name."""

    def __init__(self, sha256: str, actual: str) -> None:
        super().__init__(
            f"blob {sha256[:12]} is corrupt on disk: its content hashes to {actual[:12]}"
        )
        self.sha256, self.actual = sha256, actual


class BlobStore:
    """Blobs at `root/objects/<sha[:2]>/<sha>`; partial uploads at `root/uploads/<key>.part`.

    An object only ever appears by an atomic rename of a fully written, fsynced and verified
    file, so a reader sees a whole blob or none. One process should own a store; within it,
    appends and commits are serialised by a lock.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.uploads = self.root / "uploads"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Upload key -> (SHA-256 of its bytes so far, how many): a finished upload is verified
        # without reading it back.
        self._digests: dict[str, tuple[Any, int]] = {}

    # -- objects ------------------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where the blob named `sha256` lives (validated, so a name never escapes the store)."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise BlobError(f"blob name {sha256!r} is not a SHA-256 digest (64 lowercase hex)")
        return self.objects / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self._existing(sha256).stat().st_size

    def put_bytes(self, data: bytes) -> str:
        """Store `data`; return its digest. Storing the same bytes twice is a no-op."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            self._commit_temp(self._write_temp(lambda f: f.write(data)), sha256)
        return sha256

    def put_file(self, src: str | os.PathLike[str]) -> str:
        """Copy the file `src` into the store; return its digest (of the bytes actually copied)."""
        digest = hashlib.sha256()

        def copy(f: IO[bytes]) -> None:
            with open(src, "rb") as s:
                while chunk := s.read(CHUNK_BYTES):
                    digest.update(chunk)
                    f.write(chunk)

        tmp = self._write_temp(copy)
        return self._commit_temp(tmp, digest.hexdigest())

    def read_chunks(
        self, sha256: str, offset: int = 0, chunk_size: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The blob's bytes from `offset` on, in chunks (for streaming it over the wire)."""
        return _chunks(self._readable(sha256, offset, chunk_size), offset, chunk_size)

    def read_verified(
        self, sha256: str, offset: int = 0, chunk_size: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """As read_chunks, but the whole blob (the part before `offset` too) is hashed as it is
        read, and the last chunk is held back until the digest matches: on a mismatch
        CorruptBlob is raised instead, so a reader never receives a complete corrupt blob."""
        return _verified(self._readable(sha256, offset, chunk_size), sha256, offset, chunk_size)

    def verify(self, sha256: str) -> bool:
        """Whether the blob on disk still hashes to its name (False means on-disk corruption)."""
        return sha256_file(self._existing(sha256)) == sha256

    def open_verified(self, sha256: str) -> bytes:
        """The whole blob, checked against its name; BlobError if it is corrupt on disk."""
        data = self._existing(sha256).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CorruptBlob(sha256, actual)
        return data

    # -- resumable uploads --------------------------------------------------------------------

    def upload_offset(self, key: str) -> int:
        """Bytes already held for upload `key` (0 if none): where the sender should resume."""
        try:
            return self._part(key).stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, key: str, offset: int, data: bytes, max_size: int | None = None) -> int:
        """Append `data` at `offset`, which must be the bytes already held; return the new size.

        A wrong offset, or a total beyond `max_size`, raises BlobError and writes nothing.
        """
        part = self._part(key)
        with self._lock:
            held = self.upload_offset(key)
            if offset != held:
                raise BlobError(
                    f"upload {key!r} is at offset {held}, not {offset}; resume from {held}"
                )
            new_size = held + len(data)
            if max_size is not None and new_size > max_size:
                raise BlobError(
                    f"upload {key!r} would be {new_size} bytes; the limit is {max_size}"
                )
            digest = self._digest_at(key, part, held)
            with open(part, "ab") as f:
                f.write(data)
                f.flush()
            digest.update(data)
            self._digests[key] = (digest, new_size)
        return new_size

    def finish(self, key: str, sha256: str, size: int) -> Path:
        """Verify upload `key` against `sha256` and `size` and move it into the store.

        On a mismatch the partial file is deleted (the sender must start over). Finishing again,
        or finishing an upload of a blob the store already has, returns the existing object.
        """
        dest = self.path(sha256)
        part = self._part(key)
        tmp = self.uploads / f"{secrets.token_hex(16)}.tmp"
        with self._lock:
            # Claim the partial under the lock, then hash it outside: other uploads keep
            # flowing, and a late append to `key` starts a new partial instead of racing this one.
            try:
                os.replace(part, tmp)
            except FileNotFoundError:
                if dest.is_file() and dest.stat().st_size == size:
                    return dest
                raise BlobError(
                    f"no upload in progress for {key!r}; start it at offset 0"
                ) from None
            known = self._digests.pop(key, None)
        try:
            self._check_upload(key, tmp, sha256, size, known)
            _fsync_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._commit_temp(tmp, sha256)
        return dest

    def discard(self, key: str) -> None:
        with self._lock:
            self._part(key).unlink(missing_ok=True)
            self._digests.pop(key, None)

    def digests(self) -> list[str]:
        """The digests of every blob in the store."""
        return sorted(p.name for p in self.objects.glob("*/*") if _SHA256.fullmatch(p.name))

    def remove(self, sha256: str) -> None:
        """Delete a blob (no error if it is not there)."""
        with self._lock:
            self.path(sha256).unlink(missing_ok=True)

    def partial_keys(self) -> list[str]:
        """The keys of the partial uploads held now."""
        return sorted(p.name[: -len(".part")] for p in self.uploads.glob("*.part"))

    def remove_temporaries(self) -> int:
        """Delete temporary files a crash left behind (only safe while nothing writes here);
        returns how many there were."""
        removed = 0
        for tmp in self.uploads.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    # -- internals ----------------------------------------------------------------------------

    def _existing(self, sha256: str) -> Path:
        path = self.path(sha256)
        if not path.is_file():
            raise BlobError(f"no blob {sha256[:12]} in the store at {self.root}")
        return path

    def _readable(self, sha256: str, offset: int, chunk_size: int) -> Path:
        path = self._existing(sha256)
        size = path.stat().st_size
        if not isinstance(offset, int) or not 0 <= offset <= size:
            raise BlobError(f"offset {offset} is outside blob {sha256[:12]} of {size} bytes")
        if chunk_size < 1:
            raise BlobError(f"chunk_size must be >= 1, got {chunk_size}")
        return path

    def _part(self, key: str) -> Path:
        if not isinstance(key, str) or not _UPLOAD_KEY.fullmatch(key):
            raise BlobError(
                f"upload key {key!r} is not valid: use 1-200 characters from A-Z a-z 0-9 _ . -"
            )
        return self.uploads / f"{key}.part"

    def _digest_at(self, key: str, part: Path, held: int) -> Any:
        """The running SHA-256 of upload `key` over its first `held` bytes: the one kept since
        the last append, or, after a restart or a sweep, one made by reading them back once."""
        known = self._digests.get(key)
        if known is not None and known[1] == held:
            return known[0]
        digest = hashlib.sha256()
        if held:
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
        return digest

    def _check_upload(
        self, key: str, tmp: Path, sha256: str, size: int, known: tuple[Any, int] | None
    ) -> None:
        actual_size = tmp.stat().st_size
        if actual_size != size:
            raise BlobError(
                f"upload {key!r} is {actual_size} bytes, expected {size}; "
                "it was discarded, upload again from offset 0"
            )
        # Hashed while it arrived, as it was written; read back only when that hash is not of
        # exactly these bytes (an upload held across a restart hashes its prefix once, on its
        # next append).
        actual = known[0].hexdigest() if known is not None and known[1] == size else None
        actual = actual or sha256_file(tmp)
        if actual != sha256:
            raise BlobError(
                f"upload {key!r} has digest {actual[:12]}, expected {sha256[:12]}; "
                "it was discarded, upload again from offset 0"
            )

    def _write_temp(self, write: Callable[[IO[bytes]], object]) -> Path:
        # Temp names end in .tmp, upload names in .part: they can never collide.
        tmp = self.uploads / f"{secrets.token_hex(16)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _commit_temp(self, tmp: Path, sha256: str) -> str:
        try:
            with self._lock:
                self._move_into_place(tmp, self.path(sha256))
        finally:
            tmp.unlink(missing_ok=True)
        return sha256

    def _move_into_place(self, src: Path, dest: Path) -> None:
        """Rename a verified, fsynced file to its object path; drop it if the object exists
        and is intact (a corrupt one is replaced: the same bytes, received again, repair it)."""
        if dest.is_file() and sha256_file(dest) == dest.name:
            src.unlink()
            return
        dest.parent.mkdir(exist_ok=True)
        os.replace(src, dest)
        fsync_dir(dest.parent)
        fsync_dir(src.parent)


def _chunks(path: Path, offset: int, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(chunk_size):
            yield chunk


def _verified(path: Path, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
    digest = hashlib.sha256()
    held: bytes | None = None
    with open(path, "rb") as f:  # one handle: prefix and rest come from the same file
        remaining = offset  # the part the reader holds already must be intact too
        while remaining and (block := f.read(min(CHUNK_BYTES, remaining))):
            digest.update(block)
            remaining -= len(block)
        while chunk := f.read(chunk_size):
            digest.update(chunk)
            if held is not None:
                yield held
            held = chunk
    actual = digest.hexdigest()
    if actual != sha256:
        raise CorruptBlob(sha256, actual)
    if held is not None:
        yield held


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows cannot fsync a read-only handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
