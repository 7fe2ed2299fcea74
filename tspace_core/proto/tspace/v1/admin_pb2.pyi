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
    __slots__ = ("name", "job_hash", "status", "units", "units_done", "units_failed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    UNITS_DONE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FAILED_FIELD_NUMBER: _ClassVar[int]
    name: str
    job_hash: str
    status: str
    units: int
    units_done: int
    units_failed: int
    def __init__(self, name: _Optional[str] = ..., job_hash: _Optional[str] = ..., status: _Optional[str] = ..., units: _Optional[int] = ..., units_done: _Optional[int] = ..., units_failed: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("token", "expires_in_s")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_in_s: float
    def __init__(self, token: _Optional[str] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("name", "job", "job_hash", "spec_json", "timesteps", "alphas_cumprod", "members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_CUMPROD_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    job: str
    job_hash: str
    spec_json: str
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    alphas_cumprod: _containers.RepeatedScalarFieldContainer[float]
    members: _containers.RepeatedCompositeFieldContainer[EnsembleMember]
    def __init__(self, name: _Optional[str] = ..., job: _Optional[str] = ..., job_hash: _Optional[str] = ..., spec_json: _Optional[str] = ..., timesteps: _Optional[_Iterable[int]] = ..., alphas_cumprod: _Optional[_Iterable[float]] = ..., members: _Optional[_Iterable[_Union[EnsembleMember, _Mapping]]] = ...) -> None: ...

class GetEnsembleRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListEnsemblesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnsemblesResponse(_message.Message):
    __slots__ = ("ensembles",)
    ENSEMBLES_FIELD_NUMBER: _ClassVar[int]
    ensembles: _containers.RepeatedCompositeFieldContainer[Ensemble]
    def __init__(self, ensembles: _Optional[_Iterable[_Union[Ensemble, _Mapping]]] = ...) -> None: ...

class UnitStatus(_message.Message):
    __slots__ = ("job", "unit", "timesteps", "status", "worker_id", "step", "total_steps", "loss", "images_per_s", "attempts")
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
    def __init__(self, job: _Optional[str] = ..., unit: _Optional[int] = ..., timesteps: _Optional[_Iterable[int]] = ..., status: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., images_per_s: _Optional[float] = ..., attempts: _Optional[int] = ...) -> None: ...

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
