"""Tests for tspace_core.blobs: content addressing, resumable uploads, refusals and corruption."""

import hashlib
import os
from pathlib import Path

import pytest

from tspace_core.blobs import BlobStore, CorruptBlob
from tspace_core.errors import BlobError

DATA = os.urandom(300_001)
SHA = hashlib.sha256(DATA).hexdigest()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_and_round_trips(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert (tmp_path / "objects").is_dir() and (tmp_path / "uploads").is_dir()
    assert not store.has(SHA)
    assert store.put_bytes(DATA) == SHA
    assert store.path(SHA) == tmp_path / "objects" / SHA[:2] / SHA
    assert store.has(SHA) and store.size(SHA) == len(DATA)
    assert store.open_verified(SHA) == DATA
    assert b"".join(store.read_chunks(SHA, chunk_size=4096)) == DATA
    assert store.verify(SHA)
    # Same bytes again: nothing new appears.
    assert store.put_bytes(DATA) == SHA
    assert files_under(tmp_path) == [f"objects/{SHA[:2]}/{SHA}"]


def test_put_file(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(DATA[:1000])
    store = BlobStore(tmp_path / "store")
    sha = store.put_file(src)
    assert sha == hashlib.sha256(DATA[:1000]).hexdigest()
    assert store.open_verified(sha) == DATA[:1000]
    assert store.put_file(src) == sha
    assert files_under(tmp_path / "store") == [f"objects/{sha[:2]}/{sha}"]


def test_put_file_error_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError):
        store.put_file(tmp_path / "missing.bin")
    with pytest.raises(IsADirectoryError):
        store.put_file(tmp_path)
    assert files_under(tmp_path / "store") == []


def test_empty_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"")
    assert sha == hashlib.sha256(b"").hexdigest()
    assert store.size(sha) == 0 and store.open_verified(sha) == b""
    assert list(store.read_chunks(sha)) == []


def test_resumable_upload_survives_a_crash(tmp_path: Path) -> None:
    chunks = [DATA[:100_000], DATA[100_000:200_000], DATA[200_000:]]
    store = BlobStore(tmp_path)
    assert store.upload_offset("up-1") == 0
    assert store.append("up-1", 0, chunks[0]) == 100_000
    assert store.append("up-1", 100_000, chunks[1]) == 200_000
    del store  # "crash": a new process opens the same root
    store = BlobStore(tmp_path)
    offset = store.upload_offset("up-1")
    assert offset == 200_000
    assert store.append("up-1", offset, chunks[2]) == len(DATA)
    path = store.finish("up-1", SHA, len(DATA))
    assert path == store.path(SHA)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA
    assert store.upload_offset("up-1") == 0
    assert files_under(tmp_path) == [f"objects/{SHA[:2]}/{SHA}"]


def test_wrong_offset_refused_and_nothing_changes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.append("k", 0, b"abc")
    for offset in (0, 2, 4, -1):
        with pytest.raises(BlobError, match="at offset 3"):
            store.append("k", offset, b"zzz")
    assert (tmp_path / "uploads" / "k.part").read_bytes() == b"abc"
    with pytest.raises(BlobError, match="at offset 0"):
        store.append("fresh", 5, b"x")
    assert store.upload_offset("fresh") == 0
    assert not (tmp_path / "uploads" / "fresh.part").exists()


def test_max_size_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert store.append("k", 0, b"12345", max_size=8) == 5
    with pytest.raises(BlobError, match="limit is 8"):
        store.append("k", 5, b"6789", max_size=8)
    assert store.upload_offset("k") == 5
    assert store.append("k", 5, b"678", max_size=8) == 8


def test_wrong_digest_or_size_at_finish(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.append("k", 0, DATA)
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(BlobError, match=f"{SHA[:12]}, expected {other[:12]}"):
        store.finish("k", other, len(DATA))
    assert not store.has(other) and store.upload_offset("k") == 0
    store.append("k", 0, DATA)
    with pytest.raises(BlobError, match=f"is {len(DATA)} bytes, expected {len(DATA) + 1}"):
        store.finish("k", SHA, len(DATA) + 1)
    assert not store.has(SHA) and store.upload_offset("k") == 0
    assert files_under(tmp_path) == []


def test_finish_is_idempotent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.append("a", 0, DATA)
    first = store.finish("a", SHA, len(DATA))
    assert store.finish("a", SHA, len(DATA)) == first
    # A second upload of a blob the store already has: the partial is simply dropped.
    store.append("b", 0, DATA)
    assert store.finish("b", SHA, len(DATA)) == first
    assert files_under(tmp_path) == [f"objects/{SHA[:2]}/{SHA}"]
    with pytest.raises(BlobError, match="no upload in progress"):
        store.finish("never", hashlib.sha256(b"x").hexdigest(), 1)


def test_discard(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.append("k", 0, b"abc")
    store.discard("k")
    store.discard("k")
    assert store.upload_offset("k") == 0 and files_under(tmp_path) == []


BAD_SHAS = ["../x", "a/b", "", SHA.upper(), SHA[:63], SHA + "0", "g" * 64, f"../{SHA[3:]}"]
BAD_KEYS = ["../x", "a/b", "", "x" * 201, "a b", "a\0b", "é", "a\\b"]


@pytest.mark.parametrize("sha", BAD_SHAS)
def test_invalid_blob_names_refused(tmp_path: Path, sha: str) -> None:
    store = BlobStore(tmp_path / "store")
    for call in (store.path, store.has, store.size, store.verify, store.open_verified):
        with pytest.raises(BlobError, match="not a SHA-256 digest"):
            call(sha)
    with pytest.raises(BlobError, match="not a SHA-256 digest"):
        store.read_chunks(sha)
    store.append("k", 0, b"abc")
    with pytest.raises(BlobError, match="not a SHA-256 digest"):
        store.finish("k", sha, 3)
    assert files_under(tmp_path) == ["store/uploads/k.part"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_upload_keys_refused(tmp_path: Path, key: str) -> None:
    store = BlobStore(tmp_path / "store")
    with pytest.raises(BlobError, match="upload key"):
        store.upload_offset(key)
    with pytest.raises(BlobError, match="upload key"):
        store.append(key, 0, b"abc")
    with pytest.raises(BlobError, match="upload key"):
        store.finish(key, SHA, 3)
    with pytest.raises(BlobError, match="upload key"):
        store.discard(key)
    assert files_under(tmp_path) == []


def test_valid_key_characters_accepted(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for key in ("A-z_0.9", "..", "x" * 200):
        assert store.append(key, 0, b"1") == 1
    assert store.upload_offset("..") == 1


def test_corruption_detected(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put_bytes(DATA)
    path = store.path(SHA)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert not store.verify(SHA)
    with pytest.raises(BlobError, match=f"blob {SHA[:12]} is corrupt"):
        store.open_verified(SHA)


def test_read_chunks_from_offset(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put_bytes(DATA)
    chunks = list(store.read_chunks(SHA, offset=12345, chunk_size=50_000))
    assert b"".join(chunks) == DATA[12345:]
    assert all(len(c) == 50_000 for c in chunks[:-1])
    assert list(store.read_chunks(SHA, offset=len(DATA))) == []
    for bad in (-1, len(DATA) + 1):
        with pytest.raises(BlobError, match="outside blob"):
            store.read_chunks(SHA, offset=bad)


def test_missing_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for call in (store.size, store.verify, store.open_verified, store.read_chunks):
        with pytest.raises(BlobError, match="no blob"):
            call(SHA)


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_read_verified_streams_an_intact_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put_bytes(DATA)
    for offset in (0, 12345, len(DATA)):
        chunks = list(store.read_verified(SHA, offset=offset, chunk_size=50_000))
        assert b"".join(chunks) == DATA[offset:]
    with pytest.raises(BlobError, match="outside blob"):
        store.read_verified(SHA, offset=len(DATA) + 1)


@pytest.mark.parametrize("offset", [0, 60_000, len(DATA)])
@pytest.mark.parametrize("where", ["prefix", "middle", "last chunk"])
def test_read_verified_never_hands_out_a_whole_corrupt_blob(
    tmp_path: Path, offset: int, where: str
) -> None:
    store = BlobStore(tmp_path)
    store.put_bytes(DATA)
    at = {"prefix": 10, "middle": len(DATA) // 2, "last chunk": len(DATA) - 1}[where]
    _flip(store.path(SHA), at)
    received = []
    with pytest.raises(CorruptBlob, match=f"blob {SHA[:12]} is corrupt on disk") as info:
        for chunk in store.read_verified(SHA, offset=offset, chunk_size=50_000):
            received.append(chunk)
    assert info.value.sha256 == SHA and info.value.actual != SHA
    # The last chunk is held back: whatever arrived stops short of the blob's end.
    assert received == [] or offset + sum(map(len, received)) < len(DATA)


def test_a_corrupt_object_is_replaced_by_the_same_bytes_stored_again(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put_bytes(DATA)
    _flip(store.path(SHA), 7)
    assert not store.verify(SHA)
    store.append("again", 0, DATA)
    store.finish("again", SHA, len(DATA))
    assert store.verify(SHA) and store.open_verified(SHA) == DATA
    # An intact object stays as it is when the same bytes come again.
    before = store.path(SHA).stat().st_ino
    store.append("third", 0, DATA)
    store.finish("third", SHA, len(DATA))
    assert store.path(SHA).stat().st_ino == before
    assert files_under(tmp_path / "uploads") == []


def test_an_upload_is_hashed_as_it_arrives_not_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(3 * 2**20 + 17)
    sha = hashlib.sha256(data).hexdigest()
    offset = 0
    for start in range(0, len(data), 2**20):
        offset = store.append("up", offset, data[start : start + 2**20])

    def no_read_back(path: object) -> str:
        raise AssertionError("finish read the upload back")

    monkeypatch.setattr("tspace_core.blobs.sha256_file", no_read_back)
    assert store.finish("up", sha, len(data)).read_bytes() == data


def test_an_upload_resumed_by_a_new_store_hashes_its_held_prefix(tmp_path: Path) -> None:
    data = os.urandom(2**20 + 5)
    sha = hashlib.sha256(data).hexdigest()
    BlobStore(tmp_path).append("up", 0, data[:1000])
    restarted = BlobStore(tmp_path)  # the coordinator came back: nothing is known in memory
    restarted.append("up", 1000, data[1000:])
    assert restarted.finish("up", sha, len(data)).read_bytes() == data


def test_bytes_changed_on_disk_before_a_resume_are_caught(tmp_path: Path) -> None:
    data = os.urandom(4096)
    sha = hashlib.sha256(data).hexdigest()
    BlobStore(tmp_path).append("up", 0, data[:2048])
    part = tmp_path / "uploads" / "up.part"
    part.write_bytes(b"\x00" * 2048)  # the held prefix rotted while the coordinator was down
    restarted = BlobStore(tmp_path)
    restarted.append("up", 2048, data[2048:])
    with pytest.raises(BlobError, match="digest"):
        restarted.finish("up", sha, len(data))
    assert not restarted.has(sha) and restarted.upload_offset("up") == 0
