"""The admin gRPC service: jobs, enrolment, workers, ensembles and a status stream."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc

from coordinator.config import hash_secret, new_secret
from coordinator.jobs import create_job
from coordinator.state import CoordinatorState, abort, handles_errors
from tspace_core import serde
from tspace_core.catalogue.records import EnsembleRecord
from tspace_core.proto.tspace.v1 import admin_pb2, admin_pb2_grpc

SITE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_SPEC_BYTES = 256 * 1024
MAX_TOKEN_TTL_S = 30 * 24 * 3600.0
STATUS_EVENTS = 20


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
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ttl_s must be in (0, 30 days]")
        token, now = new_secret(), self.state.clock()
        self.state.catalogue.add_token(hash_secret(token), request.site, now + ttl)
        self.state.catalogue.add_event("token_created", f"join token for site {request.site}", now)
        return admin_pb2.EnrollResponse(token=token, expires_in_s=ttl)

    @handles_errors
    def ListWorkers(self, request, context):
        self.state.require_admin(context)
        now = self.state.clock()
        workers = [serde.worker_to_proto(w, now) for w in self.state.catalogue.list_workers()]
        return admin_pb2.ListWorkersResponse(workers=workers)

    @handles_errors
    def GetEnsemble(self, request, context):
        self.state.require_admin(context)
        return self._ensemble(self.state.catalogue.get_ensemble(request.name[:200]))

    @handles_errors
    def ListEnsembles(self, request, context):
        self.state.require_admin(context)
        ensembles = [self._ensemble(e) for e in self.state.catalogue.list_ensembles()]
        return admin_pb2.ListEnsemblesResponse(ensembles=ensembles)

    def _ensemble(self, record: EnsembleRecord) -> admin_pb2.Ensemble:
        resolved = json.loads(record.spec_json)
        return serde.ensemble_to_proto(
            record, tuple(resolved["latent_states"]), tuple(resolved["alphas_cumprod"])
        )

    @handles_errors
    def Status(self, request, context):
        self.state.require_admin(context)
        interval = max(request.interval_s, 0.1) if request.interval_s > 0 else 0.0
        while True:
            yield self.snapshot()
            if not interval:
                return
            time.sleep(interval)
            if not context.is_active():  # the client left while we slept: build nothing more
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
