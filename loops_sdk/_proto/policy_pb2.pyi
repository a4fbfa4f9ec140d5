# GENERATED — DO NOT EDIT. Run `python proto/generate.py` to regenerate from proto/.
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureSpec(_message.Message):
    __slots__ = ("name", "kind", "center", "scale", "buckets", "default_value")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[FeatureSpec.Kind]
        NUMERIC: _ClassVar[FeatureSpec.Kind]
        CATEGORICAL: _ClassVar[FeatureSpec.Kind]
    KIND_UNSPECIFIED: FeatureSpec.Kind
    NUMERIC: FeatureSpec.Kind
    CATEGORICAL: FeatureSpec.Kind
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CENTER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: FeatureSpec.Kind
    center: float
    scale: float
    buckets: int
    default_value: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[FeatureSpec.Kind, str]] = ..., center: _Optional[float] = ..., scale: _Optional[float] = ..., buckets: _Optional[int] = ..., default_value: _Optional[float] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("id", "cost", "tags", "value", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    cost: float
    tags: _containers.RepeatedScalarFieldContainer[str]
    value: float
    attributes: _containers.ScalarMap[str, float]
    def __init__(self, id: _Optional[str] = ..., cost: _Optional[float] = ..., tags: _Optional[_Iterable[str]] = ..., value: _Optional[float] = ..., attributes: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LinearModel(_message.Message):
    __slots__ = ("n_actions", "n_inputs", "weights", "bias")
    N_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    N_INPUTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    n_actions: int
    n_inputs: int
    weights: _containers.RepeatedScalarFieldContainer[float]
    bias: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, n_actions: _Optional[int] = ..., n_inputs: _Optional[int] = ..., weights: _Optional[_Iterable[float]] = ..., bias: _Optional[_Iterable[float]] = ...) -> None: ...

class SharedModel(_message.Message):
    __slots__ = ("attributes", "n_inputs", "weights", "action_bias", "per_action_bias")
    class ActionBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    N_INPUTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ACTION_BIAS_FIELD_NUMBER: _ClassVar[int]
    PER_ACTION_BIAS_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedScalarFieldContainer[str]
    n_inputs: int
    weights: _containers.RepeatedScalarFieldContainer[float]
    action_bias: _containers.ScalarMap[str, float]
    per_action_bias: bool
    def __init__(self, attributes: _Optional[_Iterable[str]] = ..., n_inputs: _Optional[int] = ..., weights: _Optional[_Iterable[float]] = ..., action_bias: _Optional[_Mapping[str, float]] = ..., per_action_bias: _Optional[bool] = ...) -> None: ...

class Exploration(_message.Message):
    __slots__ = ("kind", "epsilon", "temperature", "gamma", "samples", "draw_weights", "draw_bias")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Exploration.Kind]
        GREEDY: _ClassVar[Exploration.Kind]
        EPSILON_GREEDY: _ClassVar[Exploration.Kind]
        SOFTMAX: _ClassVar[Exploration.Kind]
        SQUARECB: _ClassVar[Exploration.Kind]
        THOMPSON: _ClassVar[Exploration.Kind]
    KIND_UNSPECIFIED: Exploration.Kind
    GREEDY: Exploration.Kind
    EPSILON_GREEDY: Exploration.Kind
    SOFTMAX: Exploration.Kind
    SQUARECB: Exploration.Kind
    THOMPSON: Exploration.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DRAW_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DRAW_BIAS_FIELD_NUMBER: _ClassVar[int]
    kind: Exploration.Kind
    epsilon: float
    temperature: float
    gamma: float
    samples: int
    draw_weights: _containers.RepeatedScalarFieldContainer[float]
    draw_bias: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, kind: _Optional[_Union[Exploration.Kind, str]] = ..., epsilon: _Optional[float] = ..., temperature: _Optional[float] = ..., gamma: _Optional[float] = ..., samples: _Optional[int] = ..., draw_weights: _Optional[_Iterable[float]] = ..., draw_bias: _Optional[_Iterable[float]] = ...) -> None: ...

class Holdout(_message.Message):
    __slots__ = ("fraction", "salt", "default_action")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ACTION_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    salt: str
    default_action: str
    def __init__(self, fraction: _Optional[float] = ..., salt: _Optional[str] = ..., default_action: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("name", "version", "features", "actions", "linear", "shared", "exploration", "holdout", "created_at_unix_ms", "learning", "metadata", "mode", "rules", "caps", "checksum")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ONLINE: _ClassVar[Policy.Mode]
        APPRENTICE: _ClassVar[Policy.Mode]
    ONLINE: Policy.Mode
    APPRENTICE: Policy.Mode
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    CAPS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureSpec]
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    linear: LinearModel
    shared: SharedModel
    exploration: Exploration
    holdout: Holdout
    created_at_unix_ms: int
    learning: LearningSettings
    metadata: _containers.ScalarMap[str, str]
    mode: Policy.Mode
    rules: _containers.RepeatedCompositeFieldContainer[EligibilityRule]
    caps: _containers.RepeatedCompositeFieldContainer[Cap]
    checksum: bytes
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureSpec, _Mapping]]] = ..., actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., linear: _Optional[_Union[LinearModel, _Mapping]] = ..., shared: _Optional[_Union[SharedModel, _Mapping]] = ..., exploration: _Optional[_Union[Exploration, _Mapping]] = ..., holdout: _Optional[_Union[Holdout, _Mapping]] = ..., created_at_unix_ms: _Optional[int] = ..., learning: _Optional[_Union[LearningSettings, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., mode: _Optional[_Union[Policy.Mode, str]] = ..., rules: _Optional[_Iterable[_Union[EligibilityRule, _Mapping]]] = ..., caps: _Optional[_Iterable[_Union[Cap, _Mapping]]] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class LearningSettings(_message.Message):
    __slots__ = ("reward_window_seconds", "aggregation", "default_reward", "ridge_lambda", "retrain_every_events", "retrain_every_seconds", "reward", "promotion", "half_life_seconds", "half_life_rows", "detect_changes", "standardize_inputs", "center_rewards", "gamma_scale", "first_retrain_events", "window_seconds", "window_rows")
    class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        AGGREGATION_UNSPECIFIED: _ClassVar[LearningSettings.Aggregation]
        SUM: _ClassVar[LearningSettings.Aggregation]
        EARLIEST: _ClassVar[LearningSettings.Aggregation]
        FIRST: _ClassVar[LearningSettings.Aggregation]
    AGGREGATION_UNSPECIFIED: LearningSettings.Aggregation
    SUM: LearningSettings.Aggregation
    EARLIEST: LearningSettings.Aggregation
    FIRST: LearningSettings.Aggregation
    REWARD_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REWARD_FIELD_NUMBER: _ClassVar[int]
    RIDGE_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_EVERY_EVENTS_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FIELD_NUMBER: _ClassVar[int]
    HALF_LIFE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HALF_LIFE_ROWS_FIELD_NUMBER: _ClassVar[int]
    DETECT_CHANGES_FIELD_NUMBER: _ClassVar[int]
    STANDARDIZE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    CENTER_REWARDS_FIELD_NUMBER: _ClassVar[int]
    GAMMA_SCALE_FIELD_NUMBER: _ClassVar[int]
    FIRST_RETRAIN_EVENTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ROWS_FIELD_NUMBER: _ClassVar[int]
    reward_window_seconds: float
    aggregation: LearningSettings.Aggregation
    default_reward: float
    ridge_lambda: float
    retrain_every_events: int
    retrain_every_seconds: float
    reward: RewardDefinition
    promotion: PromotionRule
    half_life_seconds: float
    half_life_rows: int
    detect_changes: bool
    standardize_inputs: bool
    center_rewards: bool
    gamma_scale: float
    first_retrain_events: int
    window_seconds: float
    window_rows: int
    def __init__(self, reward_window_seconds: _Optional[float] = ..., aggregation: _Optional[_Union[LearningSettings.Aggregation, str]] = ..., default_reward: _Optional[float] = ..., ridge_lambda: _Optional[float] = ..., retrain_every_events: _Optional[int] = ..., retrain_every_seconds: _Optional[float] = ..., reward: _Optional[_Union[RewardDefinition, _Mapping]] = ..., promotion: _Optional[_Union[PromotionRule, _Mapping]] = ..., half_life_seconds: _Optional[float] = ..., half_life_rows: _Optional[int] = ..., detect_changes: _Optional[bool] = ..., standardize_inputs: _Optional[bool] = ..., center_rewards: _Optional[bool] = ..., gamma_scale: _Optional[float] = ..., first_retrain_events: _Optional[int] = ..., window_seconds: _Optional[float] = ..., window_rows: _Optional[int] = ...) -> None: ...

class RewardDefinition(_message.Message):
    __slots__ = ("outcome_weights", "other_weight", "cost_weight")
    class OutcomeWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OUTCOME_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OTHER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    outcome_weights: _containers.ScalarMap[str, float]
    other_weight: float
    cost_weight: float
    def __init__(self, outcome_weights: _Optional[_Mapping[str, float]] = ..., other_weight: _Optional[float] = ..., cost_weight: _Optional[float] = ...) -> None: ...

class PromotionRule(_message.Message):
    __slots__ = ("kind", "estimator", "level", "min_samples", "margin", "window_rows", "window_seconds", "interval", "min_effective_samples")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[PromotionRule.Kind]
        LOWER_BOUND_OVER_ESTIMATE: _ClassVar[PromotionRule.Kind]
        LOWER_BOUND_OVER_UPPER_BOUND: _ClassVar[PromotionRule.Kind]
        ALWAYS: _ClassVar[PromotionRule.Kind]
        SUPERIORITY: _ClassVar[PromotionRule.Kind]
        NON_INFERIORITY: _ClassVar[PromotionRule.Kind]
    KIND_UNSPECIFIED: PromotionRule.Kind
    LOWER_BOUND_OVER_ESTIMATE: PromotionRule.Kind
    LOWER_BOUND_OVER_UPPER_BOUND: PromotionRule.Kind
    ALWAYS: PromotionRule.Kind
    SUPERIORITY: PromotionRule.Kind
    NON_INFERIORITY: PromotionRule.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ROWS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MIN_EFFECTIVE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    kind: PromotionRule.Kind
    estimator: str
    level: float
    min_samples: int
    margin: float
    window_rows: int
    window_seconds: float
    interval: str
    min_effective_samples: int
    def __init__(self, kind: _Optional[_Union[PromotionRule.Kind, str]] = ..., estimator: _Optional[str] = ..., level: _Optional[float] = ..., min_samples: _Optional[int] = ..., margin: _Optional[float] = ..., window_rows: _Optional[int] = ..., window_seconds: _Optional[float] = ..., interval: _Optional[str] = ..., min_effective_samples: _Optional[int] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("attribute", "feature", "op", "values", "number", "when_missing")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[Condition.Op]
        IN: _ClassVar[Condition.Op]
        NOT_IN: _ClassVar[Condition.Op]
        IS_TRUE: _ClassVar[Condition.Op]
        IS_FALSE: _ClassVar[Condition.Op]
        EQ: _ClassVar[Condition.Op]
        NE: _ClassVar[Condition.Op]
        LT: _ClassVar[Condition.Op]
        LE: _ClassVar[Condition.Op]
        GT: _ClassVar[Condition.Op]
        GE: _ClassVar[Condition.Op]
    OP_UNSPECIFIED: Condition.Op
    IN: Condition.Op
    NOT_IN: Condition.Op
    IS_TRUE: Condition.Op
    IS_FALSE: Condition.Op
    EQ: Condition.Op
    NE: Condition.Op
    LT: Condition.Op
    LE: Condition.Op
    GT: Condition.Op
    GE: Condition.Op
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    WHEN_MISSING_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    feature: str
    op: Condition.Op
    values: _containers.RepeatedScalarFieldContainer[str]
    number: float
    when_missing: bool
    def __init__(self, attribute: _Optional[str] = ..., feature: _Optional[str] = ..., op: _Optional[_Union[Condition.Op, str]] = ..., values: _Optional[_Iterable[str]] = ..., number: _Optional[float] = ..., when_missing: _Optional[bool] = ...) -> None: ...

class EligibilityRule(_message.Message):
    __slots__ = ("id", "conditions", "effect", "tags", "actions")
    class Effect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        EFFECT_UNSPECIFIED: _ClassVar[EligibilityRule.Effect]
        BLOCK: _ClassVar[EligibilityRule.Effect]
        DEFAULT_ONLY: _ClassVar[EligibilityRule.Effect]
    EFFECT_UNSPECIFIED: EligibilityRule.Effect
    BLOCK: EligibilityRule.Effect
    DEFAULT_ONLY: EligibilityRule.Effect
    ID_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    effect: EligibilityRule.Effect
    tags: _containers.RepeatedScalarFieldContainer[str]
    actions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., effect: _Optional[_Union[EligibilityRule.Effect, str]] = ..., tags: _Optional[_Iterable[str]] = ..., actions: _Optional[_Iterable[str]] = ...) -> None: ...

class Cap(_message.Message):
    __slots__ = ("id", "kind", "limit", "window_seconds", "window_offset_seconds", "tags")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Cap.Kind]
        FREQUENCY: _ClassVar[Cap.Kind]
        BUDGET: _ClassVar[Cap.Kind]
    KIND_UNSPECIFIED: Cap.Kind
    FREQUENCY: Cap.Kind
    BUDGET: Cap.Kind
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_OFFSET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: Cap.Kind
    limit: float
    window_seconds: float
    window_offset_seconds: float
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[Cap.Kind, str]] = ..., limit: _Optional[float] = ..., window_seconds: _Optional[float] = ..., window_offset_seconds: _Optional[float] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...
