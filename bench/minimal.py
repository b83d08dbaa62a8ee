"""A minimal Open Inference Protocol servicer: the reference point between the floor and us.

What a careful person would write in an afternoon: sync grpc.server, the generated v2
servicer, ModelInfer parses the request, runs the model with the server's session options,
builds the response. No validation, batching, statistics, health or metrics. `mnist-edge
bench --minimal` measures it next to the floor and mnist-edge, so the cost of mnist-edge's
features is the distance between it and this, and the cost of "protobuf + the model" is the
distance between this and the floor.

    python -m mnist_edge.bench.minimal --address 127.0.0.1:0 --port-file /tmp/minimal.port
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from mnist_edge.bench.floor import serve_until_signal, sync_server
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import model_store
from mnist_edge.server.runner import ModelRunner


class MinimalServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def ModelInfer(self, request, context):
        n = request.inputs[0].shape[0]
        pixels = np.frombuffer(request.raw_input_contents[0], dtype=np.uint8).reshape(n, 28, 28)
        probs, digits = self.runner.run(pixels)
        out = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=request.model_name,
            outputs=[out(name="probabilities", datatype="FP32", shape=[n, 10]), out(name="digit", datatype="INT64", shape=[n])],
            raw_output_contents=[probs.tobytes(), digits.tobytes()],
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnist_edge.bench.minimal", description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--port-file", default=None)
    p.add_argument("--threads", type=int, default=64, help="thread pool size (a stock ThreadPoolExecutor, as reference servers run it)")
    args = p.parse_args(argv)
    runner = ModelRunner(model_store.load(None).file.read_bytes())
    runner.warm_up()
    server = sync_server(args.threads)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(MinimalServicer(runner), server)
    port = server.add_insecure_port(args.address)
    return serve_until_signal(server, f"{args.address.rsplit(':', 1)[0]}:{port}", args.port_file)

if __name__ == "__main__":
    sys.exit(main())
