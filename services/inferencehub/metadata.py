"""The gRPC metadata keys InferenceHub's processes exchange, named once for every side of the wire."""

REQUEST_ID_KEY = "x-request-id"  # the caller's request id, gateway -> replica, logged on both sides
REPLICA_KEY = "x-inferencehub-replica"  # the replica that served a call, in its trailing metadata
QUEUE_DEPTH_KEY = "x-inferencehub-queue-depth"  # requests waiting in a replica's queues, in ServerLive's trailers
