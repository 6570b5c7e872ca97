"""``python -m helixflow_guard``: serve the guard until SIGTERM/SIGINT.

``python -m helixflow_guard health``: exit 0 when the guard answers ``/_ping`` and the engine
behind it does (the container's healthcheck: no argument with a space, which podman's Docker API
would split).

Settings (environment): the policy's (see :meth:`helixflow_guard.policy.Policy.from_environment`),
``HELIXFLOW_GUARD_LISTEN`` (``host:port``, default ``0.0.0.0:2375``) and ``HELIXFLOW_GUARD_UPSTREAM``
(the engine, default ``unix:///var/run/docker.sock``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import urllib.request

from helixflow_guard.policy import Policy
from helixflow_guard.proxy import Guard, Upstream

log = logging.getLogger("helixflow_guard")


async def serve(guard: Guard, host: str, port: int) -> None:
    server = await guard.serve(host, port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    log.info("listening on %s:%d, engine %s", host, port, guard.upstream.url)
    async with server:
        await stop.wait()
    log.info("stopped")


def health(listen: str) -> int:
    """0 when ``GET /_ping`` through the guard answers 200, else 1."""
    port = listen.rpartition(":")[2]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_ping", timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:
        print(f"helixflow guard: unhealthy: {error}", file=sys.stderr)
        return 1


def main() -> int:
    listen = os.environ.get("HELIXFLOW_GUARD_LISTEN", "0.0.0.0:2375")
    if sys.argv[1:] == ["health"]:
        return health(listen)
    logging.basicConfig(level=os.environ.get("HELIXFLOW_GUARD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        policy = Policy.from_environment()
    except ValueError as error:
        print(f"error: helixflow guard: {error}", file=sys.stderr)
        return 2
    host, _, port = listen.rpartition(":")
    upstream = Upstream(os.environ.get("HELIXFLOW_GUARD_UPSTREAM", "unix:///var/run/docker.sock"))
    log.info("policy: images %s; mounts %s; networks %s; owner label %s", sorted(policy.images),
             dict(policy.mounts), sorted(policy.networks), policy.owner_label)
    asyncio.run(serve(Guard(policy, upstream), host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
