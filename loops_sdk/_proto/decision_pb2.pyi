# GENERATED — DO NOT EDIT. Run `python proto/generate.py` to regenerate from proto/.
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttributeValue(_message.Message):
    __slots__ = ("text", "number", "integer", "flag")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    text: str
    number: float
    integer: int
    flag: bool
    def __init__(self, text: _Optional[str] = ..., number: _Optional[float] = ..., integer: _Optional[int] = ..., flag: _Optional[bool] = ...) -> None: ...

class AttributeColumn(_message.Message):
    __slots__ = ("texts", "numbers", "integers", "flags")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    INTEGERS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    numbers: _containers.RepeatedScalarFieldContainer[float]
    integers: _containers.RepeatedScalarFieldContainer[int]
    flags: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., numbers: _Optional[_Iterable[float]] = ..., integers: _Optional[_Iterable[int]] = ..., flags: _Optional[_Iterable[bool]] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("decision_point", "features", "categories", "vector", "user", "eligible", "default_action", "deferred", "attributes", "baseline")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CategoriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValue, _Mapping]] = ...) -> None: ...
    DECISION_POINT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ACTION_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    decision_point: str
    features: _containers.ScalarMap[str, float]
    categories: _containers.ScalarMap[str, str]
    vector: _containers.RepeatedScalarFieldContainer[float]
    user: str
    eligible: _containers.RepeatedScalarFieldContainer[str]
    default_action: str
    deferred: bool
    attributes: _containers.MessageMap[str, AttributeValue]
    baseline: str
    def __init__(self, decision_point: _Optional[str] = ..., features: _Optional[_Mapping[str, float]] = ..., categories: _Optional[_Mapping[str, str]] = ..., vector: _Optional[_Iterable[float]] = ..., user: _Optional[str] = ..., eligible: _Optional[_Iterable[str]] = ..., default_action: _Optional[str] = ..., deferred: _Optional[bool] = ..., attributes: _Optional[_Mapping[str, AttributeValue]] = ..., baseline: _Optional[str] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("action", "probability", "event_id", "policy_name", "policy_version", "holdout", "reason", "policy_action", "policy_probability", "rules")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_ACTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    action: str
    probability: float
    event_id: str
    policy_name: str
    policy_version: int
    holdout: bool
    reason: str
    policy_action: str
    policy_probability: float
    rules: int
    def __init__(self, action: _Optional[str] = ..., probability: _Optional[float] = ..., event_id: _Optional[str] = ..., policy_name: _Optional[str] = ..., policy_version: _Optional[int] = ..., holdout: _Optional[bool] = ..., reason: _Optional[str] = ..., policy_action: _Optional[str] = ..., policy_probability: _Optional[float] = ..., rules: _Optional[int] = ...) -> None: ...

class DecideRow(_message.Message):
    __slots__ = ("features", "categories", "vector", "user", "eligible", "attributes", "baseline")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CategoriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValue, _Mapping]] = ...) -> None: ...
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    features: _containers.ScalarMap[str, float]
    categories: _containers.ScalarMap[str, str]
    vector: _containers.RepeatedScalarFieldContainer[float]
    user: str
    eligible: _containers.RepeatedScalarFieldContainer[str]
    attributes: _containers.MessageMap[str, AttributeValue]
    baseline: str
    def __init__(self, features: _Optional[_Mapping[str, float]] = ..., categories: _Optional[_Mapping[str, str]] = ..., vector: _Optional[_Iterable[float]] = ..., user: _Optional[str] = ..., eligible: _Optional[_Iterable[str]] = ..., attributes: _Optional[_Mapping[str, AttributeValue]] = ..., baseline: _Optional[str] = ...) -> None: ...

class DecideBatchRequest(_message.Message):
    __slots__ = ("decision_point", "rows", "matrix", "columns", "users", "eligible", "default_action", "deferred", "attributes", "baselines", "has_user")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeColumn, _Mapping]] = ...) -> None: ...
    DECISION_POINT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ACTION_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    HAS_USER_FIELD_NUMBER: _ClassVar[int]
    decision_point: str
    rows: _containers.RepeatedCompositeFieldContainer[DecideRow]
    matrix: _containers.RepeatedScalarFieldContainer[float]
    columns: int
    users: _containers.RepeatedScalarFieldContainer[str]
    eligible: _containers.RepeatedScalarFieldContainer[str]
    default_action: str
    deferred: bool
    attributes: _containers.MessageMap[str, AttributeColumn]
    baselines: _containers.RepeatedScalarFieldContainer[str]
    has_user: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, decision_point: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[DecideRow, _Mapping]]] = ..., matrix: _Optional[_Iterable[float]] = ..., columns: _Optional[int] = ..., users: _Optional[_Iterable[str]] = ..., eligible: _Optional[_Iterable[str]] = ..., default_action: _Optional[str] = ..., deferred: _Optional[bool] = ..., attributes: _Optional[_Mapping[str, AttributeColumn]] = ..., baselines: _Optional[_Iterable[str]] = ..., has_user: _Optional[_Iterable[bool]] = ...) -> None: ...

class DecideBatchResponse(_message.Message):
    __slots__ = ("actions", "probabilities", "event_ids", "holdouts", "reasons", "policy_name", "policy_version", "policy_actions", "policy_probabilities", "rules")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUTS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedScalarFieldContainer[str]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    event_ids: _containers.RepeatedScalarFieldContainer[str]
    holdouts: _containers.RepeatedScalarFieldContainer[bool]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    policy_name: str
    policy_version: int
    policy_actions: _containers.RepeatedScalarFieldContainer[str]
    policy_probabilities: _containers.RepeatedScalarFieldContainer[float]
    rules: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, actions: _Optional[_Iterable[str]] = ..., probabilities: _Optional[_Iterable[float]] = ..., event_ids: _Optional[_Iterable[str]] = ..., holdouts: _Optional[_Iterable[bool]] = ..., reasons: _Optional[_Iterable[str]] = ..., policy_name: _Optional[str] = ..., policy_version: _Optional[int] = ..., policy_actions: _Optional[_Iterable[str]] = ..., policy_probabilities: _Optional[_Iterable[float]] = ..., rules: _Optional[_Iterable[int]] = ...) -> None: ...

class RewardRequest(_message.Message):
    __slots__ = ("event_id", "value", "kind")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    value: float
    kind: str
    def __init__(self, event_id: _Optional[str] = ..., value: _Optional[float] = ..., kind: _Optional[str] = ...) -> None: ...

class RewardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ObserveRequest(_message.Message):
    __slots__ = ("user", "value", "kind")
    USER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    user: str
    value: float
    kind: str
    def __init__(self, user: _Optional[str] = ..., value: _Optional[float] = ..., kind: _Optional[str] = ...) -> None: ...

class ObserveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("event_id",)
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    def __init__(self, event_id: _Optional[str] = ...) -> None: ...

class ActivateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
