"""Stand-in for ``minio server DIR [--address HOST:PORT]``: moto's S3 server (ci/stand-ins/s3.Dockerfile).

moto[server] serves the S3 API in memory: DIR is not used, and the objects go with the container.
MinIO's liveness endpoint, /minio/health/live, answers as MinIO's does (200, empty), for the
healthcheck's ``mc ready local`` (ci/stand-ins/s3-mc.sh).
"""

from __future__ import annotations

import argparse
import signal
import sys

from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple

HEALTH_PATH = "/minio/health/live"


def with_health_endpoint(s3_app):
    """A WSGI app that answers HEALTH_PATH itself and hands everything else to `s3_app`."""
    def app(environ, start_response):
        if environ.get("PATH_INFO") == HEALTH_PATH:
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        return s3_app(environ, start_response)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="minio", description=__doc__)
    parser.add_argument("command", choices=["server"])
    parser.add_argument("data_dir", help="not used: moto keeps the objects in memory")
    parser.add_argument("--address", default=":9000", help="HOST:PORT to listen on (default :9000, every address)")
    args = parser.parse_args()
    host, _, port = args.address.rpartition(":")
    # PID 1 of the container: without a handler, SIGTERM (docker stop) would be ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_simple(host or "0.0.0.0", int(port), with_health_endpoint(DomainDispatcherApplication(create_backend_app)),
               threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
