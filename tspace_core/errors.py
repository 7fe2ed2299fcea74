"""User-facing error types: the CLI prints these as a message, never as a traceback."""


class TspaceError(Exception):
    """An error the user can cause and fix; its message says what was wrong and what to do."""


class SpecError(TspaceError):
    """A job spec, schedule or state selection that is not valid."""


class DataError(TspaceError):
    """A dataset, shard or manifest that is missing, corrupt or malformed."""


class CheckpointError(TspaceError):
    """A checkpoint file that is missing, corrupt, or not in the safetensors format."""


class SignatureError(TspaceError):
    """A key, signed statement or signature that is missing, malformed or does not verify."""


class BlobError(TspaceError):
    """A blob or upload that is missing, corrupt, misnamed or does not match its declared digest."""
