"""Drive InferenceHub with the stock kserve SDK. Runs in the kserve environment (scripts/install_tools.py):

python tests/system/clients/kserve_client.py GATEWAY_URL REPLICA_TARGET
"""

import asyncio
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

SAMPLES = np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32)


def request(binary: bool) -> InferRequest:
    features = InferInput(name="features", shape=list(SAMPLES.shape), datatype="FP32")
    features.set_data_from_numpy(SAMPLES, binary_data=binary)
    return InferRequest(model_name="iris", infer_inputs=[features])


def labels(response) -> list[int]:
    return {o.name: o for o in response.outputs}["label"].as_numpy().tolist()


async def main(url: str, target: str) -> None:
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    assert await rest.is_server_live(url)
    assert await rest.is_server_ready(url)
    assert await rest.is_model_ready(url, "iris")
    for binary in (False, True):
        got = labels(await rest.infer(url, request(binary), model_name="iris"))
        assert got == [0, 2], got
        print(f"rest binary={binary}: {got}")
    await rest.close()

    grpc_client = InferenceGRPCClient(target)
    assert await grpc_client.is_server_live()
    assert await grpc_client.is_server_ready()
    assert await grpc_client.is_model_ready("iris")
    got = labels(await grpc_client.infer(request(False)))
    assert got == [0, 2], got
    print(f"grpc: {got}")
    await grpc_client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
