"""A Docker API guard: passes on only the calls helixflow's Airflow DAG makes, after reading them.

A socket proxy that matches URL paths cannot tell a helixflow stage container from a privileged
container with ``/`` bound: both are ``POST /containers/create``. This guard reads each request
(path, query and JSON body), checks it against :class:`helixflow_guard.policy.Policy` and forwards
only what passes to the engine's unix socket; the rest gets a 403 with a JSON ``message`` saying
what was refused and why. Standard library only, so its image needs nothing but Python.

Modules: :mod:`helixflow_guard.policy` (the pure decision), :mod:`helixflow_guard.proxy` (the HTTP
side: parsing, forwarding, streaming). Run it with ``python -m helixflow_guard``.
"""
