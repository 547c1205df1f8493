from circuits_core._proto.circuits.v1 import graph_pb2 as _graph_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TraceTarget(_message.Message):
    __slots__ = ("k", "target_tokens", "contrastive_positive", "contrastive_negative")
    K_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTRASTIVE_POSITIVE_FIELD_NUMBER: _ClassVar[int]
    CONTRASTIVE_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    k: int
    target_tokens: _containers.RepeatedScalarFieldContainer[str]
    contrastive_positive: str
    contrastive_negative: str
    def __init__(self, k: _Optional[int] = ..., target_tokens: _Optional[_Iterable[str]] = ..., contrastive_positive: _Optional[str] = ..., contrastive_negative: _Optional[str] = ...) -> None: ...

class TraceRequest(_message.Message):
    __slots__ = ("prompt", "target", "raw", "answer_prefix", "target_position", "tau", "max_nodes", "corpus_index", "slug")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TARGET_POSITION_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    CORPUS_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: TraceTarget
    raw: bool
    answer_prefix: str
    target_position: int
    tau: float
    max_nodes: int
    corpus_index: int
    slug: str
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[_Union[TraceTarget, _Mapping]] = ..., raw: _Optional[bool] = ..., answer_prefix: _Optional[str] = ..., target_position: _Optional[int] = ..., tau: _Optional[float] = ..., max_nodes: _Optional[int] = ..., corpus_index: _Optional[int] = ..., slug: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "num_layers", "d_model", "d_mlp", "vocab_size", "max_context", "dtype", "device", "architecture")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    D_MLP_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    max_context: int
    dtype: str
    device: str
    architecture: str
    def __init__(self, model: _Optional[str] = ..., num_layers: _Optional[int] = ..., d_model: _Optional[int] = ..., d_mlp: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., architecture: _Optional[str] = ...) -> None: ...

class NeuronIntervention(_message.Message):
    __slots__ = ("layer", "index", "positions", "mode", "value", "include_generated")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[NeuronIntervention.Mode]
        MODE_SET: _ClassVar[NeuronIntervention.Mode]
        MODE_SCALE: _ClassVar[NeuronIntervention.Mode]
        MODE_ZERO: _ClassVar[NeuronIntervention.Mode]
        MODE_MEAN: _ClassVar[NeuronIntervention.Mode]
    MODE_UNSPECIFIED: NeuronIntervention.Mode
    MODE_SET: NeuronIntervention.Mode
    MODE_SCALE: NeuronIntervention.Mode
    MODE_ZERO: NeuronIntervention.Mode
    MODE_MEAN: NeuronIntervention.Mode
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GENERATED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    mode: NeuronIntervention.Mode
    value: float
    include_generated: bool
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[NeuronIntervention.Mode, str]] = ..., value: _Optional[float] = ..., include_generated: _Optional[bool] = ...) -> None: ...

class InterveneRequest(_message.Message):
    __slots__ = ("prompt", "raw", "answer_prefix", "interventions", "top_k", "generate_tokens")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    GENERATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    raw: bool
    answer_prefix: str
    interventions: _containers.RepeatedCompositeFieldContainer[NeuronIntervention]
    top_k: int
    generate_tokens: int
    def __init__(self, prompt: _Optional[str] = ..., raw: _Optional[bool] = ..., answer_prefix: _Optional[str] = ..., interventions: _Optional[_Iterable[_Union[NeuronIntervention, _Mapping]]] = ..., top_k: _Optional[int] = ..., generate_tokens: _Optional[int] = ...) -> None: ...

class TokenProbability(_message.Message):
    __slots__ = ("token", "token_id", "logit", "probability")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    logit: float
    probability: float
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., logit: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class InterveneResponse(_message.Message):
    __slots__ = ("baseline", "intervened", "generated_text", "baseline_text", "prompt_tokens", "position", "tracked")
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    INTERVENED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TEXT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TRACKED_FIELD_NUMBER: _ClassVar[int]
    baseline: _containers.RepeatedCompositeFieldContainer[TokenProbability]
    intervened: _containers.RepeatedCompositeFieldContainer[TokenProbability]
    generated_text: str
    baseline_text: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[str]
    position: int
    tracked: _containers.RepeatedCompositeFieldContainer[TokenProbability]
    def __init__(self, baseline: _Optional[_Iterable[_Union[TokenProbability, _Mapping]]] = ..., intervened: _Optional[_Iterable[_Union[TokenProbability, _Mapping]]] = ..., generated_text: _Optional[str] = ..., baseline_text: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[str]] = ..., position: _Optional[int] = ..., tracked: _Optional[_Iterable[_Union[TokenProbability, _Mapping]]] = ...) -> None: ...
