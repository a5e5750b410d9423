"""The gRPC metadata keys and HTTP header names InferenceHub's processes exchange, named once for every side of
the wire."""

REQUEST_ID_KEY = "x-request-id"  # the caller's request id, gateway -> replica, logged on both sides
REPLICA_KEY = "x-inferencehub-replica"  # the replica serving a call: in its trailers (and a stream's headers)
QUEUE_DEPTH_KEY = "x-inferencehub-queue-depth"  # requests waiting in a replica's queues, in ServerLive's trailers
# The replica's load as a serialized xds.data.orca.v3.OrcaLoadReport, in its trailing metadata; read by
# gRPC's weighted_round_robin policy (the name is gRPC's, fixed by the ORCA per-call protocol).
LOAD_REPORT_KEY = "endpoint-load-metrics-bin"

# HTTP headers of the gateway's API (its clients, the CLI and the OpenAPI document use the same names).
REQUEST_ID_HEADER = "X-Request-Id"  # the caller's request id, or a new one; sent back, and to the replica
DEADLINE_HEADER = "X-InferenceHub-Deadline-Ms"  # the deadline a client asks for its call
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor data extension: the JSON part's bytes
IDEMPOTENCY_HEADER = "Idempotency-Key"  # an async job's key: the same key names the same job
PREFER_HEADER = "Prefer"  # RFC 7240: respond-async (and wait=N) makes an infer request a job
PREFERENCE_APPLIED_HEADER = "Preference-Applied"  # the gateway queued the request as a job
