"""Reading one shard: its raw samples, verified, under the loader's skip budgets.

``read_shard`` streams a shard's raw samples (``{__key__, __url__, ext: bytes}``) through
WebDataset's tar iterators and a ``VerifyingReader`` (``training.data.verify``), and decides
what a failure costs (``ReadPolicy``):

- a transient error that outlasted the opener's retries (``TransientReadError``) skips the rest
  of the shard within ``skip_errors`` (samples already emitted from it stay);
- a bad shard (missing, not a readable tar, bytes / sha256 / sample count differing from the
  manifest) is skipped within ``max_bad_shards`` and not read again in that epoch.

Both budgets are per logical worker per epoch (with ``num_workers = 0``: per rank); every skip
is logged and counted in the worker's ``WorkerState``, and the stream meets the worker's quota by
wrapping around. Beyond the budgets, or when the policy is not ``tolerant`` (evaluation reads
every sample or fails): ``ShardReadError``, or ``ShardIntegrityError`` for bytes that differ
from the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .counters import WorkerState
from .errors import DataError, ShardIntegrityError, ShardReadError, TransientReadError
from .opener import open_shard
from .verify import VerifyingReader, known_size, shard_mismatch

__all__ = ["ReadPolicy", "read_shard"]

log = logging.getLogger("training.data")


@dataclass(frozen=True)
class ReadPolicy:
    """How a shard is read: ``verify`` (sha256 while streaming; size and sample count are always
    checked), the skip budgets, and ``tolerant`` (False: no skips at all)."""

    verify: bool = True
    skip_errors: int = 0
    max_bad_shards: int = 0
    tolerant: bool = True


class _Bad(Exception):
    """Internal: the shard being read is bad (message: what is wrong)."""

    def __init__(self, what: str, integrity: bool = True) -> None:
        super().__init__(what)
        self.integrity = integrity


def read_shard(
    url: str, entry: Mapping[str, Any] | None, state: WorkerState, policy: ReadPolicy
) -> Iterator[dict[str, Any]]:
    """Raw samples of shard ``url``, verified against its manifest ``entry`` (byte size up front
    when known; sha256, byte size and sample count at the end of the tar).

    Each sample is held back until the next one is parsed, so the last one (the one a truncation
    or a bad header would cut) comes only after the verification. A failure within the policy's
    budgets ends the shard early (skip counted in ``state``).

    Raises:
        ShardReadError: a transient failure or bad shard beyond the budgets.
        ShardIntegrityError: a shard differing from ``entry`` beyond ``max_bad_shards``.
        DataError: any other loader error, as raised.
    """
    if url in state.bad:  # found bad (and skipped) earlier this epoch
        return
    reader: VerifyingReader | None = None
    try:
        try:
            raw = open_shard(url)
        except FileNotFoundError:
            raise _Bad("the shard is missing", integrity=False) from None
        reader = VerifyingReader(raw, url, hash=policy.verify)
        bad = shard_mismatch(entry, nbytes=known_size(raw))
        if bad:
            raise _Bad(f"the shard differs from the manifest: {bad}")
        yield from _verified_samples(url, reader, entry)
        state.counts["shards_read"] += 1
    except _Bad as e:
        _bad_shard(url, str(e), state, policy, integrity=e.integrity)
    except TransientReadError as e:
        _transient_failure(url, e, state, policy)
    except DataError:
        raise
    except Exception as e:
        what = e.args[0] if e.args else e  # WebDataset appends the stream and URL to args
        _bad_shard(
            url,
            f"the shard cannot be read as a WebDataset tar ({type(e).__name__}: {what})",
            state,
            policy,
            cause=e,
        )
    finally:
        if reader is not None:
            reader.close()


def _verified_samples(
    url: str, reader: VerifyingReader, entry: Mapping[str, Any] | None
) -> Iterator[dict[str, Any]]:
    """The tar's samples, the last one only once the whole file checks out against ``entry``
    (else ``_Bad``)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    held, n = None, 0
    for s in group_by_keys(tar_file_expander([{"url": url, "stream": reader}])):
        if held is not None:
            yield held
        held, n = s, n + 1
    nbytes, sha = reader.finish()
    bad = shard_mismatch(entry, samples=n, nbytes=nbytes, sha256=sha)
    if bad:
        raise _Bad(f"the shard differs from the manifest: {bad}")
    if held is not None:
        yield held


def _transient_failure(
    url: str, e: TransientReadError, state: WorkerState, policy: ReadPolicy
) -> None:
    """Skip the rest of a shard after a transient error (counted, logged) within
    ``skip_errors``, else raise ``ShardReadError``."""
    if policy.tolerant and state.counts["shards_skipped"] < policy.skip_errors:
        state.counts["shards_skipped"] += 1
        state.counts["skipped_urls"].append(url)
        log.warning(
            "skipping the rest of shard %s after a transient read error "
            "(%d of skip_errors=%d this epoch): %s",
            url,
            state.counts["shards_skipped"],
            policy.skip_errors,
            e.message,
        )
        return
    how = (
        f"skip_errors={policy.skip_errors} spent; raise it to skip such shards"
        if policy.tolerant
        else "evaluation reads every shard; retry, or raise retries"
    )
    raise ShardReadError(f"shard {url}: {e.message} ({how})", shard=url) from e


def _bad_shard(
    url: str,
    what: str,
    state: WorkerState,
    policy: ReadPolicy,
    integrity: bool = False,
    cause: BaseException | None = None,
) -> None:
    """Skip a bad shard (counted, logged) within ``max_bad_shards``, else raise."""
    if policy.tolerant and state.counts["shards_bad"] < policy.max_bad_shards:
        state.counts["shards_bad"] += 1
        state.counts["bad_urls"].append(url)
        state.bad.add(url)
        log.error(
            "skipping bad shard %s (%d of max_bad_shards=%d this epoch; samples it gave "
            "before the end of the tar were used): %s",
            url,
            state.counts["shards_bad"],
            policy.max_bad_shards,
            what,
        )
        return
    how = "re-run `sarcube shards` to rewrite it" + (
        "; data.max_bad_shards > 0 skips such shards in training" if policy.tolerant else ""
    )
    cls = ShardIntegrityError if integrity else ShardReadError
    raise cls(f"{what}; {how} ({url})", shard=url) from cause
