"""The gateway: an aiohttp HTTP/JSON front door proxying the Open Inference Protocol to gRPC replicas."""
