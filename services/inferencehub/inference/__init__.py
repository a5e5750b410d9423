"""The inference service: a grpc.aio server speaking the Open Inference Protocol."""
