"""Python client for the LabelerService."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from circuits_core import wire
from circuits_core._proto.circuits.v1 import labeler_pb2, labeler_pb2_grpc
from circuits_sdk._channel import DEFAULT_TIMEOUT, call_unary, iterate_stream, open_channel
from circuits_core.investigation import InvestigationEvent
from circuits_core.schemas import LabelProgress, Unit


class LabelerClient:
    """``LabelerClient("host:port")``: label units, run the progressive labelling, read labels.

    Errors come back as the same :class:`circuits_core.errors.CircuitsError` classes the server raised.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str = "",
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, token=token, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)
        self._stub = labeler_pb2_grpc.LabelerServiceStub(self._channel)

    def label_units(
        self,
        units: Iterable[tuple[int, int]],
        *,
        label_pass: str = "output",
        allow_without_evidence: bool = False,
        timeout: float | None = None,
    ) -> tuple[list[Unit], list[str]]:
        """Label (layer, index) units now in one pass; return labelled units and failure lines.
        Units the server's evidence does not list are refused unless ``allow_without_evidence``."""
        request = labeler_pb2.LabelUnitsRequest(units=wire.unit_refs_to_proto(units), label_pass=label_pass,
                                                allow_without_evidence=allow_without_evidence)  # fmt: skip
        response = call_unary(self._stub.LabelUnits, request, timeout=timeout or self.timeout)
        return [wire.unit_from_proto(u) for u in response.units], list(response.failures)

    def run_progressive(
        self,
        *,
        passes: Sequence[str] = (),
        max_units: int = 0,
        retry_failed: bool = False,
        timeout: float | None = None,
    ) -> Iterator[LabelProgress]:
        """Stream progress of a progressive run; the last item is the final state.
        ``timeout`` bounds the whole run (None = no deadline)."""
        request = labeler_pb2.RunProgressiveRequest(passes=list(passes), max_units=max_units, retry_failed=retry_failed)
        stream = self._stub.RunProgressive(request, timeout=timeout)
        for msg in iterate_stream(stream):
            yield wire.label_progress_from_proto(msg)

    def investigate(
        self, layer: int, neuron: int, *, max_steps: int = 0, budget_usd: float = 0.0, resume: bool = False,
        timeout: float | None = None,
    ) -> Iterator[InvestigationEvent]:
        """Stream the events of a neuron investigation (the neuron scientist on the server); the last
        event (finished / stopped) carries the verdict and the report path on the server."""
        request = labeler_pb2.InvestigateRequest(unit=labeler_pb2.UnitRef(layer=layer, index=neuron), max_steps=max_steps,
                                                 budget_usd=budget_usd, resume=resume)
        stream = self._stub.Investigate(request, timeout=timeout)
        for msg in iterate_stream(stream):
            yield wire.investigation_event_from_proto(msg)

    def get_labels(self, units: Iterable[tuple[int, int]] = (), *, limit: int = 0) -> list[Unit]:
        """Stored labels (all labelled units when ``units`` is empty)."""
        request = labeler_pb2.GetLabelsRequest(units=wire.unit_refs_to_proto(units), limit=limit)
        response = call_unary(self._stub.GetLabels, request, timeout=self.timeout, idempotent=True)
        return [wire.unit_from_proto(u) for u in response.units]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LabelerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
