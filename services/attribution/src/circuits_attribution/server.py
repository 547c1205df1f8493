"""Wires the attribution gRPC server: runner + servicer + shared plumbing + metrics.

``build_server(settings, engine)`` returns an :class:`AttributionServer` (not started).
With ``engine=None`` the server starts NOT_SERVING and answers UNAVAILABLE until
:meth:`AttributionServer.load` attaches an engine (``__main__`` loads the model after the port is
open so health probes see the loading state).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from circuits_core.limits import DEFAULT_LIMITS
from circuits_core.schemas import Graph
from circuits_server.serving import GrpcServer, Metrics, ServerSettings, build_grpc_server

from circuits_attribution.service import AttributionEngine, AttributionRunner

SERVICE_NAME = "circuits.v1.AttributionService"


@dataclass(frozen=True, slots=True, kw_only=True)
class AttributionSettings:
    """Settings of one attribution server. Field comments are the CLI help."""

    server: ServerSettings = field(default_factory=ServerSettings)
    #: Model id or local checkpoint directory.
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    #: float32 | bfloat16 | float16 | float64
    dtype: str = "float32"
    #: cpu | cuda | cuda:N
    device: str = "cpu"
    #: Traces running at once (engine replicas sharing one copy of the weights).
    max_concurrent: int = 1
    #: Requests allowed to wait for a free engine; more are refused with RESOURCE_EXHAUSTED.
    max_queue: int = 8
    #: Most trace requests an engine traces together as one batch (1: no batching). A batched
    #: graph equals the request's single trace up to float rounding (float32 node sets can differ
    #: at the tau margin), so the default keeps graphs bit-for-bit reproducible.
    max_batch: int = 1
    #: Milliseconds a batch waits for more requests after its first one arrived.
    batch_window_ms: float = 10.0
    #: Most top logits (k) one trace request may combine; INVALID_ARGUMENT beyond (0 = no cap).
    max_k: int = DEFAULT_LIMITS.max_k


class AttributionMetrics:
    """Service metrics on the server's registry: queue depth, running traces, graph sizes, GPU memory."""

    def __init__(self, metrics: Metrics, *, track_cuda: bool = False) -> None:
        from prometheus_client import Gauge, Histogram

        registry = metrics.registry
        self.queue_depth = Gauge(
            "circuits_attribution_queue_depth", "Requests waiting for a free engine", registry=registry
        )
        self.running = Gauge("circuits_attribution_running", "Traces running now", registry=registry)
        sizes = (1, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
        self.nodes = Histogram(
            "circuits_attribution_graph_nodes", "Units per traced graph", registry=registry, buckets=sizes
        )
        self.edges = Histogram(
            "circuits_attribution_graph_edges", "Edges per traced graph", registry=registry, buckets=sizes
        )
        self.trace_seconds = Histogram(
            "circuits_attribution_trace_seconds",
            "Engine time per trace (queueing excluded; a batched trace counts its batch's time)",
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.batch_size = Histogram(
            "circuits_attribution_batch_size",
            "Trace requests per engine batch",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        if track_cuda:
            import torch

            gauge = Gauge(
                "circuits_attribution_gpu_memory_bytes",
                "CUDA memory held by tensors on the current device",
                ["kind"],
                registry=registry,
            )
            gauge.labels("allocated").set_function(lambda: float(torch.cuda.memory_allocated()))
            gauge.labels("reserved").set_function(lambda: float(torch.cuda.memory_reserved()))
            gauge.labels("max_allocated").set_function(lambda: float(torch.cuda.max_memory_allocated()))

    def on_load(self, *, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def on_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def on_graph(self, graph: Graph, *, seconds: float) -> None:
        self.nodes.observe(len(graph.units))
        self.edges.observe(len(graph.edge_table))
        self.trace_seconds.observe(seconds)


@dataclass
class AttributionServer:
    """A built attribution server: the gRPC plumbing plus the runner it serves."""

    grpc: GrpcServer
    runner: AttributionRunner
    settings: AttributionSettings
    metrics: AttributionMetrics

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def address(self) -> str:
        return self.grpc.address

    def start(self) -> AttributionServer:
        self.grpc.start()
        return self

    def load(self, engine: AttributionEngine) -> None:
        """Attach an engine (replicated to max_concurrent) and report SERVING."""
        self.runner.attach(engine)
        self.grpc.set_serving(True)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, finish in-flight traces for ``grace`` seconds, stop the rest, close."""
        self.grpc.stop(grace)

    def wait(self) -> None:
        self.grpc.wait()


def build_server(settings: AttributionSettings, engine: AttributionEngine | None = None) -> AttributionServer:
    """Build (not start) the server; with an engine it is SERVING once started."""
    from circuits_core._proto.circuits.v1 import attribution_pb2_grpc

    from circuits_attribution.servicer import AttributionServicer

    metrics = Metrics("AttributionService")
    service_metrics = AttributionMetrics(metrics, track_cuda=settings.device.startswith("cuda"))
    runner = AttributionRunner(
        max_concurrent=settings.max_concurrent, max_queue=settings.max_queue, max_batch=settings.max_batch,
        batch_window_s=settings.batch_window_ms / 1000.0, observer=service_metrics,
        max_nodes_per_graph=settings.server.max_nodes_per_graph, max_k=settings.max_k,
    )
    servicer = AttributionServicer(runner)
    # Queued requests hold a handler thread while they wait; keep spare threads so the queue
    # bound (not the thread pool) decides, and health checks/GetModelInfo always get a thread.
    needed = settings.max_concurrent * settings.max_batch + settings.max_queue + 4
    server_settings = settings.server
    if server_settings.max_workers < needed:
        server_settings = dataclasses.replace(server_settings, max_workers=needed)
    grpc_server = build_grpc_server(
        settings=server_settings,
        service_names=[SERVICE_NAME],
        add_servicers=lambda server: attribution_pb2_grpc.add_AttributionServiceServicer_to_server(servicer, server),
        metrics=metrics,
    )
    handle = AttributionServer(grpc=grpc_server, runner=runner, settings=settings, metrics=service_metrics)
    # grpc's stop(grace) already waited `grace` for in-flight RPCs and then cancelled them; the
    # runner's close stops any trace still on an engine (checked per decoder layer).
    grpc_server.on_stop.append(lambda: runner.close(grace=0.0))
    if engine is not None:
        handle.load(engine)
    return handle
