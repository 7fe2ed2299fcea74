from tspace_core.proto.tspace.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateJobRequest(_message.Message):
    __slots__ = ("spec_toml", "base_dir")
    SPEC_TOML_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    spec_toml: str
    base_dir: str
    def __init__(self, spec_toml: _Optional[str] = ..., base_dir: _Optional[str] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("name", "job_hash", "status", "units", "units_done", "units_failed", "total_steps", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    UNITS_DONE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FAILED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    job_hash: str
    status: str
    units: int
    units_done: int
    units_failed: int
    total_steps: int
    created_at: float
    def __init__(self, name: _Optional[str] = ..., job_hash: _Optional[str] = ..., status: _Optional[str] = ..., units: _Optional[int] = ..., units_done: _Optional[int] = ..., units_failed: _Optional[int] = ..., total_steps: _Optional[int] = ..., created_at: _Optional[float] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class JobDetail(_message.Message):
    __slots__ = ("job", "spec_json", "shards", "units", "ensembles")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLES_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    spec_json: str
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardRef]
    units: _containers.RepeatedCompositeFieldContainer[UnitStatus]
    ensembles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., spec_json: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardRef, _Mapping]]] = ..., units: _Optional[_Iterable[_Union[UnitStatus, _Mapping]]] = ..., ensembles: _Optional[_Iterable[str]] = ...) -> None: ...

class ChangeJobRequest(_message.Message):
    __slots__ = ("name", "action")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    action: str
    def __init__(self, name: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class ListUnitsRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ListUnitsResponse(_message.Message):
    __slots__ = ("units",)
    UNITS_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[UnitStatus]
    def __init__(self, units: _Optional[_Iterable[_Union[UnitStatus, _Mapping]]] = ...) -> None: ...

class RetryUnitRequest(_message.Message):
    __slots__ = ("job", "unit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    unit: int
    def __init__(self, job: _Optional[str] = ..., unit: _Optional[int] = ...) -> None: ...

class ResetUnitRequest(_message.Message):
    __slots__ = ("job", "unit", "checkpoint")
    JOB_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    job: str
    unit: int
    checkpoint: str
    def __init__(self, job: _Optional[str] = ..., unit: _Optional[int] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("site", "ttl_s")
    SITE_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    site: str
    ttl_s: float
    def __init__(self, site: _Optional[str] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("token", "expires_in_s", "token_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_in_s: float
    token_id: str
    def __init__(self, token: _Optional[str] = ..., expires_in_s: _Optional[float] = ..., token_id: _Optional[str] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("token_id", "site", "status", "created_at", "expires_at", "worker_id")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    site: str
    status: str
    created_at: float
    expires_at: float
    worker_id: str
    def __init__(self, token_id: _Optional[str] = ..., site: _Optional[str] = ..., status: _Optional[str] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., worker_id: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "site", "key_id", "status", "device", "last_seen_age_s", "units_done")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AGE_S_FIELD_NUMBER: _ClassVar[int]
    UNITS_DONE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    site: str
    key_id: str
    status: str
    device: str
    last_seen_age_s: float
    units_done: int
    def __init__(self, worker_id: _Optional[str] = ..., site: _Optional[str] = ..., key_id: _Optional[str] = ..., status: _Optional[str] = ..., device: _Optional[str] = ..., last_seen_age_s: _Optional[float] = ..., units_done: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class GetWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class WorkerDetail(_message.Message):
    __slots__ = ("worker", "hostname", "registered_at", "public_key", "leased", "checkpoints")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    hostname: str
    registered_at: float
    public_key: bytes
    leased: _containers.RepeatedCompositeFieldContainer[UnitStatus]
    checkpoints: int
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., hostname: _Optional[str] = ..., registered_at: _Optional[float] = ..., public_key: _Optional[bytes] = ..., leased: _Optional[_Iterable[_Union[UnitStatus, _Mapping]]] = ..., checkpoints: _Optional[int] = ...) -> None: ...

class RevokeWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class RequeuedUnit(_message.Message):
    __slots__ = ("job", "unit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    unit: int
    def __init__(self, job: _Optional[str] = ..., unit: _Optional[int] = ...) -> None: ...

class RevokeWorkerResponse(_message.Message):
    __slots__ = ("worker", "requeued", "checkpoints")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    requeued: _containers.RepeatedCompositeFieldContainer[RequeuedUnit]
    checkpoints: int
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., requeued: _Optional[_Iterable[_Union[RequeuedUnit, _Mapping]]] = ..., checkpoints: _Optional[int] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("ref", "worker_id", "trusted", "discarded", "created_at", "attempt", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ref: _common_pb2.CheckpointRef
    worker_id: str
    trusted: bool
    discarded: bool
    created_at: float
    attempt: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, ref: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., worker_id: _Optional[str] = ..., trusted: bool = ..., discarded: bool = ..., created_at: _Optional[float] = ..., attempt: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("job", "unit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    unit: int
    def __init__(self, job: _Optional[str] = ..., unit: _Optional[int] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class VerifyCheckpointsRequest(_message.Message):
    __slots__ = ("job", "unit", "checkpoints")
    JOB_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    job: str
    unit: int
    checkpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., unit: _Optional[int] = ..., checkpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointVerdict(_message.Message):
    __slots__ = ("checkpoint", "ok", "problems", "index", "total")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    checkpoint: CheckpointInfo
    ok: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    index: int
    total: int
    def __init__(self, checkpoint: _Optional[_Union[CheckpointInfo, _Mapping]] = ..., ok: bool = ..., problems: _Optional[_Iterable[str]] = ..., index: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class EnsembleMember(_message.Message):
    __slots__ = ("unit", "timesteps", "checkpoint", "trusted")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_FIELD_NUMBER: _ClassVar[int]
    unit: int
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    checkpoint: _common_pb2.CheckpointRef
    trusted: bool
    def __init__(self, unit: _Optional[int] = ..., timesteps: _Optional[_Iterable[int]] = ..., checkpoint: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., trusted: bool = ...) -> None: ...

class Ensemble(_message.Message):
    __slots__ = ("name", "job", "job_hash", "spec_json", "timesteps", "alphas_cumprod", "members", "created_at", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_CUMPROD_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    job: str
    job_hash: str
    spec_json: str
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    alphas_cumprod: _containers.RepeatedScalarFieldContainer[float]
    members: _containers.RepeatedCompositeFieldContainer[EnsembleMember]
    created_at: float
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., job: _Optional[str] = ..., job_hash: _Optional[str] = ..., spec_json: _Optional[str] = ..., timesteps: _Optional[_Iterable[int]] = ..., alphas_cumprod: _Optional[_Iterable[float]] = ..., members: _Optional[_Iterable[_Union[EnsembleMember, _Mapping]]] = ..., created_at: _Optional[float] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEnsembleRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListEnsemblesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnsemblesResponse(_message.Message):
    __slots__ = ("ensembles", "aliases")
    ENSEMBLES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    ensembles: _containers.RepeatedCompositeFieldContainer[Ensemble]
    aliases: _containers.RepeatedCompositeFieldContainer[AliasInfo]
    def __init__(self, ensembles: _Optional[_Iterable[_Union[Ensemble, _Mapping]]] = ..., aliases: _Optional[_Iterable[_Union[AliasInfo, _Mapping]]] = ...) -> None: ...

class RegisterEnsembleRequest(_message.Message):
    __slots__ = ("name", "job", "select", "checkpoints")
    class CheckpointsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    job: str
    select: str
    checkpoints: _containers.ScalarMap[int, str]
    def __init__(self, name: _Optional[str] = ..., job: _Optional[str] = ..., select: _Optional[str] = ..., checkpoints: _Optional[_Mapping[int, str]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("alias", "ensemble")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    alias: str
    ensemble: str
    def __init__(self, alias: _Optional[str] = ..., ensemble: _Optional[str] = ...) -> None: ...

class AliasInfo(_message.Message):
    __slots__ = ("alias", "ensemble", "updated_at")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    alias: str
    ensemble: str
    updated_at: float
    def __init__(self, alias: _Optional[str] = ..., ensemble: _Optional[str] = ..., updated_at: _Optional[float] = ...) -> None: ...

class UnitStatus(_message.Message):
    __slots__ = ("job", "unit", "timesteps", "status", "worker_id", "step", "total_steps", "loss", "images_per_s", "attempts", "last_error", "newest_step", "newest_checkpoint_at")
    JOB_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    NEWEST_STEP_FIELD_NUMBER: _ClassVar[int]
    NEWEST_CHECKPOINT_AT_FIELD_NUMBER: _ClassVar[int]
    job: str
    unit: int
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    status: str
    worker_id: str
    step: int
    total_steps: int
    loss: float
    images_per_s: float
    attempts: int
    last_error: str
    newest_step: int
    newest_checkpoint_at: float
    def __init__(self, job: _Optional[str] = ..., unit: _Optional[int] = ..., timesteps: _Optional[_Iterable[int]] = ..., status: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., images_per_s: _Optional[float] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., newest_step: _Optional[int] = ..., newest_checkpoint_at: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "kind", "job", "unit", "worker_id", "message")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    time: float
    kind: str
    job: str
    unit: int
    worker_id: str
    message: str
    def __init__(self, time: _Optional[float] = ..., kind: _Optional[str] = ..., job: _Optional[str] = ..., unit: _Optional[int] = ..., worker_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class StatusSnapshot(_message.Message):
    __slots__ = ("time", "jobs", "units", "workers", "events")
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    time: float
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    units: _containers.RepeatedCompositeFieldContainer[UnitStatus]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, time: _Optional[float] = ..., jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., units: _Optional[_Iterable[_Union[UnitStatus, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...
