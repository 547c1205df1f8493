"""circuits server library: what the four services share to serve gRPC.

Server lifecycle, health and reflection, the error/metrics interceptor, TLS and bearer-token auth,
Prometheus metrics, graceful shutdown (:mod:`circuits_server.serving`) and the local process
supervisor behind ``circuits up`` (:mod:`circuits_server.localstack`). Depends on core only.
"""
