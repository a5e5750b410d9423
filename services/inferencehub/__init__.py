"""InferenceHub: an HTTP gateway and gRPC inference replicas speaking the Open Inference Protocol."""

__version__ = "0.1.0"
