from circuits_core._proto.circuits.v1 import graph_pb2 as _graph_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EdgeDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDGE_DIRECTION_BOTH: _ClassVar[EdgeDirection]
    EDGE_DIRECTION_DOWNSTREAM: _ClassVar[EdgeDirection]
    EDGE_DIRECTION_UPSTREAM: _ClassVar[EdgeDirection]
EDGE_DIRECTION_BOTH: EdgeDirection
EDGE_DIRECTION_DOWNSTREAM: EdgeDirection
EDGE_DIRECTION_UPSTREAM: EdgeDirection

class SearchUnitsRequest(_message.Message):
    __slots__ = ("text", "limit", "min_score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    limit: int
    min_score: float
    def __init__(self, text: _Optional[str] = ..., limit: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class SearchUnitsResponse(_message.Message):
    __slots__ = ("units", "scores")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[_graph_pb2.Unit]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, units: _Optional[_Iterable[_Union[_graph_pb2.Unit, _Mapping]]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class GetUnitRequest(_message.Message):
    __slots__ = ("layer", "index")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class GetEdgesForUnitRequest(_message.Message):
    __slots__ = ("layer", "index", "direction", "limit", "min_count")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    direction: EdgeDirection
    limit: int
    min_count: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., direction: _Optional[_Union[EdgeDirection, str]] = ..., limit: _Optional[int] = ..., min_count: _Optional[int] = ...) -> None: ...

class GetEdgesForUnitResponse(_message.Message):
    __slots__ = ("edges",)
    EDGES_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[_graph_pb2.Edge]
    def __init__(self, edges: _Optional[_Iterable[_Union[_graph_pb2.Edge, _Mapping]]] = ...) -> None: ...

class GetClusterRequest(_message.Message):
    __slots__ = ("cluster", "limit")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    limit: int
    def __init__(self, cluster: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ClusterInfo(_message.Message):
    __slots__ = ("cluster_path", "level", "size", "layer_min", "layer_max", "median_layer")
    CLUSTER_PATH_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYER_MIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_MAX_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_LAYER_FIELD_NUMBER: _ClassVar[int]
    cluster_path: str
    level: int
    size: int
    layer_min: int
    layer_max: int
    median_layer: float
    def __init__(self, cluster_path: _Optional[str] = ..., level: _Optional[int] = ..., size: _Optional[int] = ..., layer_min: _Optional[int] = ..., layer_max: _Optional[int] = ..., median_layer: _Optional[float] = ...) -> None: ...

class GetClusterResponse(_message.Message):
    __slots__ = ("cluster", "units")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    cluster: ClusterInfo
    units: _containers.RepeatedCompositeFieldContainer[_graph_pb2.Unit]
    def __init__(self, cluster: _Optional[_Union[ClusterInfo, _Mapping]] = ..., units: _Optional[_Iterable[_Union[_graph_pb2.Unit, _Mapping]]] = ...) -> None: ...

class AtlasStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AtlasStats(_message.Message):
    __slots__ = ("neurons", "edges", "clusters", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    neurons: int
    edges: int
    clusters: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, neurons: _Optional[int] = ..., edges: _Optional[int] = ..., clusters: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UnitActivationStats(_message.Message):
    __slots__ = ("observation_count", "mean_activation", "max_activation", "mean_attribution", "output_norm", "num_exemplars")
    OBSERVATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    MEAN_ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NORM_FIELD_NUMBER: _ClassVar[int]
    NUM_EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    observation_count: int
    mean_activation: float
    max_activation: float
    mean_attribution: float
    output_norm: float
    num_exemplars: int
    def __init__(self, observation_count: _Optional[int] = ..., mean_activation: _Optional[float] = ..., max_activation: _Optional[float] = ..., mean_attribution: _Optional[float] = ..., output_norm: _Optional[float] = ..., num_exemplars: _Optional[int] = ...) -> None: ...

class UnitCard(_message.Message):
    __slots__ = ("unit", "stats", "cluster", "downstream_edges", "upstream_edges")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_EDGES_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_EDGES_FIELD_NUMBER: _ClassVar[int]
    unit: _graph_pb2.Unit
    stats: UnitActivationStats
    cluster: ClusterInfo
    downstream_edges: int
    upstream_edges: int
    def __init__(self, unit: _Optional[_Union[_graph_pb2.Unit, _Mapping]] = ..., stats: _Optional[_Union[UnitActivationStats, _Mapping]] = ..., cluster: _Optional[_Union[ClusterInfo, _Mapping]] = ..., downstream_edges: _Optional[int] = ..., upstream_edges: _Optional[int] = ...) -> None: ...

class GetUnitProjectionsRequest(_message.Message):
    __slots__ = ("layer", "index")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class TokenWeight(_message.Message):
    __slots__ = ("token_id", "token", "weight")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    weight: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class UnitProjections(_message.Message):
    __slots__ = ("layer", "index", "output_norm", "logit_effect", "promotes", "suppresses", "input_tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NORM_FIELD_NUMBER: _ClassVar[int]
    LOGIT_EFFECT_FIELD_NUMBER: _ClassVar[int]
    PROMOTES_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    output_norm: float
    logit_effect: float
    promotes: _containers.RepeatedCompositeFieldContainer[TokenWeight]
    suppresses: _containers.RepeatedCompositeFieldContainer[TokenWeight]
    input_tokens: _containers.RepeatedCompositeFieldContainer[TokenWeight]
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., output_norm: _Optional[float] = ..., logit_effect: _Optional[float] = ..., promotes: _Optional[_Iterable[_Union[TokenWeight, _Mapping]]] = ..., suppresses: _Optional[_Iterable[_Union[TokenWeight, _Mapping]]] = ..., input_tokens: _Optional[_Iterable[_Union[TokenWeight, _Mapping]]] = ...) -> None: ...

class GetWeightEdgesRequest(_message.Message):
    __slots__ = ("layer", "index", "direction", "limit", "polarity")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    POLARITY_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    direction: EdgeDirection
    limit: int
    polarity: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., direction: _Optional[_Union[EdgeDirection, str]] = ..., limit: _Optional[int] = ..., polarity: _Optional[int] = ...) -> None: ...

class WeightEdge(_message.Message):
    __slots__ = ("src_layer", "src_index", "tgt_layer", "tgt_index", "polarity", "c_up", "c_gate", "strength")
    SRC_LAYER_FIELD_NUMBER: _ClassVar[int]
    SRC_INDEX_FIELD_NUMBER: _ClassVar[int]
    TGT_LAYER_FIELD_NUMBER: _ClassVar[int]
    TGT_INDEX_FIELD_NUMBER: _ClassVar[int]
    POLARITY_FIELD_NUMBER: _ClassVar[int]
    C_UP_FIELD_NUMBER: _ClassVar[int]
    C_GATE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    src_layer: int
    src_index: int
    tgt_layer: int
    tgt_index: int
    polarity: int
    c_up: float
    c_gate: float
    strength: float
    def __init__(self, src_layer: _Optional[int] = ..., src_index: _Optional[int] = ..., tgt_layer: _Optional[int] = ..., tgt_index: _Optional[int] = ..., polarity: _Optional[int] = ..., c_up: _Optional[float] = ..., c_gate: _Optional[float] = ..., strength: _Optional[float] = ...) -> None: ...

class GetWeightEdgesResponse(_message.Message):
    __slots__ = ("edges",)
    EDGES_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[WeightEdge]
    def __init__(self, edges: _Optional[_Iterable[_Union[WeightEdge, _Mapping]]] = ...) -> None: ...
