"""Creating a job: validate the spec, store its data as content-addressed shards, record it."""

from __future__ import annotations

import json
import tempfile
import tomllib
from pathlib import Path

from tspace_core.blobs import BlobStore
from tspace_core.catalogue import Catalogue
from tspace_core.catalogue.records import JobRecord, ShardRecord
from tspace_core.data import load_dataset, pack_shards
from tspace_core.errors import SpecError
from tspace_core.jobspec import Job, resolve, spec_from_dict
from tspace_core.runner import split_validation


def parse_job(spec_toml: str, base_dir: Path | None) -> Job:
    try:
        raw = tomllib.loads(spec_toml)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"the job is not valid TOML: {exc}") from None
    return resolve(spec_from_dict(raw), base_dir=base_dir)


def store_dataset(job: Job, blobs: BlobStore) -> tuple[list[ShardRecord], dict[str, object]]:
    """Load the job's data here, pack it into its shards, and put them in the blob store."""
    data = load_dataset(job.spec.data, job.base_dir)
    # Refuse now, not on every worker, a held-out set that leaves nothing to train on.
    split_validation(data, job.spec.training.validation_images, job.spec.training.seed)
    with tempfile.TemporaryDirectory(prefix="tspace-shards-") as tmp:
        manifest_path = pack_shards(data, Path(tmp) / "shards", job.spec.data.shards)
        manifest = json.loads(manifest_path.read_text())
        shards = []
        for entry in manifest["shards"]:
            path = manifest_path.parent / entry["file"]
            digest = blobs.put_file(path)
            size = path.stat().st_size
            shards.append(ShardRecord(entry["file"], digest, size, entry["count"]))
    return shards, manifest


def create_job(
    catalogue: Catalogue, blobs: BlobStore, spec_toml: str, base_dir: Path | None, now: float
) -> JobRecord:
    """Record a job (idempotent for the same spec); its spec_json holds the resolved job and the
    dataset manifest workers rebuild their data from."""
    job = parse_job(spec_toml, base_dir)
    held = set(blobs.digests())
    shards, manifest = store_dataset(job, blobs)
    spec_json = json.dumps({**job.to_json(), "dataset": manifest}, sort_keys=True)
    try:
        record = catalogue.create_job(
            job.spec.name, job.hash, spec_json, job.units, job.spec.training.steps, shards, now
        )
    except BaseException:
        # A refused job (e.g. its name taken by another spec) leaves no shards behind; blobs
        # that were here before, or that another job recorded meanwhile, stay.
        recorded = {s.sha256 for j in catalogue.list_jobs() for s in j.shards}
        for shard in shards:
            if shard.sha256 not in held and shard.sha256 not in recorded:
                blobs.remove(shard.sha256)
        raise
    catalogue.add_event(
        "job_created", f"job {job.spec.name} with {len(job.units)} units", now, job=job.spec.name
    )
    return record
