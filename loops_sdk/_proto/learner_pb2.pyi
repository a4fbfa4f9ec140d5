# GENERATED — DO NOT EDIT. Run `python proto/generate.py` to regenerate from proto/.
from . import feedback_pb2 as _feedback_pb2
from . import policy_pb2 as _policy_pb2
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
    __slots__ = ("name", "to_version", "reason", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    to_version: int
    reason: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., to_version: _Optional[int] = ..., reason: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("target", "estimator", "value", "lower", "upper", "stderr", "ess", "n", "level", "interval")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    ESS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    target: str
    estimator: str
    value: float
    lower: float
    upper: float
    stderr: float
    ess: float
    n: int
    level: float
    interval: str
    def __init__(self, target: _Optional[str] = ..., estimator: _Optional[str] = ..., value: _Optional[float] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., stderr: _Optional[float] = ..., ess: _Optional[float] = ..., n: _Optional[int] = ..., level: _Optional[float] = ..., interval: _Optional[str] = ...) -> None: ...

class VersionRecord(_message.Message):
    __slots__ = ("version", "state", "decision", "reason", "created_unix_ms", "mode", "gate_estimator", "evaluations", "decision_reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GATE_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: str
    decision: str
    reason: str
    created_unix_ms: int
    mode: _policy_pb2.Policy.Mode
    gate_estimator: str
    evaluations: _containers.RepeatedCompositeFieldContainer[Evaluation]
    decision_reason: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[str] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., mode: _Optional[_Union[_policy_pb2.Policy.Mode, str]] = ..., gate_estimator: _Optional[str] = ..., evaluations: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ..., decision_reason: _Optional[str] = ...) -> None: ...

class PolicyHistory(_message.Message):
    __slots__ = ("name", "serving_version", "training_paused", "versions", "changes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_PAUSED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    serving_version: int
    training_paused: bool
    versions: _containers.RepeatedCompositeFieldContainer[VersionRecord]
    changes: _containers.RepeatedCompositeFieldContainer[DetectedChange]
    def __init__(self, name: _Optional[str] = ..., serving_version: _Optional[int] = ..., training_paused: _Optional[bool] = ..., versions: _Optional[_Iterable[_Union[VersionRecord, _Mapping]]] = ..., changes: _Optional[_Iterable[_Union[DetectedChange, _Mapping]]] = ...) -> None: ...

class DetectedChange(_message.Message):
    __slots__ = ("created_unix_ms", "action", "direction", "statistic", "rows", "detail")
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    created_unix_ms: int
    action: str
    direction: str
    statistic: float
    rows: int
    detail: str
    def __init__(self, created_unix_ms: _Optional[int] = ..., action: _Optional[str] = ..., direction: _Optional[str] = ..., statistic: _Optional[float] = ..., rows: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class SetModeRequest(_message.Message):
    __slots__ = ("name", "mode", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: _policy_pb2.Policy.Mode
    reason: str
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[_policy_pb2.Policy.Mode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class SetTrainingRequest(_message.Message):
    __slots__ = ("name", "paused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    paused: bool
    def __init__(self, name: _Optional[str] = ..., paused: _Optional[bool] = ...) -> None: ...

class SetTrainingResponse(_message.Message):
    __slots__ = ("name", "paused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    paused: bool
    def __init__(self, name: _Optional[str] = ..., paused: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyStatus(_message.Message):
    __slots__ = ("name", "current_version", "versions", "decisions", "joined", "pending", "outcomes", "last_train_unix_ms", "changes_detected", "last_change_unix_ms", "last_change_action", "decision_to_row_ms", "row_to_served_ms", "effective_rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    LAST_TRAIN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_DETECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_ACTION_FIELD_NUMBER: _ClassVar[int]
    DECISION_TO_ROW_MS_FIELD_NUMBER: _ClassVar[int]
    ROW_TO_SERVED_MS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    current_version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    decisions: int
    joined: int
    pending: int
    outcomes: int
    last_train_unix_ms: int
    changes_detected: int
    last_change_unix_ms: int
    last_change_action: str
    decision_to_row_ms: float
    row_to_served_ms: float
    effective_rows: float
    def __init__(self, name: _Optional[str] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., decisions: _Optional[int] = ..., joined: _Optional[int] = ..., pending: _Optional[int] = ..., outcomes: _Optional[int] = ..., last_train_unix_ms: _Optional[int] = ..., changes_detected: _Optional[int] = ..., last_change_unix_ms: _Optional[int] = ..., last_change_action: _Optional[str] = ..., decision_to_row_ms: _Optional[float] = ..., row_to_served_ms: _Optional[float] = ..., effective_rows: _Optional[float] = ...) -> None: ...

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
