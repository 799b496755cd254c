"""Connecting to Ray, the one optional engine tiersim fans work out on (``pip install 'tiersim[cluster]'``).

tiersim writes no scheduler: grids and capacity sweeps are embarrassingly parallel, and Ray already
places tasks, restarts dead workers and retries their tasks. This module is the only place that imports
``ray`` at call time, so nothing else pays for it (or needs it installed) unless ``--ray`` is asked for.
It sits at the bottom of the layering: the grid (quality) and the capacity sweep (simulator) both use it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from tiersim.errors import TiersimError

RAY_INSTALL = "pip install 'tiersim[cluster]'"
#: How often Ray restarts a dead worker and reruns the task it was running before the error reaches tiersim.
RETRIES = 3


def import_ray():
    """The ``ray`` module, or one line saying what to install."""
    try:
        import ray
    except ImportError:
        raise TiersimError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


@contextmanager
def connect(address: str | None = None) -> Iterator[object]:
    """Ray, connected for the duration of the block.

    ``address`` None is ``RAY_ADDRESS`` if set, else a fresh Ray on this machine (never Ray's guess of a
    cluster from the address file ``ray start`` leaves, which outlives a killed cluster and then hangs the
    connection for minutes); 'auto' joins the cluster ``ray start`` runs on this machine; 'HOST:PORT' joins
    that head node.
    A Ray the caller already initialized (a notebook, a test) is used as it is and left running.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        # Worker output stays in Ray's session logs: the CLI's stdout may be JSON.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()
        hint = ""
        if address not in (None, "auto") and "RAY_AUTH_MODE" not in os.environ:
            hint = " (a cluster with token authentication, Ray's default, also needs RAY_AUTH_MODE=token here)"
        raise TiersimError(f"could not connect to Ray at {address or 'a new local instance'}: "
                           f"{text[0] if text else type(exc).__name__}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_count(ray, resource: str) -> int:
    """How many of ``resource`` ('CPU', 'GPU') the connected cluster has now."""
    return int(ray.cluster_resources().get(resource, 0))


def get_result(ray, ref):
    """A task's result; a worker's failure (after Ray's retries) becomes one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, TiersimError):
            raise TiersimError(str(cause)) from None
        lines = [line for line in str(cause or exc).splitlines() if line.strip()]
        last = lines[-1] if lines else type(exc).__name__
        prefix = "tiersim.errors."  # a worker's own one-line error, raised in the actor: keep just its text
        if last.startswith(prefix) and ": " in last:
            last = last.split(": ", 1)[1]
        raise TiersimError(f"a Ray worker failed: {last}") from None


def map_tasks(ray, fn: Callable, items: Sequence, on_done: Callable[[], None] | None = None) -> list:
    """``[fn(item) for item in items]`` with every call a Ray task (retried when its worker dies).

    ``fn`` must be importable by the workers (a module-level function). Results come back in the
    order of ``items``; ``on_done`` ticks as each task finishes, in whatever order they finish.
    """
    remote = ray.remote(max_retries=RETRIES)(fn)
    refs = [remote.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[index[done[0]]] = get_result(ray, done[0])
        if on_done is not None:
            on_done()
    return results
