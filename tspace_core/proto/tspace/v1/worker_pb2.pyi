from tspace_core.proto.tspace.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("token", "public_key", "device", "hostname", "csr")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    token: str
    public_key: bytes
    device: str
    hostname: str
    csr: bytes
    def __init__(self, token: _Optional[str] = ..., public_key: _Optional[bytes] = ..., device: _Optional[str] = ..., hostname: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "credential", "site", "key_id", "client_certificate")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    credential: str
    site: str
    key_id: str
    client_certificate: bytes
    def __init__(self, worker_id: _Optional[str] = ..., credential: _Optional[str] = ..., site: _Optional[str] = ..., key_id: _Optional[str] = ..., client_certificate: _Optional[bytes] = ...) -> None: ...

class AcquireUnitRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("lease_id", "job", "job_hash", "spec_json", "unit", "timesteps", "alphas_cumprod", "attempt", "lease_ttl_s", "shards", "resume_from")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_CUMPROD_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    job: str
    job_hash: str
    spec_json: str
    unit: int
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    alphas_cumprod: _containers.RepeatedScalarFieldContainer[float]
    attempt: int
    lease_ttl_s: float
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardRef]
    resume_from: _common_pb2.CheckpointRef
    def __init__(self, lease_id: _Optional[str] = ..., job: _Optional[str] = ..., job_hash: _Optional[str] = ..., spec_json: _Optional[str] = ..., unit: _Optional[int] = ..., timesteps: _Optional[_Iterable[int]] = ..., alphas_cumprod: _Optional[_Iterable[float]] = ..., attempt: _Optional[int] = ..., lease_ttl_s: _Optional[float] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardRef, _Mapping]]] = ..., resume_from: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ...) -> None: ...

class NoWork(_message.Message):
    __slots__ = ("finished", "retry_after_s")
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    finished: bool
    retry_after_s: float
    def __init__(self, finished: bool = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class AcquireUnitResponse(_message.Message):
    __slots__ = ("assignment", "no_work")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    NO_WORK_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    no_work: NoWork
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., no_work: _Optional[_Union[NoWork, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("lease_id", "step", "loss", "images_per_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    step: int
    loss: float
    images_per_s: float
    def __init__(self, lease_id: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., images_per_s: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_ttl_s", "cancel")
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_s: float
    cancel: bool
    def __init__(self, lease_ttl_s: _Optional[float] = ..., cancel: bool = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("lease_id", "sha256")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    sha256: str
    def __init__(self, lease_id: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadStatusResponse(_message.Message):
    __slots__ = ("offset", "complete")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    complete: bool
    def __init__(self, offset: _Optional[int] = ..., complete: bool = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("lease_id", "sha256", "size", "offset", "statement", "signature")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    sha256: str
    size: int
    offset: int
    statement: bytes
    signature: bytes
    def __init__(self, lease_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ..., statement: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("checkpoint", "already_registered")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _common_pb2.CheckpointRef
    already_registered: bool
    def __init__(self, checkpoint: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., already_registered: bool = ...) -> None: ...

class CompleteUnitRequest(_message.Message):
    __slots__ = ("lease_id", "sha256")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    sha256: str
    def __init__(self, lease_id: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class CompleteUnitResponse(_message.Message):
    __slots__ = ("ensemble",)
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    ensemble: str
    def __init__(self, ensemble: _Optional[str] = ...) -> None: ...

class FailUnitRequest(_message.Message):
    __slots__ = ("lease_id", "error")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    error: str
    def __init__(self, lease_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class FailUnitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...
