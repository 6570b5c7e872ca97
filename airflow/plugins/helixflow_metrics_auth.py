"""A bearer token in front of the api-server's ``/admin/metrics`` (airflow-exporter and helixflow_metrics).

airflow-exporter 2.1.0 mounts its own FastAPI app at ``/admin`` (``fastapi_apps``) with routes
``/metrics`` and ``/metrics/`` and no authentication. This plugin adds a root middleware
(``fastapi_root_middlewares``): it runs on the api-server's root app before its router, so it
sees every request whichever plugin app would answer it, and lets a request for ``/admin/metrics``
(or anything below it) through only with ``Authorization: Bearer <token>``, where ``<token>`` is
the content of the file that ``HELIXFLOW_METRICS_TOKEN_FILE`` names. Every other path passes
untouched.

- No or a wrong token: ``401`` with ``WWW-Authenticate: Bearer``.
- ``HELIXFLOW_METRICS_TOKEN_FILE`` unset, or its file unreadable or empty: ``403`` to everyone,
  and the reason in the api-server's log (once, until it changes). Metrics are never served
  without a token: a missing setting must not open them.

The file is read at each request for the metrics, so a token rewritten in place (rotation) takes
effect at the next scrape without a restart. See docs/airflow.md, Security.
"""

from __future__ import annotations

import hmac
import logging
import os

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

TOKEN_FILE_ENV = "HELIXFLOW_METRICS_TOKEN_FILE"
PROTECTED_PATH = "/admin/metrics"
REALM = 'Bearer realm="helixflow metrics"'


def is_protected(path: str) -> bool:
    """Whether `path` is ``/admin/metrics`` or below it."""
    return path == PROTECTED_PATH or path.startswith(PROTECTED_PATH + "/")


def route_paths(scope: dict) -> set[str]:
    """The paths the router may match for this request: as sent, and without the app's root path.

    The api-server's app has ``root_path`` set from ``[api] base_url`` (e.g. ``/airflow``), and
    Starlette's top-level router matches the ``/admin`` mount for ``/airflow/admin/metrics`` and
    ``/admin/metrics`` alike (the exporter's app then answers only the first, a detail of the
    Starlette version). Checking both forms guards every path that can reach the exporter's
    routes, whatever ``base_url`` says.

    Parameters
    ----------
    scope : dict
        The ASGI HTTP scope; ``path`` is already percent-decoded by the server.

    Returns
    -------
    set of str
        One or two paths.
    """
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    paths = {path}
    if root and path.startswith(root + "/"):
        paths.add(path[len(root):])
    return paths


def bearer_tokens(scope: dict) -> list[bytes]:
    """The credentials of every ``Authorization: Bearer ...`` header of the request.

    More than one can be there: with ``[core] simple_auth_manager_all_admins`` Airflow's own
    middleware, which runs before this one, appends an Authorization header with an admin JWT to
    every request. The scheme is case-insensitive (RFC 7235).
    """
    tokens = []
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                tokens.append(credentials.strip())
    return tokens


async def respond(send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a complete plain-text response that no cache keeps."""
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class MetricsTokenMiddleware:
    """ASGI middleware: ``/admin/metrics`` only with the bearer token of ``HELIXFLOW_METRICS_TOKEN_FILE``.

    Parameters
    ----------
    app : ASGI application
        The rest of the api-server (its other middlewares, then the router).
    token_file : str, optional
        The token's file; default: the environment variable ``HELIXFLOW_METRICS_TOKEN_FILE``.
    """

    def __init__(self, app, token_file: str | None = None) -> None:
        self.app = app
        self.token_file = token_file if token_file is not None else os.environ.get(TOKEN_FILE_ENV, "")
        self._reported: str | None = None
        if not self.token_file:
            # Said at start-up, not only at the first scrape.
            self.report(f"{TOKEN_FILE_ENV} is not set", logging.WARNING)

    async def __call__(self, scope, receive, send) -> None:
        # Only HTTP: the exporter's routes are HTTP routes, a websocket never reaches them.
        if scope["type"] != "http" or not any(is_protected(path) for path in route_paths(scope)):
            await self.app(scope, receive, send)
            return
        expected = self.read_token()
        if expected is None:
            await respond(send, 403, "403 Forbidden: this server has no usable metrics token (see its log)\n")
            return
        supplied = bearer_tokens(scope)
        if not supplied:
            await respond(send, 401, "401 Unauthorized: send Authorization: Bearer <token>\n",
                          [(b"www-authenticate", REALM.encode())])
            return
        # Constant time, and every header compared: no answer tells how much of a guess was right.
        matched = False
        for token in supplied:
            matched |= hmac.compare_digest(token, expected)
        if not matched:
            await respond(send, 401, "401 Unauthorized: wrong token\n",
                          [(b"www-authenticate", f'{REALM}, error="invalid_token"'.encode())])
            return
        await self.app(scope, receive, send)

    def read_token(self) -> bytes | None:
        """The token from the file, surrounding whitespace removed; None (reason logged) when unusable.

        Read at every call: a few bytes per scrape, and a rotated token needs no restart.
        """
        if not self.token_file:
            self.report(f"{TOKEN_FILE_ENV} is not set", logging.WARNING)
            return None
        try:
            with open(self.token_file, "rb") as handle:
                token = handle.read().strip()
        except OSError as error:
            self.report(f"cannot read the metrics token file {self.token_file} ({TOKEN_FILE_ENV}): "
                        f"{error.strerror or error}", logging.ERROR)
            return None
        if not token:
            self.report(f"the metrics token file {self.token_file} ({TOKEN_FILE_ENV}) is empty", logging.ERROR)
            return None
        if self._reported is not None:
            log.info("metrics token file %s is readable again: %s answers with the token", self.token_file,
                     PROTECTED_PATH)
            self._reported = None
        return token

    def report(self, problem: str, level: int) -> None:
        """Log why the metrics are refused, once per distinct reason (not at every 15 s scrape)."""
        if problem != self._reported:
            log.log(level, "%s: %s answers 403 to every request (docs/airflow.md, Security)", problem,
                    PROTECTED_PATH)
            self._reported = problem


class HelixflowMetricsAuthPlugin(AirflowPlugin):
    """Adds `MetricsTokenMiddleware` to the api-server's root app."""

    name = "helixflow_metrics_auth"
    fastapi_root_middlewares = [{"middleware": MetricsTokenMiddleware, "args": [], "kwargs": {},
                                 "name": "helixflow metrics bearer token"}]
