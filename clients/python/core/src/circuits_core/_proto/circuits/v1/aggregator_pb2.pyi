from circuits_core._proto.circuits.v1 import graph_pb2 as _graph_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestAck(_message.Message):
    __slots__ = ("graph_ids", "duplicates", "graphs_total", "rejected_graph_ids", "conflict_graph_ids")
    GRAPH_IDS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_GRAPH_IDS_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_GRAPH_IDS_FIELD_NUMBER: _ClassVar[int]
    graph_ids: _containers.RepeatedScalarFieldContainer[str]
    duplicates: int
    graphs_total: int
    rejected_graph_ids: _containers.RepeatedScalarFieldContainer[str]
    conflict_graph_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, graph_ids: _Optional[_Iterable[str]] = ..., duplicates: _Optional[int] = ..., graphs_total: _Optional[int] = ..., rejected_graph_ids: _Optional[_Iterable[str]] = ..., conflict_graph_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEdgesRequest(_message.Message):
    __slots__ = ("min_count", "limit", "batch_size")
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    min_count: int
    limit: int
    batch_size: int
    def __init__(self, min_count: _Optional[int] = ..., limit: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class EdgeBatch(_message.Message):
    __slots__ = ("src_layer", "src_index", "tgt_layer", "tgt_index", "count", "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max")
    SRC_LAYER_FIELD_NUMBER: _ClassVar[int]
    SRC_INDEX_FIELD_NUMBER: _ClassVar[int]
    TGT_LAYER_FIELD_NUMBER: _ClassVar[int]
    TGT_INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_ABS_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SQ_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MAX_FIELD_NUMBER: _ClassVar[int]
    src_layer: _containers.RepeatedScalarFieldContainer[int]
    src_index: _containers.RepeatedScalarFieldContainer[int]
    tgt_layer: _containers.RepeatedScalarFieldContainer[int]
    tgt_index: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[int]
    weight_sum: _containers.RepeatedScalarFieldContainer[float]
    weight_abs_sum: _containers.RepeatedScalarFieldContainer[float]
    weight_sq_sum: _containers.RepeatedScalarFieldContainer[float]
    weight_min: _containers.RepeatedScalarFieldContainer[float]
    weight_max: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, src_layer: _Optional[_Iterable[int]] = ..., src_index: _Optional[_Iterable[int]] = ..., tgt_layer: _Optional[_Iterable[int]] = ..., tgt_index: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[int]] = ..., weight_sum: _Optional[_Iterable[float]] = ..., weight_abs_sum: _Optional[_Iterable[float]] = ..., weight_sq_sum: _Optional[_Iterable[float]] = ..., weight_min: _Optional[_Iterable[float]] = ..., weight_max: _Optional[_Iterable[float]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AggregatorStats(_message.Message):
    __slots__ = ("graphs_processed", "total_edge_observations", "distinct_edges", "distinct_units", "shard_index", "shard_count")
    GRAPHS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EDGE_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_EDGES_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_UNITS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    graphs_processed: int
    total_edge_observations: int
    distinct_edges: int
    distinct_units: int
    shard_index: int
    shard_count: int
    def __init__(self, graphs_processed: _Optional[int] = ..., total_edge_observations: _Optional[int] = ..., distinct_edges: _Optional[int] = ..., distinct_units: _Optional[int] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("directory", "min_count")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    directory: str
    min_count: int
    def __init__(self, directory: _Optional[str] = ..., min_count: _Optional[int] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("files", "stats")
    FILES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    stats: AggregatorStats
    def __init__(self, files: _Optional[_Iterable[str]] = ..., stats: _Optional[_Union[AggregatorStats, _Mapping]] = ...) -> None: ...
