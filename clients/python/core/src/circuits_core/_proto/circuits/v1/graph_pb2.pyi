from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UnitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNIT_KIND_UNSPECIFIED: _ClassVar[UnitKind]
    UNIT_KIND_NEURON: _ClassVar[UnitKind]
    UNIT_KIND_EMBEDDING: _ClassVar[UnitKind]
    UNIT_KIND_LOGIT: _ClassVar[UnitKind]
UNIT_KIND_UNSPECIFIED: UnitKind
UNIT_KIND_NEURON: UnitKind
UNIT_KIND_EMBEDDING: UnitKind
UNIT_KIND_LOGIT: UnitKind

class UnitLabel(_message.Message):
    __slots__ = ("text", "source", "confidence", "description", "score_detection", "score_simulation", "score_contexts", "score_positives")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_DETECTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_SIMULATION_FIELD_NUMBER: _ClassVar[int]
    SCORE_CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    text: str
    source: str
    confidence: str
    description: str
    score_detection: float
    score_simulation: float
    score_contexts: int
    score_positives: int
    def __init__(self, text: _Optional[str] = ..., source: _Optional[str] = ..., confidence: _Optional[str] = ..., description: _Optional[str] = ..., score_detection: _Optional[float] = ..., score_simulation: _Optional[float] = ..., score_contexts: _Optional[int] = ..., score_positives: _Optional[int] = ...) -> None: ...

class Unit(_message.Message):
    __slots__ = ("layer", "index", "position", "kind", "label", "input_label", "activation", "attribution", "token", "probability", "appearance_count", "labels", "cluster")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_LABEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    APPEARANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    position: int
    kind: UnitKind
    label: str
    input_label: str
    activation: float
    attribution: float
    token: str
    probability: float
    appearance_count: int
    labels: _containers.RepeatedCompositeFieldContainer[UnitLabel]
    cluster: str
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., position: _Optional[int] = ..., kind: _Optional[_Union[UnitKind, str]] = ..., label: _Optional[str] = ..., input_label: _Optional[str] = ..., activation: _Optional[float] = ..., attribution: _Optional[float] = ..., token: _Optional[str] = ..., probability: _Optional[float] = ..., appearance_count: _Optional[int] = ..., labels: _Optional[_Iterable[_Union[UnitLabel, _Mapping]]] = ..., cluster: _Optional[str] = ...) -> None: ...

class EdgeTable(_message.Message):
    __slots__ = ("src", "tgt", "weight", "raw_weight")
    SRC_FIELD_NUMBER: _ClassVar[int]
    TGT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RAW_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    src: _containers.RepeatedScalarFieldContainer[int]
    tgt: _containers.RepeatedScalarFieldContainer[int]
    weight: _containers.RepeatedScalarFieldContainer[float]
    raw_weight: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, src: _Optional[_Iterable[int]] = ..., tgt: _Optional[_Iterable[int]] = ..., weight: _Optional[_Iterable[float]] = ..., raw_weight: _Optional[_Iterable[float]] = ...) -> None: ...

class Edge(_message.Message):
    __slots__ = ("src_layer", "src_index", "tgt_layer", "tgt_index", "weight", "src_position", "tgt_position", "count", "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max", "raw_weight", "method")
    SRC_LAYER_FIELD_NUMBER: _ClassVar[int]
    SRC_INDEX_FIELD_NUMBER: _ClassVar[int]
    TGT_LAYER_FIELD_NUMBER: _ClassVar[int]
    TGT_INDEX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SRC_POSITION_FIELD_NUMBER: _ClassVar[int]
    TGT_POSITION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_ABS_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SQ_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MAX_FIELD_NUMBER: _ClassVar[int]
    RAW_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    src_layer: int
    src_index: int
    tgt_layer: int
    tgt_index: int
    weight: float
    src_position: int
    tgt_position: int
    count: int
    weight_sum: float
    weight_abs_sum: float
    weight_sq_sum: float
    weight_min: float
    weight_max: float
    raw_weight: float
    method: str
    def __init__(self, src_layer: _Optional[int] = ..., src_index: _Optional[int] = ..., tgt_layer: _Optional[int] = ..., tgt_index: _Optional[int] = ..., weight: _Optional[float] = ..., src_position: _Optional[int] = ..., tgt_position: _Optional[int] = ..., count: _Optional[int] = ..., weight_sum: _Optional[float] = ..., weight_abs_sum: _Optional[float] = ..., weight_sq_sum: _Optional[float] = ..., weight_min: _Optional[float] = ..., weight_max: _Optional[float] = ..., raw_weight: _Optional[float] = ..., method: _Optional[str] = ...) -> None: ...

class GraphMetadata(_message.Message):
    __slots__ = ("slug", "scan", "target_position", "node_threshold", "metric_value", "nodes_exceeded", "max_n_logits", "create_time_ms", "generator", "generator_version", "extra_json", "corpus_index")
    SLUG_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    TARGET_POSITION_FIELD_NUMBER: _ClassVar[int]
    NODE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    METRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    NODES_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    MAX_N_LOGITS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    CORPUS_INDEX_FIELD_NUMBER: _ClassVar[int]
    slug: str
    scan: str
    target_position: int
    node_threshold: float
    metric_value: float
    nodes_exceeded: bool
    max_n_logits: int
    create_time_ms: int
    generator: str
    generator_version: str
    extra_json: str
    corpus_index: int
    def __init__(self, slug: _Optional[str] = ..., scan: _Optional[str] = ..., target_position: _Optional[int] = ..., node_threshold: _Optional[float] = ..., metric_value: _Optional[float] = ..., nodes_exceeded: _Optional[bool] = ..., max_n_logits: _Optional[int] = ..., create_time_ms: _Optional[int] = ..., generator: _Optional[str] = ..., generator_version: _Optional[str] = ..., extra_json: _Optional[str] = ..., corpus_index: _Optional[int] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("graph_id", "model", "prompt", "prompt_tokens", "units", "edges", "metadata")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    model: str
    prompt: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[str]
    units: _containers.RepeatedCompositeFieldContainer[Unit]
    edges: EdgeTable
    metadata: GraphMetadata
    def __init__(self, graph_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[str]] = ..., units: _Optional[_Iterable[_Union[Unit, _Mapping]]] = ..., edges: _Optional[_Union[EdgeTable, _Mapping]] = ..., metadata: _Optional[_Union[GraphMetadata, _Mapping]] = ...) -> None: ...
