"""The Dask side of the data jobs (ingest, shards): connect or start a cluster, run tasks with a
progress bar, and report each task's result or exception by key."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, TypeVar

Key = TypeVar("Key", bound=Hashable)

log = logging.getLogger("sarcube.cluster")


def check_cluster_arguments(workers: int | None = None, memory_limit: str | None = None) -> None:
    """Refuse arguments that would start a cluster that can never run a task (InputError)."""
    from .errors import InputError

    if workers is not None and int(workers) < 1:
        raise InputError(f"--workers must be ≥ 1 (worker processes), got {workers}")
    if memory_limit is not None and str(memory_limit).lower() != "auto":
        from dask.utils import parse_bytes

        try:
            if parse_bytes(memory_limit) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise InputError(
                f"--memory-limit {memory_limit!r}: expected a size such as 2GB, 1500MiB or auto"
            ) from None


def _connect(scheduler: str):
    """A Client of the scheduler at ``scheduler``; InputError (one line) when unreachable."""
    from distributed import Client

    from .errors import InputError
    from .security import security_for

    security = security_for(scheduler)  # before the try: its InputError is a ValueError
    try:
        return Client(scheduler, timeout="5s", security=security)
    except (OSError, TimeoutError, ValueError, TypeError) as e:  # TypeError: tls:// without certs
        raise InputError(
            f"--scheduler {scheduler}: cannot connect to a Dask scheduler there "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'timed out'})"
        ) from None


@contextlib.contextmanager
def dask_client(
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | None = None,
) -> Iterator[Any]:
    """Yield a ``distributed.Client``: the given one, one connected to ``scheduler``, or one of a
    LocalCluster with ``workers`` single-threaded worker processes (default 2) closed afterwards.
    The dashboard link is printed."""
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    if quiet:  # (distributed resets it on import)
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the dashboard link is printed
    check_cluster_arguments(workers, memory_limit)
    if scheduler:
        own = _connect(scheduler)
        cluster = None
    else:
        cluster = LocalCluster(
            n_workers=workers or 2,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit or "auto",
            dashboard_address="127.0.0.1:0",
            # worker processes: a heartbeat racing the shutdown logs a
            # traceback at ERROR; task errors come back through the futures
            silence_logs=logging.CRITICAL if quiet else logging.INFO,
        )
        own = Client(cluster)
    print(f"Dask dashboard: {own.dashboard_link}", flush=True)
    try:
        yield own
    finally:
        own.close()
        if cluster is not None:
            cluster.close()


def task_key(name: str) -> str:
    """A readable Dask key unique to this submission. Dask treats equal keys as the same task: a
    fixed key would hand another job on the same scheduler this one's result (or vice versa)."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


def run_tasks(
    client, futures: Mapping[Key, Any], desc: str, progress: bool = True
) -> dict[Key, Any]:
    """Wait for futures with a progress bar; returns {key: result, or the exception it raised}."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    results: dict[Key, Any] = {}
    if not futures:
        return results
    by_future_key = {f.key: k for k, f in futures.items()}
    with tqdm(total=len(futures), desc=desc, unit="task", disable=not progress) as bar:
        for fut in as_completed(list(futures.values()), loop=client.loop):  # not the default client
            key = by_future_key[fut.key]
            try:
                results[key] = fut.result()
            except Exception as e:  # reported per input by the caller
                results[key] = e
            bar.update(1)
    return results
