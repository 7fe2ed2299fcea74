"""The admin gRPC service: jobs, units, enrolment, workers, checkpoints, ensembles and a status
stream. Every call needs the admin credential; refusals carry a message meant for the operator."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from coordinator.config import hash_secret, new_secret
from coordinator.jobs import create_job
from coordinator.state import MAX_TEXT, CoordinatorState, abort, handles_errors
from tspace_core import serde
from tspace_core.catalogue.operator import TOKEN_ID_LENGTH
from tspace_core.catalogue.records import CheckpointRecord, EnsembleRecord
from tspace_core.fsio import sha256_file
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc
from tspace_core.verification import checkpoint_problems

SITE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Ensemble names and aliases: like job names, plus ':' (the coordinator registers "<job>:final").
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_LISTED = 10_000
MAX_SPEC_BYTES = 256 * 1024
MAX_TOKEN_TTL_S = 30 * 24 * 3600.0
STATUS_EVENTS = 20
MAX_STATUS_INTERVAL_S = 3600.0


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, state: CoordinatorState) -> None:
        self.state = state

    @handles_errors
    def CreateJob(self, request, context):
        self.state.require_admin(context)
        if len(request.spec_toml.encode()) > MAX_SPEC_BYTES:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the job spec is over 256 KiB")
        base_dir = Path(request.base_dir) if request.base_dir else None
        record = create_job(
            self.state.catalogue, self.state.blobs, request.spec_toml, base_dir, self.state.clock()
        )
        return serde.job_to_proto(self.state.catalogue.get_job(record.name))

    @handles_errors
    def ListJobs(self, request, context):
        self.state.require_admin(context)
        jobs = [serde.job_to_proto(j) for j in self.state.catalogue.list_jobs()]
        return admin_pb2.ListJobsResponse(jobs=jobs)

    @handles_errors
    def Enroll(self, request, context):
        self.state.require_admin(context)
        if not SITE_PATTERN.match(request.site):
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"site {request.site[:64]!r}: use 1-64 letters, digits, '_', '.' or '-'",
            )
        ttl = request.ttl_s or self.state.config.token_ttl_s
        if not 0 < ttl <= MAX_TOKEN_TTL_S:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "a token lifetime must be in (0, 30 days]",
            )
        token, now = new_secret(), self.state.clock()
        token_hash = hash_secret(token)
        self.state.catalogue.add_token(token_hash, request.site, now + ttl, now)
        token_id = token_hash[:TOKEN_ID_LENGTH]
        self.state.catalogue.add_event(
            "token_created", f"join token {token_id} for site {request.site}", now
        )
        return admin_pb2.EnrollResponse(token=token, expires_in_s=ttl, token_id=token_id)

    @handles_errors
    def ListTokens(self, request, context):
        self.state.require_admin(context)
        tokens = self.state.catalogue.list_tokens(self.state.clock())
        return admin_pb2.ListTokensResponse(tokens=[serde.token_to_proto(t) for t in tokens])

    @handles_errors
    def RevokeToken(self, request, context):
        self.state.require_admin(context)
        token = self.state.catalogue.revoke_token(request.token_id[:64], self.state.clock())
        return serde.token_to_proto(token)

    @handles_errors
    def GetJob(self, request, context):
        self.state.require_admin(context)
        catalogue = self.state.catalogue
        job = catalogue.get_job(request.name[:MAX_TEXT])
        return admin_pb2.JobDetail(
            job=serde.job_to_proto(job),
            spec_json=job.spec_json,
            shards=[serde.shard_to_proto(s) for s in job.shards],
            units=[serde.unit_status_to_proto(u) for u in catalogue.units(job.name)],
            ensembles=[e.name for e in catalogue.list_ensembles() if e.job == job.name],
        )

    @handles_errors
    def ChangeJob(self, request, context):
        self.state.require_admin(context)
        job = self.state.catalogue.change_job(
            request.name[:MAX_TEXT], request.action[:MAX_TEXT], self.state.clock()
        )
        return serde.job_to_proto(job)

    @handles_errors
    def ListUnits(self, request, context):
        self.state.require_admin(context)
        units = self.state.catalogue.units(request.job[:MAX_TEXT] or None)
        return admin_pb2.ListUnitsResponse(units=[serde.unit_status_to_proto(u) for u in units])

    @handles_errors
    def RetryUnit(self, request, context):
        self.state.require_admin(context)
        unit = self.state.catalogue.retry_unit(
            request.job[:MAX_TEXT], request.unit, self.state.clock()
        )
        return serde.unit_status_to_proto(unit)

    @handles_errors
    def ResetUnit(self, request, context):
        self.state.require_admin(context)
        unit = self.state.catalogue.reset_unit(
            request.job[:MAX_TEXT], request.unit, request.checkpoint[:MAX_TEXT], self.state.clock()
        )
        return serde.unit_status_to_proto(unit)

    @handles_errors
    def ListWorkers(self, request, context):
        self.state.require_admin(context)
        now = self.state.clock()
        workers = [serde.worker_to_proto(w, now) for w in self.state.catalogue.list_workers()]
        return admin_pb2.ListWorkersResponse(workers=workers)

    @handles_errors
    def GetWorker(self, request, context):
        self.state.require_admin(context)
        catalogue, now = self.state.catalogue, self.state.clock()
        worker = catalogue.get_worker(request.worker_id[:MAX_TEXT])
        leased = [u for u in catalogue.units() if u.worker_id == worker.worker_id]
        signed = len(catalogue.list_checkpoints(worker_id=worker.worker_id))
        return admin_pb2.WorkerDetail(
            worker=serde.worker_to_proto(worker, now),
            hostname=worker.hostname,
            registered_at=worker.registered_at,
            public_key=worker.public_key,
            leased=[serde.unit_status_to_proto(u) for u in leased],
            checkpoints=signed,
        )

    @handles_errors
    def RevokeWorker(self, request, context):
        self.state.require_admin(context)
        now = self.state.clock()
        revocation = self.state.catalogue.revoke_worker(request.worker_id[:MAX_TEXT], now)
        self.state.forget_worker(revocation.worker.worker_id)
        return admin_pb2.RevokeWorkerResponse(
            worker=serde.worker_to_proto(revocation.worker, now),
            requeued=[admin_pb2.RequeuedUnit(job=j, unit=u) for j, u in revocation.requeued],
            checkpoints=revocation.checkpoints,
        )

    @handles_errors
    def ListCheckpoints(self, request, context):
        self.state.require_admin(context)
        checkpoints = self._checkpoints(request)
        return admin_pb2.ListCheckpointsResponse(
            checkpoints=[serde.checkpoint_info_to_proto(c) for c in checkpoints]
        )

    @handles_errors
    def VerifyCheckpoints(self, request, context):
        """One verdict per checkpoint, streamed as each file is re-read and hashed."""
        self.state.require_admin(context)
        if len(request.checkpoints) > MAX_LISTED:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_LISTED} digests")
        checkpoints = self._checkpoints(request, request.checkpoints)
        for index, ckpt in enumerate(checkpoints, 1):
            if not context.is_active():
                return
            path = self.state.blobs.path(ckpt.sha256)
            problems = checkpoint_problems(ckpt, path)
            if ckpt.corrupt or (problems and path.is_file()):  # hashed again only then
                problems += self._corruption(ckpt, path)
            if problems:
                self.state.catalogue.add_event(
                    "checkpoint_unverified",
                    f"checkpoint {ckpt.sha256[:12]} of unit {ckpt.unit}: {problems[0]}",
                    self.state.clock(),
                    job=ckpt.job,
                    unit=ckpt.unit,
                    worker_id=ckpt.worker_id,
                )
            yield admin_pb2.CheckpointVerdict(
                checkpoint=serde.checkpoint_info_to_proto(ckpt),
                ok=not problems,
                problems=problems,
                index=index,
                total=len(checkpoints),
            )

    def _corruption(self, ckpt: CheckpointRecord, path: Path) -> list[str]:
        """What finding the checkpoint's file corrupt did, marking it so if it is (and was not
        before); nothing when the file matches its digest."""
        if ckpt.corrupt:
            return ["marked corrupt when its file failed its digest; no longer handed out"]
        actual = sha256_file(path)
        # Hashed twice before marking: an upload of the same bytes may have repaired the file
        # while the first read ran.
        if actual == ckpt.sha256 or sha256_file(path) == ckpt.sha256:
            return []
        marked = self.state.catalogue.mark_corrupt(
            ckpt.sha256, f"its content hashes to {actual[:12]}", self.state.clock()
        )
        then = (
            f"unit {ckpt.unit} was done with it and is requeued to train again"
            if marked.requeued
            else "no longer handed out"
        )
        return [f"marked corrupt: {then}"]

    def _checkpoints(self, request: Any, refs: Sequence[str] = ()) -> list[CheckpointRecord]:
        """The checkpoints named by digest (prefixes) in `refs`, else those of the request's
        job and unit (an unknown job is refused, not an empty list)."""
        catalogue = self.state.catalogue
        if refs:
            return [catalogue.resolve_checkpoint(ref[:MAX_TEXT]) for ref in refs]
        unit = request.unit if request.HasField("unit") else None
        return catalogue.list_checkpoints(request.job[:MAX_TEXT] or None, unit)

    @handles_errors
    def GetEnsemble(self, request, context):
        self.state.require_admin(context)
        return self._ensemble(self.state.catalogue.get_ensemble(request.name[:MAX_TEXT]))

    @handles_errors
    def ListEnsembles(self, request, context):
        self.state.require_admin(context)
        ensembles = [self._ensemble(e) for e in self.state.catalogue.list_ensembles()]
        aliases = [serde.alias_to_proto(a) for a in self.state.catalogue.list_aliases()]
        return admin_pb2.ListEnsemblesResponse(ensembles=ensembles, aliases=aliases)

    @handles_errors
    def RegisterEnsemble(self, request, context):
        self.state.require_admin(context)
        name = request.name
        if not NAME_PATTERN.match(name):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, _bad_name("ensemble", name))
        if len(request.checkpoints) > MAX_LISTED:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_LISTED} picks")
        record = self.state.catalogue.register_selected(
            name,
            request.job[:MAX_TEXT],
            request.select[:MAX_TEXT] or "final",
            dict(request.checkpoints),
            self.state.clock(),
        )
        return self._ensemble(record)

    @handles_errors
    def SetAlias(self, request, context):
        self.state.require_admin(context)
        if not NAME_PATTERN.match(request.alias):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, _bad_name("alias", request.alias))
        alias = self.state.catalogue.set_alias(
            request.alias, request.ensemble[:MAX_TEXT], self.state.clock()
        )
        return serde.alias_to_proto(alias)

    def _ensemble(self, record: EnsembleRecord) -> admin_pb2.Ensemble:
        resolved = json.loads(record.spec_json)
        return serde.ensemble_to_proto(
            record, tuple(resolved["latent_states"]), tuple(resolved["alphas_cumprod"])
        )

    @handles_errors
    def Status(self, request, context):
        self.state.require_admin(context)
        if not 0 <= request.interval_s <= MAX_STATUS_INTERVAL_S:  # NaN fails this too
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"interval_s must be in [0, {MAX_STATUS_INTERVAL_S:g}] seconds",
            )
        interval = max(request.interval_s, 0.1) if request.interval_s > 0 else 0.0
        ended = threading.Event()
        context.add_callback(ended.set)  # the client left or the server stops: stop waiting
        while True:
            yield self.snapshot()
            if not interval or ended.wait(interval) or not context.is_active():
                return

    def snapshot(self) -> admin_pb2.StatusSnapshot:
        catalogue, now = self.state.catalogue, self.state.clock()
        return admin_pb2.StatusSnapshot(
            time=now,
            jobs=[serde.job_to_proto(j) for j in catalogue.list_jobs()],
            units=[serde.unit_status_to_proto(u) for u in catalogue.units()],
            workers=[serde.worker_to_proto(w, now) for w in catalogue.list_workers()],
            events=[serde.event_to_proto(e) for e in catalogue.events(STATUS_EVENTS)],
        )


def _bad_name(what: str, name: str) -> str:
    return (
        f"{what} name {name[:64]!r}: use 1-128 letters, digits, '_', '.', ':' or '-', "
        "starting with a letter or digit"
    )
