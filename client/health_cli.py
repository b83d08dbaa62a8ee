"""`mnist-edge health --target ADDR`: exit 0 only when the server is SERVING.

For container HEALTHCHECKs and scripts. Exit codes: 0 SERVING; 1 reachable but not
serving (starting, draining, unknown service); 2 unreachable or an error.
"""

from __future__ import annotations

import argparse
import sys

from mnist_edge.client.client import ClientError, DigitClient, add_connection_args, connection_kwargs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mnist-edge health", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT or unix:PATH")
    p.add_argument("--service", default="", help='health service name: "" (readiness), liveness, or a gRPC service name')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    p.add_argument("--quiet", action="store_true", help="print nothing; the exit code says it")
    add_connection_args(p)
    args = p.parse_args(argv)
    try:
        client = DigitClient(args.target, retries=1, **connection_kwargs(args))
    except (ValueError, OSError) as exc:  # a --target that is not an address, an unreadable TLS or token file
        if not args.quiet:
            print(f"mnist-edge health: --target {args.target!r}: {exc}", file=sys.stderr)
        return 2
    try:
        status = client.health(args.service, timeout=args.timeout)
    except ClientError as exc:
        if not args.quiet:
            print(f"UNREACHABLE: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    if not args.quiet:
        what = f" ({args.service})" if args.service else ""
        hint = {
            "NOT_SERVING": ": the server is up but not ready (loading its model, or shutting down)",
            "SERVICE_UNKNOWN": ": the server does not know this health service name",
        }.get(status, "")
        print(f"{status}{what}{hint}", file=sys.stdout if status == "SERVING" else sys.stderr)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
