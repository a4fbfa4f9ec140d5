# GENERATED — DO NOT EDIT. Run `python proto/generate.py` to regenerate from proto/.
from . import feedback_pb2 as _feedback_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("names", "client_id")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    client_id: str
    def __init__(self, names: _Optional[_Iterable[str]] = ..., client_id: _Optional[str] = ...) -> None: ...

class PolicyUpdate(_message.Message):
    __slots__ = ("name", "version", "policy", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    policy: bytes
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., policy: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("policy", "reason")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    policy: bytes
    reason: str
    def __init__(self, policy: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name", "to_version", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    to_version: int
    reason: str
    def __init__(self, name: _Optional[str] = ..., to_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyStatus(_message.Message):
    __slots__ = ("name", "current_version", "versions", "decisions", "joined", "pending", "outcomes", "last_train_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    LAST_TRAIN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    current_version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    decisions: int
    joined: int
    pending: int
    outcomes: int
    last_train_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., decisions: _Optional[int] = ..., joined: _Optional[int] = ..., pending: _Optional[int] = ..., outcomes: _Optional[int] = ..., last_train_unix_ms: _Optional[int] = ...) -> None: ...

class LearnerStatus(_message.Message):
    __slots__ = ("batches", "decisions", "outcomes", "joined", "pending", "policies", "started_unix_ms")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    batches: int
    decisions: int
    outcomes: int
    joined: int
    pending: int
    policies: _containers.RepeatedCompositeFieldContainer[PolicyStatus]
    started_unix_ms: int
    def __init__(self, batches: _Optional[int] = ..., decisions: _Optional[int] = ..., outcomes: _Optional[int] = ..., joined: _Optional[int] = ..., pending: _Optional[int] = ..., policies: _Optional[_Iterable[_Union[PolicyStatus, _Mapping]]] = ..., started_unix_ms: _Optional[int] = ...) -> None: ...
