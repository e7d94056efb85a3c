"""``training.data.ShardStream``: rank/worker splitting with equal steps, determinism, mid-epoch
resume, joint augmentation, normalisation and weights, S3 through DataLoader worker processes,
malformed samples, and S3 outages (retry after a restart; skip a shard).

The shards are written here by a small writer that follows ``sarcube.shards``' layout exactly
(member names and order, ``sarcube-shards/1`` manifest with per-split shards, ``db_stats``,
``members``), checked against ``sarcube.shards.iter_samples``, so that shard sizes, split
statistics and malformed samples can be chosen freely and every test knows the decoded arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.moto_outage import Outage

from sarcube.classes import nine_class_lut, water_lut
from sarcube.shards import FORMAT, iter_samples, npy_bytes
from training.data import (
    SampleError,
    ShardReadError,
    ShardStream,
    augmentation,
    intensity_weight,
    is_transient,
    npy_load_fast,
)
from training.sar_weight import sar_intensity_weight

P = 256
# split -> (samples per shard, dB mean used to draw the data): distinct statistics per split
LAYOUT = {
    "pretrain": ([5, 5, 5, 5, 5, 4, 4], -10.0),  # 33 samples: divides by nothing used here
    "train": ([4, 4, 4, 4, 4, 4], -14.0),  # 24 samples: 3 ranks × 2 workers × 4 exactly
    "val": ([3, 3], -18.0),
}


# ---------------------------------------------------------------------------------------------
# A shard writer with sarcube's layout


def make_sample(rng: np.random.Generator, split: str, mean: float, i: int):
    sar = rng.normal(mean, 3.0, (P, P)).astype(np.float16)
    if i % 4 == 0:  # some no-data pixels (NaN), as in real patches at swath edges
        sar[: 17 + i, :40] = np.nan
    lulc = rng.integers(0, 15, (P, P), dtype=np.uint8) if split != "pretrain" else None
    return sar, lulc


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mode = len(data), 0o644
                tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_dataset(out: Path, layout=LAYOUT, seed: int = 0, corrupt=None) -> dict:
    """Shards + manifest under ``out``; returns {key: (sar, lulc, split)}.

    ``corrupt(split, key, members)`` may edit a sample's members (dict ext -> bytes) in place."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth, splits = {}, {}
    day = 0
    for split, (sizes, mean) in layout.items():
        members = ["json", "sar.npy"] if split == "pretrain" else ["json", "lulc.npy", "sar.npy"]
        shards, s, ss, n = [], 0.0, 0.0, 0
        for k, size in enumerate(sizes):
            samples = []
            for j in range(size):
                day += 1
                key = f"2022{9 + day // 28:02d}{1 + day % 28:02d}-r{k:04d}-c{j:04d}"
                sar, lulc = make_sample(rng, split, mean, j)
                truth[key] = (sar, lulc, split)
                v = sar.astype(np.float64)
                v = v[np.isfinite(v)]
                s, ss, n = s + v.sum(), ss + np.square(v).sum(), n + v.size
                meta = {"id": key, "split": split, "row": k, "col": j, "crs": "EPSG:4326"}
                m = {"json": json.dumps(meta, sort_keys=True).encode()}
                if lulc is not None:
                    m["lulc.npy"] = npy_bytes(lulc)
                m["sar.npy"] = npy_bytes(sar)
                if corrupt is not None:
                    corrupt(split, key, m)
                samples.append((key, m))
            data = tar_bytes(samples)
            name = f"{split}-{k:06d}.tar"
            (out / name).write_bytes(data)
            shards.append(
                {
                    "name": name,
                    "samples": size,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        splits[split] = {
            "samples": sum(sizes),
            "bytes": sum(x["bytes"] for x in shards),
            "members": members,
            "shards": shards,
            "db_stats": {"mean": s / n, "std": float(np.sqrt(ss / n - (s / n) ** 2)), "pixels": n},
            "classes": {},
        }
    manifest = {
        "format": FORMAT,
        "seed": seed,
        "patch_size": P,
        "splits": splits,
        "cube": {"url": "synthetic"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return truth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    truth = write_dataset(out)
    return out, truth


def keys_of(batches) -> list[list[str]]:
    return [b["key"] for b in batches]


def same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert set(x) == set(y)
        for name in ("image", "weight", "valid", "label"):
            if name in x:
                assert torch.equal(x[name], y[name]), name


def stream(ds, split="pretrain", **kw) -> ShardStream:
    kw.setdefault("batch_size", 2)
    return ShardStream(str(ds[0] / "manifest.json"), split, **kw)


# ---------------------------------------------------------------------------------------------
# Layout and plan


def test_writer_matches_sarcube_reader(dataset):
    out, truth = dataset
    for split in LAYOUT:
        got = {s["key"]: s for s in iter_samples(str(out), split, verify=True)}
        assert set(got) == {k for k, v in truth.items() if v[2] == split}
        k = next(iter(got))
        np.testing.assert_array_equal(got[k]["sar"], truth[k][0])


@pytest.mark.parametrize(
    "world,batch,workers,split",
    [
        (2, 4, 0, "pretrain"),
        (2, 4, 2, "pretrain"),
        (3, 3, 0, "pretrain"),
        (3, 3, 2, "pretrain"),
        (3, 2, 2, "train"),
        (2, 3, 0, "val"),
    ],
)
def test_equal_steps_on_every_rank(dataset, world, batch, workers, split):
    _, truth = dataset
    keys_split = {k for k, v in truth.items() if v[2] == split}
    total = len(keys_split)
    seen_all: list[str] = []
    for epoch in (0, 1):
        union = set()
        for rank in range(world):
            s = stream(
                dataset,
                split,
                batch_size=batch,
                rank=rank,
                world_size=world,
                num_workers=workers,
                seed=5,
                task="pretrain",
                shuffle_buffer=4,
            )
            assert s.steps_per_epoch == total // (world * batch) >= 1
            got = list(s.loader(epoch))  # real DataLoader worker processes when workers > 0
            assert len(got) == s.steps_per_epoch
            assert all(len(b["key"]) == batch and b["image"].shape == (batch, 1, P, P) for b in got)
            if workers:  # the in-process simulation gives the same sequence
                same_batches(got, list(s.batches(epoch)))
            plan = s.plan(epoch)[rank]
            nw = max(workers, 1)
            for w, slot in enumerate(plan):
                mine = [k for i, b in enumerate(got) if i % nw == w for k in b["key"]]
                assert len(mine) == slot["quota"] * batch
                shard_keys = {k for u in slot["shards"] for k in _keys_in(u)}
                assert set(mine) <= shard_keys  # only its own shards
                # one shuffled pass emits every sample once before any repeat (wrap-around)
                first = mine[: len(shard_keys)]
                assert len(set(first)) == len(first) == min(len(shard_keys), len(mine))
                if slot["quota"] * batch >= slot["samples"]:
                    assert set(mine) == shard_keys
            union |= {k for b in got for k in b["key"]}
            seen_all += [k for b in got for k in b["key"]]
        if all(sl["quota"] * batch >= sl["samples"] for r in s.plan(epoch).values() for sl in r):
            assert union == keys_split  # quotas cover every slot's shards: the whole split
    if split == "train":  # 24 = 3 ranks × 2 workers × 2 steps × 2: exactly once each
        assert union == keys_split and len(seen_all) == 2 * total


def _keys_in(url: str) -> list[str]:
    with tarfile.open(url) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def test_too_few_samples_and_wrong_task(dataset):
    with pytest.raises(ValueError, match="fewer than world_size × batch_size"):
        stream(dataset, "val", batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="needs labels"):
        stream(dataset, "pretrain", task="lulc")
    with pytest.raises(ValueError, match="start_step"):
        list(stream(dataset, "val").batches(0, start_step=99))


# ---------------------------------------------------------------------------------------------
# Determinism and resume


def test_deterministic_per_seed_and_epoch(dataset):
    a = list(stream(dataset, num_workers=2, seed=1).batches(0))
    b = list(stream(dataset, num_workers=2, seed=1).batches(0))
    same_batches(a, b)
    assert keys_of(list(stream(dataset, num_workers=2, seed=1).batches(1))) != keys_of(a)
    assert keys_of(list(stream(dataset, num_workers=2, seed=2).batches(0))) != keys_of(a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_the_tail(dataset, workers):
    s = stream(dataset, "train", num_workers=workers, seed=3, task="lulc", shuffle_buffer=5)
    full = list(s.batches(2))
    assert len(full) == s.steps_per_epoch == 12
    for k in (1, 5, 12):
        same_batches(list(s.batches(2, start_step=k)), full[k:])
    tail = list(s.loader(2, start_step=5))  # DataLoader processes; first batch from worker 1
    same_batches(tail, full[5:])
    assert s.io_counters["samples_fast_forwarded"] > 0


# ---------------------------------------------------------------------------------------------
# Augmentation, normalisation, weights


def _dihedral():
    for k in range(4):
        for fh in (False, True):
            for fv in (False, True):
                yield (k, fh, fv)


def _apply(a, k, fh, fv):  # independent of training.data: numpy's rot90 / fliplr / flipud
    a = np.rot90(a, k)
    if fh:
        a = np.fliplr(a)
    if fv:
        a = np.flipud(a)
    return a


@pytest.mark.parametrize("task", ["lulc", "water"])
def test_augmentation_moves_labels_with_the_image(dataset, task):
    _, truth = dataset
    s = stream(dataset, "train", task=task, seed=7, batch_size=4)
    lut = nine_class_lut() if task == "lulc" else water_lut()
    mean, std = s.mean, s.std
    found = []
    for b in s.batches(0):
        for i, key in enumerate(b["key"]):
            sar, lulc, _ = truth[key]
            img = b["image"][i, 0].numpy()
            valid = b["valid"][i, 0].numpy()
            db = np.where(valid, img * std + mean, np.nan)
            matches = [
                t
                for t in _dihedral()
                if np.allclose(db, _apply(sar.astype(np.float32), *t), equal_nan=True, atol=1e-3)
            ]
            assert matches, key
            t = matches[0]
            assert augmentation(7, 0, key)[0] in {m[0] for m in matches}
            lab = lut[_apply(lulc, *t)].astype(np.int64)
            lab[~np.isfinite(_apply(sar, *t))] = 255  # no SAR -> ignored
            np.testing.assert_array_equal(b["label"][i].numpy(), lab)
            found.append(t)
    # not the identity throughout: the transforms actually vary
    assert len({(t[0] % 2, t[1] != t[2]) for t in found}) > 1


def test_no_augmentation_is_identity(dataset):
    _, truth = dataset
    s = stream(dataset, "val", task="lulc", augment=False)
    for b in s.batches(0):
        for i, key in enumerate(b["key"]):
            db = b["image"][i, 0].numpy() * s.std + s.mean
            ok = b["valid"][i, 0].numpy()
            np.testing.assert_allclose(db[ok], truth[key][0].astype(np.float32)[ok], atol=1e-3)


@pytest.mark.parametrize(
    "split,task,stats_of",
    [("pretrain", "pretrain", "pretrain"), ("val", "lulc", "train"), ("train", "water", "train")],
)
def test_normalisation_and_weight(dataset, split, task, stats_of):
    out, truth = dataset
    manifest = json.loads((out / "manifest.json").read_text())
    mean = manifest["splits"][stats_of]["db_stats"]["mean"]
    std = manifest["splits"][stats_of]["db_stats"]["std"]
    s = stream(dataset, split, task=task, seed=11)
    assert (s.mean, s.std) == (mean, std)
    nan_seen = False
    for b in s.batches(0):
        assert b["image"].dtype == b["weight"].dtype == torch.float32
        assert ("label" in b) == (task != "pretrain")
        for i, key in enumerate(b["key"]):
            aug = _apply(truth[key][0], *augmentation(11, 0, key)).astype(np.float32)
            ok = np.isfinite(aug)
            nan_seen |= not ok.all()
            filled = torch.from_numpy(np.where(ok, aug, np.float32(mean)))[None]
            np.testing.assert_array_equal(b["valid"][i, 0].numpy(), ok)
            torch.testing.assert_close(b["image"][i], (filled - mean) / std)
            torch.testing.assert_close(b["weight"][i], sar_intensity_weight(filled))
    assert nan_seen
    # the authors' variant: the weight of the z-scored input
    b = next(stream(dataset, split, task=task, weight_domain="normalized", weight_k=2.0).batches(0))
    torch.testing.assert_close(b["weight"], sar_intensity_weight(b["image"], 2.0, "normalized"))


@pytest.mark.parametrize(
    "task,split,workers", [("pretrain", "pretrain", 0), ("lulc", "train", 2), ("water", "val", 0)]
)
def test_device_prepare_ships_float16_and_finishes_identically(dataset, task, split, workers):
    """prepare="device": the loader ships float16 dB + uint8 labels, ``finish`` makes the same
    batch the worker path makes (checked against the shards' own arrays, not the other path)."""
    _, truth = dataset
    lut = {"lulc": nine_class_lut(), "water": water_lut()}.get(task)
    full = stream(dataset, split, task=task, seed=5, num_workers=workers)
    compact = stream(dataset, split, task=task, seed=5, num_workers=workers, prepare="device")
    got_full, got_compact = list(full.loader(0)), list(compact.loader(0))
    assert len(got_compact) == len(full)
    finished = []
    for b in got_compact:
        assert b["sar"].dtype == torch.float16 and tuple(b["sar"].shape) == (2, 1, P, P)
        assert ("label" in b) == (task != "pretrain") and "image" not in b
        for i, key in enumerate(b["key"]):
            aug = _apply(truth[key][0], *augmentation(5, 0, key))
            np.testing.assert_array_equal(b["sar"][i, 0].numpy(), aug)  # NaN positions too
            if lut is not None:
                assert b["label"].dtype == torch.uint8
                np.testing.assert_array_equal(
                    b["label"][i].numpy(), lut[_apply(truth[key][1], *augmentation(5, 0, key))]
                )
        finished.append(compact.finish(b))
    same_batches(finished, got_full)
    assert all(b["label"].dtype == torch.int64 for b in finished if "label" in b)
    # a finished batch passes through finish unchanged
    again = compact.finish(finished[0])
    assert all(torch.equal(again[k], finished[0][k]) for k in ("image", "weight", "valid"))
    with pytest.raises(ValueError, match="prepare"):
        stream(dataset, split, prepare="gpu")


@pytest.mark.parametrize("k", [0.0, 1.0, 2.5])
def test_fast_weight_equals_sar_intensity_weight(k):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 64, 64, generator=g) * 70 - 50  # -50 .. +20 dB
    x[2] = -7.5  # a constant image: w = e^k everywhere
    torch.testing.assert_close(intensity_weight(x.clone(), k), sar_intensity_weight(x, k))
    z = (x - x.mean()) / x.std()
    torch.testing.assert_close(
        intensity_weight(z.clone(), k), sar_intensity_weight(z, k, "normalized")
    )


def test_npy_load_fast_equals_np_load():
    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(P, P)).astype(np.float16),
        rng.normal(size=(P, P)).astype(np.float16),
        rng.integers(0, 15, (P, P), dtype=np.uint8),
        np.asfortranarray(np.eye(3)),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.float32(3.5),
    ]
    for _ in range(2):  # the second round hits the header cache
        for a in arrays:
            got = npy_load_fast(_npy(a))
            np.testing.assert_array_equal(got, a)
            assert got.dtype == a.dtype and got.shape == a.shape
    data = npy_bytes(arrays[0])
    with pytest.raises(ValueError):  # a cached header with a short payload: np.load's error
        npy_load_fast(data[:-2])
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        npy_load_fast(buf.getvalue())


def _npy(a):  # np.save as is (Fortran order and 0-d kept)
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# S3, malformed samples, outages


def test_streams_from_s3_through_worker_processes(dataset, s3):
    out, _ = dataset
    s3.fs().put(str(out) + "/", f"{s3.bucket}/run/shards/", recursive=True)
    (out / "stray-000000.tar").write_bytes(b"x")  # not in the manifest: never opened
    s3.fs().pipe_file(f"{s3.bucket}/run/shards/train-000099.tar", b"not a tar")
    remote = ShardStream(
        s3.url("run/shards/manifest.json"),
        "train",
        batch_size=2,
        num_workers=2,
        task="lulc",
        seed=4,
        storage_options=s3.storage_options,
    )
    assert all(u.startswith("s3://") for u in remote.shards)
    got = list(remote.loader(0))
    local = stream(dataset, "train", num_workers=2, task="lulc", seed=4)
    same_batches(got, list(local.batches(0)))
    assert remote.io_counters["shards_read"] == len(
        remote.shards
    )  # summed over the worker processes


def _bad(kind):
    def corrupt(split, key, m):
        if split != "train" or not key.endswith("r0002-c0001"):
            return
        if kind == "bad npy":
            m["sar.npy"] = b"\x93NUMPY garbage"
        elif kind == "shape":
            m["sar.npy"] = npy_bytes(np.zeros((P, P // 2), np.float16))
        elif kind == "dtype":
            m["sar.npy"] = npy_bytes(np.zeros((P, P), np.float64))
        elif kind == "pickle":
            buf = io.BytesIO()
            np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            m["sar.npy"] = buf.getvalue()
        elif kind == "no sar":
            del m["sar.npy"]
        elif kind == "no lulc":
            del m["lulc.npy"]

    return corrupt


@pytest.mark.parametrize("kind", ["bad npy", "shape", "dtype", "pickle", "no sar", "no lulc"])
def test_malformed_sample_names_key_and_shard(tmp_path, kind):
    truth = write_dataset(tmp_path, {"train": ([4, 4, 4], -14.0)}, corrupt=_bad(kind))
    bad = next(k for k in truth if k.endswith("r0002-c0001"))
    s = ShardStream(
        str(tmp_path / "manifest.json"), "train", batch_size=2, task="lulc", stats_split="train"
    )
    with pytest.raises(SampleError) as e:
        list(s.batches(0))
    assert bad in str(e.value) and str(tmp_path / "train-000002.tar") in str(e.value)
    assert e.value.key == bad
    if kind == "no lulc":
        assert "lulc.npy" in str(e.value)
        # pretraining does not need the labels: the same shards stream fine
        ok = ShardStream(
            str(tmp_path / "manifest.json"),
            "train",
            batch_size=2,
            task="pretrain",
            stats_split="train",
        )
        assert len(list(ok.batches(0))) == ok.steps_per_epoch


def test_malformed_sample_through_a_worker_process(tmp_path):
    write_dataset(tmp_path, {"train": ([4, 4, 4], -14.0)}, corrupt=_bad("shape"))
    s = ShardStream(
        str(tmp_path / "manifest.json"),
        "train",
        batch_size=2,
        task="lulc",
        num_workers=2,
        stats_split="train",
    )
    with pytest.raises(SampleError, match=r"r0002-c0001.*train-000002\.tar"):
        list(s.loader(0))


def test_unreadable_shard(tmp_path):
    write_dataset(tmp_path, {"train": ([4, 4], -14.0)})
    (tmp_path / "train-000001.tar").write_bytes(b"not a tar at all" * 100)
    s = ShardStream(
        str(tmp_path / "manifest.json"),
        "train",
        batch_size=2,
        task="lulc",
        skip_errors=3,
        shuffle_buffer=1,
    )
    with pytest.raises(ShardReadError, match=r"train-000001\.tar"):  # not transient: never skipped
        list(s.batches(0))


def test_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError

    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError())
    err = ClientError(
        {"Error": {"Code": "ServiceUnavailable"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
        "GetObject",
    )
    wrapped = OSError("ServiceUnavailable")
    wrapped.__cause__ = err
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("s3://b/k"))
    assert not is_transient(
        ClientError(
            {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
            "GetObject",
        )
    )


@pytest.fixture
def outage(s3, tmp_path):
    """(Outage, manifest URL, storage options, local reference dir): 'train' split, 4 shards
    of 6."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    o = Outage()
    storage_options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": o.endpoint}}
    write_dataset(tmp_path, {"train": ([6, 6, 6, 6], -14.0)})
    fs = s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)
    fs.mkdir("outage")
    fs.put(str(tmp_path) + "/", "outage/shards/", recursive=True)
    try:
        yield o, "s3://outage/shards/manifest.json", storage_options, tmp_path
    finally:
        o.stop()


KW = {"batch_size": 2, "task": "lulc", "shuffle_buffer": 2, "block_size": 64 * 1024, "seed": 9}


def test_s3_restart_mid_epoch_is_retried(outage):
    o, url, storage_options, local = outage
    s = ShardStream(url, "train", storage_options=storage_options, retries=4, backoff=0.25, **KW)
    it = s.batches(0)
    got = [next(it)]
    o.stop()  # mid-shard: more byte ranges of the current shard are still to come
    timer = threading.Timer(1.0, o.start)
    timer.start()
    try:
        got += list(it)
    finally:
        timer.join()
    ref = ShardStream(
        str(local / "manifest.json"), "train", **{k: v for k, v in KW.items() if k != "block_size"}
    )
    same_batches(got, list(ref.batches(0)))  # the uninterrupted sequence
    assert s.io_counters["read_retries"] >= 1 and s.io_counters["shards_skipped"] == 0


def test_s3_down_skips_the_shard_or_fails(outage):
    o, url, storage_options, _ = outage
    s = ShardStream(
        url, "train", storage_options=storage_options, retries=1, backoff=0.05, skip_errors=1, **KW
    )
    it = s.batches(0)
    got = [next(it)]
    o.stop()

    class RestartOnSkip(logging.Handler):  # the server comes back once the shard was given up
        def emit(self, record):
            if "skipping the rest of shard" in record.getMessage():
                o.start()

    handler = RestartOnSkip()
    logging.getLogger("training.data").addHandler(handler)
    try:
        got += list(it)
    finally:
        logging.getLogger("training.data").removeHandler(handler)
    assert len(got) == s.steps_per_epoch  # the quota is met by wrapping around
    assert s.io_counters["shards_skipped"] == 1 and s.io_counters["failed_reads"] >= 1
    assert s.io_counters["skipped_urls"][0].startswith("s3://outage/shards/train-")
    assert s.io_counters["wraps"] >= 1

    # kept down, nothing to skip: a clear error naming the shard
    s0 = ShardStream(url, "train", storage_options=storage_options, retries=1, backoff=0.05, **KW)
    it = s0.batches(0)
    next(it)
    o.stop()
    with pytest.raises(
        ShardReadError, match=r"s3://outage/shards/train-00000\d\.tar.*skip_errors=0"
    ):
        list(it)
