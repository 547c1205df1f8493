from circuits_core._proto.circuits.v1 import graph_pb2 as _graph_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UnitRef(_message.Message):
    __slots__ = ("layer", "index")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class LabelUnitsRequest(_message.Message):
    __slots__ = ("units", "label_pass", "allow_without_evidence")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    LABEL_PASS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_WITHOUT_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[UnitRef]
    label_pass: str
    allow_without_evidence: bool
    def __init__(self, units: _Optional[_Iterable[_Union[UnitRef, _Mapping]]] = ..., label_pass: _Optional[str] = ..., allow_without_evidence: _Optional[bool] = ...) -> None: ...

class LabelUnitsResponse(_message.Message):
    __slots__ = ("units", "failures")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[_graph_pb2.Unit]
    failures: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, units: _Optional[_Iterable[_Union[_graph_pb2.Unit, _Mapping]]] = ..., failures: _Optional[_Iterable[str]] = ...) -> None: ...

class RunProgressiveRequest(_message.Message):
    __slots__ = ("passes", "max_units", "retry_failed")
    PASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_UNITS_FIELD_NUMBER: _ClassVar[int]
    RETRY_FAILED_FIELD_NUMBER: _ClassVar[int]
    passes: _containers.RepeatedScalarFieldContainer[str]
    max_units: int
    retry_failed: bool
    def __init__(self, passes: _Optional[_Iterable[str]] = ..., max_units: _Optional[int] = ..., retry_failed: _Optional[bool] = ...) -> None: ...

class LabelProgress(_message.Message):
    __slots__ = ("label_pass", "layer", "done", "total", "cached", "failed", "input_tokens", "output_tokens", "spend_usd", "state", "message", "requests", "retries", "labelled")
    LABEL_PASS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEND_USD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    label_pass: str
    layer: int
    done: int
    total: int
    cached: int
    failed: int
    input_tokens: int
    output_tokens: int
    spend_usd: float
    state: str
    message: str
    requests: int
    retries: int
    labelled: int
    def __init__(self, label_pass: _Optional[str] = ..., layer: _Optional[int] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., cached: _Optional[int] = ..., failed: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., spend_usd: _Optional[float] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., requests: _Optional[int] = ..., retries: _Optional[int] = ..., labelled: _Optional[int] = ...) -> None: ...

class GetLabelsRequest(_message.Message):
    __slots__ = ("units", "limit")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[UnitRef]
    limit: int
    def __init__(self, units: _Optional[_Iterable[_Union[UnitRef, _Mapping]]] = ..., limit: _Optional[int] = ...) -> None: ...

class GetLabelsResponse(_message.Message):
    __slots__ = ("units",)
    UNITS_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[_graph_pb2.Unit]
    def __init__(self, units: _Optional[_Iterable[_Union[_graph_pb2.Unit, _Mapping]]] = ...) -> None: ...

class InvestigateRequest(_message.Message):
    __slots__ = ("unit", "max_steps", "budget_usd", "resume")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    unit: UnitRef
    max_steps: int
    budget_usd: float
    resume: bool
    def __init__(self, unit: _Optional[_Union[UnitRef, _Mapping]] = ..., max_steps: _Optional[int] = ..., budget_usd: _Optional[float] = ..., resume: _Optional[bool] = ...) -> None: ...

class InvestigationEvent(_message.Message):
    __slots__ = ("kind", "step", "message", "tool", "ok", "status", "label", "confidence", "predictions_correct", "predictions_total", "report_path", "spend_usd")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_CORRECT_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    SPEND_USD_FIELD_NUMBER: _ClassVar[int]
    kind: str
    step: int
    message: str
    tool: str
    ok: bool
    status: str
    label: str
    confidence: str
    predictions_correct: int
    predictions_total: int
    report_path: str
    spend_usd: float
    def __init__(self, kind: _Optional[str] = ..., step: _Optional[int] = ..., message: _Optional[str] = ..., tool: _Optional[str] = ..., ok: _Optional[bool] = ..., status: _Optional[str] = ..., label: _Optional[str] = ..., confidence: _Optional[str] = ..., predictions_correct: _Optional[int] = ..., predictions_total: _Optional[int] = ..., report_path: _Optional[str] = ..., spend_usd: _Optional[float] = ...) -> None: ...
