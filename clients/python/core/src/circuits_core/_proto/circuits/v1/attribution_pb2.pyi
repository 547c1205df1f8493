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
    __slots__ = ("prompt", "target", "raw", "answer_prefix", "target_position", "tau", "max_nodes", "corpus_index", "slug", "over_max_nodes")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TARGET_POSITION_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    CORPUS_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    OVER_MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: TraceTarget
    raw: bool
    answer_prefix: str
    target_position: int
    tau: float
    max_nodes: int
    corpus_index: int
    slug: str
    over_max_nodes: str
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[_Union[TraceTarget, _Mapping]] = ..., raw: _Optional[bool] = ..., answer_prefix: _Optional[str] = ..., target_position: _Optional[int] = ..., tau: _Optional[float] = ..., max_nodes: _Optional[int] = ..., corpus_index: _Optional[int] = ..., slug: _Optional[str] = ..., over_max_nodes: _Optional[str] = ...) -> None: ...

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

class NeuronRef(_message.Message):
    __slots__ = ("layer", "index")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class GetActivationsRequest(_message.Message):
    __slots__ = ("prompts", "neurons", "chat_template", "answer_prefix")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    neurons: _containers.RepeatedCompositeFieldContainer[NeuronRef]
    chat_template: bool
    answer_prefix: str
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., neurons: _Optional[_Iterable[_Union[NeuronRef, _Mapping]]] = ..., chat_template: _Optional[bool] = ..., answer_prefix: _Optional[str] = ...) -> None: ...

class NeuronActivations(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class PromptActivations(_message.Message):
    __slots__ = ("prompt", "tokens", "neurons", "special_positions")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    neurons: _containers.RepeatedCompositeFieldContainer[NeuronActivations]
    special_positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., neurons: _Optional[_Iterable[_Union[NeuronActivations, _Mapping]]] = ..., special_positions: _Optional[_Iterable[int]] = ...) -> None: ...

class GetActivationsResponse(_message.Message):
    __slots__ = ("prompts",)
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[PromptActivations]
    def __init__(self, prompts: _Optional[_Iterable[_Union[PromptActivations, _Mapping]]] = ...) -> None: ...

class PatchNeuron(_message.Message):
    __slots__ = ("layer", "index", "position")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    position: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., position: _Optional[int] = ...) -> None: ...

class PatchRequest(_message.Message):
    __slots__ = ("clean_prompt", "corrupt_prompt", "neurons", "top", "target_tokens", "raw", "answer_prefix")
    CLEAN_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    clean_prompt: str
    corrupt_prompt: str
    neurons: _containers.RepeatedCompositeFieldContainer[PatchNeuron]
    top: int
    target_tokens: _containers.RepeatedScalarFieldContainer[str]
    raw: bool
    answer_prefix: str
    def __init__(self, clean_prompt: _Optional[str] = ..., corrupt_prompt: _Optional[str] = ..., neurons: _Optional[_Iterable[_Union[PatchNeuron, _Mapping]]] = ..., top: _Optional[int] = ..., target_tokens: _Optional[_Iterable[str]] = ..., raw: _Optional[bool] = ..., answer_prefix: _Optional[str] = ...) -> None: ...

class NeuronPatchEffect(_message.Message):
    __slots__ = ("layer", "index", "position", "clean_activation", "corrupt_activation", "relp", "predicted", "noising", "denoising")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    RELP_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    NOISING_FIELD_NUMBER: _ClassVar[int]
    DENOISING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    position: int
    clean_activation: float
    corrupt_activation: float
    relp: float
    predicted: float
    noising: float
    denoising: float
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., position: _Optional[int] = ..., clean_activation: _Optional[float] = ..., corrupt_activation: _Optional[float] = ..., relp: _Optional[float] = ..., predicted: _Optional[float] = ..., noising: _Optional[float] = ..., denoising: _Optional[float] = ...) -> None: ...

class PatchResponse(_message.Message):
    __slots__ = ("clean_tokens", "corrupt_tokens", "metric", "positive_token", "positive_token_id", "negative_token", "negative_token_id", "clean_metric", "corrupt_metric", "neurons", "set_noising", "set_denoising", "set_predicted", "rank_correlation", "magnitude_rank_correlation", "compared", "first_difference")
    CLEAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CLEAN_METRIC_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_METRIC_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    SET_NOISING_FIELD_NUMBER: _ClassVar[int]
    SET_DENOISING_FIELD_NUMBER: _ClassVar[int]
    SET_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    RANK_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    MAGNITUDE_RANK_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    FIRST_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    clean_tokens: _containers.RepeatedScalarFieldContainer[str]
    corrupt_tokens: _containers.RepeatedScalarFieldContainer[str]
    metric: str
    positive_token: str
    positive_token_id: int
    negative_token: str
    negative_token_id: int
    clean_metric: float
    corrupt_metric: float
    neurons: _containers.RepeatedCompositeFieldContainer[NeuronPatchEffect]
    set_noising: float
    set_denoising: float
    set_predicted: float
    rank_correlation: float
    magnitude_rank_correlation: float
    compared: int
    first_difference: int
    def __init__(self, clean_tokens: _Optional[_Iterable[str]] = ..., corrupt_tokens: _Optional[_Iterable[str]] = ..., metric: _Optional[str] = ..., positive_token: _Optional[str] = ..., positive_token_id: _Optional[int] = ..., negative_token: _Optional[str] = ..., negative_token_id: _Optional[int] = ..., clean_metric: _Optional[float] = ..., corrupt_metric: _Optional[float] = ..., neurons: _Optional[_Iterable[_Union[NeuronPatchEffect, _Mapping]]] = ..., set_noising: _Optional[float] = ..., set_denoising: _Optional[float] = ..., set_predicted: _Optional[float] = ..., rank_correlation: _Optional[float] = ..., magnitude_rank_correlation: _Optional[float] = ..., compared: _Optional[int] = ..., first_difference: _Optional[int] = ...) -> None: ...
