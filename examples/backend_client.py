"""A backend calling the LOOPS decision service: Decide, then Reward the outcome.

This is what a backend in any language does with the stubs its protoc generates from
proto/loops/v1/decision.proto; here, Python with plain grpcio (the README shows the same calls
with grpcurl). Start the service first (see README, "Decision service (gRPC) and security"):

    loops serve --policy-name bonus --learner 127.0.0.1:7070 --port 7071
    python examples/backend_client.py --target 127.0.0.1:7071

With TLS and tokens: add --tls-ca DIR/ca.pem and set LOOPS_TOKEN to a client token.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import grpc

# The generated stubs (a Go/Java/C# backend would use its own protoc output instead).
from loops_sdk._proto import decision_pb2 as pb
from loops_sdk._proto import decision_pb2_grpc


def connect(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca or args.tls_client_cert:
        def read(path):
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()
        creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_client_key),
                                             read(args.tls_client_cert))
        return grpc.secure_channel(args.target, creds)
    return grpc.insecure_channel(args.target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="127.0.0.1:7071", help="HOST:PORT of `loops serve`")
    ap.add_argument("--decision-point", default="bonus")
    ap.add_argument("--decisions", type=int, default=5)
    ap.add_argument("--tls-ca", help="PEM CA of the service's certificate (turns TLS on)")
    ap.add_argument("--tls-client-cert", help="PEM client certificate (mutual TLS)")
    ap.add_argument("--tls-client-key")
    args = ap.parse_args()

    token = os.environ.get("LOOPS_TOKEN")        # a `client` token, when the service wants one
    metadata = [("authorization", f"Bearer {token}")] if token else []
    rng = random.Random(1)
    with connect(args) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        for i in range(args.decisions):
            request = pb.DecideRequest(
                decision_point=args.decision_point,
                user=f"player-{i}",
                features={"level": rng.randint(1, 40), "spend": round(rng.uniform(0, 200), 2)},
                categories={"country": rng.choice(["DE", "FR", "BR"])},
                default_action="none")      # returned if the service has no policy yet
            try:
                d = stub.Decide(request, timeout=1.0, metadata=metadata)   # always a deadline
            except grpc.RpcError as err:
                print(f"Decide failed: {err.code().name}: {err.details()}", file=sys.stderr)
                return 1
            print(f"{request.user}: {d.action} (p={d.probability:.3f}, policy "
                  f"{d.policy_name} v{d.policy_version}, reason {d.reason}, event {d.event_id})")
            if not d.event_id:
                continue                    # a default without a policy: nothing to reward
            # ... later, when the outcome is known (the player redeemed, deposited, ...):
            value = round(rng.uniform(0, 50), 2)
            stub.Reward(pb.RewardRequest(event_id=d.event_id, value=value, kind="deposit"),
                        timeout=1.0, metadata=metadata)
            print(f"  reward sent: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
