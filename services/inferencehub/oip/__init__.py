"""The transport-free core of the Open Inference Protocol, under every front door.

- ``signature``: a model's tensor specs and the one check of a request against them (the replica, the gateway's
  job queue and the client refuse the same requests with the same words);
- ``codec``: ``ModelInferRequest`` inputs -> numpy, numpy outputs -> ``ModelInferResponse`` (the replica's
  synchronous calls and its jobs);
- ``coalescing``: which requests may travel as one call, merging them, and splitting the answer by rows;
- ``plan``: which outputs go back as binary data (the REST codec, and a job's record).

Nothing here opens a socket, starts a task or imports grpc's transport: the gRPC servicer, the REST routes, the
job queue and the client convert and delegate.
"""
