"""Verified shards (issue 13): a damaged shard is never read silently.

Each test copies the session's ``small_shards`` (never corrupted in place) and damages the copy
the way storage does: a corrupt tar header in the middle, a flipped byte inside a ``sar.npy``
payload, a truncated or deleted file, an edited sha256 in ``manifest.json``, a shard name that
leaves the manifest's folder. Then:

- the training loader (``ShardStream``, in-process and through DataLoader workers) raises a
  clear error naming the shard, or with ``max_bad_shards`` skips it, counted in ``io_counters`` and
  logged (never a silent wrap-around);
- evaluation errors instead of reporting fewer samples than the manifest lists; the
  ``sarcube evaluate`` command exits 2 with one line (a traceback only with ``-v``);
- ``sarcube shards`` re-run over the damaged copy rewrites the damaged shard (hash against the
  old manifest, spot checks against the cube, all samples with ``verify``) and the new manifest
  records the hash of the file on disk, recomputed here with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from sarcube.shards import (
    MANIFEST,
    PREVIOUS_MANIFEST,
    ShardError,
    ShardPlan,
    iter_samples,
    read_manifest,
    spot_checks,
    write_shards,
)
from training.data import ShardIntegrityError, ShardReadError, ShardStream

KW = {"shard_size_mb": 64, "min_shards_per_split": 2, "progress": False}  # as small_shards


# ---------------------------------------------------------------------------------------------
# Damage


@pytest.fixture
def shards(small_shards, tmp_path) -> Path:
    """A private copy of the session's shards (with the index beside it), safe to damage."""
    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    shutil.copy(small_shards.parent / "index.parquet", tmp_path / "index.parquet")
    return out


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:") as tar:
        return tar.getmembers()


def corrupt_header(path: Path) -> None:
    """Garble the header of a member in the middle (its checksum no longer matches)."""
    m = members(path)[len(members(path)) // 2]
    data = bytearray(path.read_bytes())
    data[m.offset : m.offset + 4] = b"\xff\xfe\xfd\xfc"
    path.write_bytes(bytes(data))


def flip_payload(path: Path, sample: int = 0) -> None:
    """Flip one bit in the middle of the ``sar.npy`` payload of the ``sample``-th sample."""
    m = [m for m in members(path) if m.name.endswith(".sar.npy")][sample]
    data = bytearray(path.read_bytes())
    data[m.offset_data + m.size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    m = members(path)[len(members(path)) // 2]
    path.write_bytes(path.read_bytes()[: m.offset])  # at a header: tar parsers stop silently


def delete(path: Path) -> None:
    path.unlink()


def edit_sha(path: Path) -> None:
    man = path.parent / MANIFEST
    m = json.loads(man.read_text())
    for sp in m["splits"].values():
        for e in sp["shards"]:
            if e["name"] == path.name:
                e["sha256"] = hashlib.sha256(b"something else").hexdigest()
    man.write_text(json.dumps(m, indent=1))


DAMAGE = {
    "header": corrupt_header,
    "payload": flip_payload,
    "truncated": truncate,
    "deleted": delete,
    "sha256": edit_sha,
}


def train_stream(out: Path, **kw) -> ShardStream:
    kw = {"batch_size": 2, "task": "pretrain", "shuffle_buffer": 4, **kw}
    return ShardStream(str(out / MANIFEST), "pretrain", **kw)


def test_damage_is_what_the_issue_describes(shards):
    """The corruptions reproduce the findings: a corrupt header hides samples from a tar
    parser, a flipped payload byte still decodes."""
    shard = shards / "pretrain-000000.tar"
    n = len(members(shard))
    corrupt_header(shard)
    assert len(members(shard)) < n  # parsed silently, fewer members
    shard = shards / "pretrain-000001.tar"
    flip_payload(shard)
    assert (
        len(list(iter_samples(str(shards), "pretrain")))
        < read_manifest(str(shards))["splits"]["pretrain"]["samples"]
    )
    with pytest.raises(ShardError, match="sha256"):
        list(iter_samples(str(shards), "pretrain", verify=True))


# ---------------------------------------------------------------------------------------------
# The training loader


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_loader_raises_naming_the_shard(shards, kind):
    shard = shards / "pretrain-000001.tar"
    DAMAGE[kind](shard)
    s = train_stream(shards)
    with pytest.raises(ShardReadError, match=r"pretrain-000001\.tar\)$") as e:
        list(s.batches(0))
    assert "\n" not in str(e.value) and e.value.shard.endswith("pretrain-000001.tar")
    if kind != "deleted":
        assert isinstance(e.value, ShardIntegrityError)
        assert "differs from the manifest" in str(e.value)


def test_loader_error_through_worker_processes_is_the_same_one_line_error(shards):
    corrupt_header(shards / "pretrain-000000.tar")
    s = train_stream(shards, num_workers=2)
    with pytest.raises(ShardIntegrityError, match=r"samples.*pretrain-000000\.tar\)$") as e:
        list(s.loader(0))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("kind", ["header", "payload"])
def test_tolerance_skips_counts_and_logs(shards, kind, caplog):
    DAMAGE[kind](shards / "pretrain-000000.tar")
    s = train_stream(shards, max_bad_shards=1)
    with caplog.at_level(logging.ERROR, logger="training.data"):
        got = list(s.batches(0))
    assert len(got) == s.steps_per_epoch
    assert s.io_counters["shards_bad"] == 1
    assert [Path(u).name for u in s.io_counters["bad_urls"]] == ["pretrain-000000.tar"]
    assert s.io_counters["shards_read"] >= 1
    assert any(
        "skipping bad shard" in r.getMessage() and "pretrain-000000.tar" in r.getMessage()
        for r in caplog.records
    )
    # the budget is per worker and epoch: a second bad shard is an error
    DAMAGE[kind](shards / "pretrain-000001.tar")
    with pytest.raises(ShardIntegrityError, match=r"pretrain-00000[01]\.tar"):
        list(train_stream(shards, max_bad_shards=1).batches(0))


def test_resume_reads_verified_shards(shards):
    """Mid-epoch resume fast-forwards through shards it still hashes: a damaged one fails."""
    s = train_stream(shards)
    whole = [b["key"] for b in s.batches(0)]
    assert [b["key"] for b in s.batches(0, start_step=2)] == whole[2:]
    flip_payload(shards / "pretrain-000000.tar")
    flip_payload(shards / "pretrain-000001.tar")
    with pytest.raises(ShardIntegrityError):
        list(train_stream(shards).batches(0, start_step=s.steps_per_epoch - 1))


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_stream(out: Path, **kw) -> ShardStream:
    return ShardStream(
        str(out / MANIFEST),
        "test",
        batch_size=2,
        task="lulc",
        augment=False,
        stats_split="train",
        evaluation=True,
        **kw,
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_never_counts_fewer_samples(shards, workers):
    listed = read_manifest(str(shards))["splits"]["test"]["samples"]
    assert sum(len(b["key"]) for b in eval_stream(shards).eval_batches()) == listed
    corrupt_header(shards / "test-000000.tar")
    s = eval_stream(shards, num_workers=workers, max_bad_shards=5)  # no skipping in evaluation
    with pytest.raises(ShardIntegrityError, match=r"samples, the manifest lists.*test-000000\.tar"):
        list(s.eval_batches())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A fine-tuning checkpoint of the tiny profile (random weights: only its loading matters)."""
    import torch

    from training.config import load_config
    from training.segmenter import build_segmentation_model

    cfg = load_config(
        "finetune_tiny", ["data.batch_size=4", "seg.eval_batch_size=4"], method="finetune"
    )
    model = build_segmentation_model(cfg)
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


@pytest.mark.parametrize("kind", ["header", "truncated", "deleted"])
def test_evaluate_command_fails_in_one_line(shards, checkpoint, tmp_path, capsys, kind):
    from sarcube.cli import main

    DAMAGE[kind](shards / "test-000000.tar")
    argv = [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--manifest",
        str(shards),
        "--split",
        "test",
        "--out",
        str(tmp_path / "ev"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("sarcube evaluate: error: ")
    assert err[0].endswith(f"({shards / 'test-000000.tar'})")
    assert not (tmp_path / "ev" / "report.json").exists()
    if kind == "header":
        assert main(["-v", *argv]) == 2
        assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Manifest entries outside the manifest's folder


@pytest.mark.parametrize(
    "name",
    [
        "../outside/pretrain-000000.tar",
        "sub/../../x.tar",
        "/tmp/x.tar",
        "s3://bucket/x.tar",
        "file:///tmp/x.tar",
        "",
    ],
)
def test_shard_names_leaving_the_folder_are_refused(shards, name):
    (shards.parent / "outside").mkdir(exist_ok=True)
    shutil.copy(shards / "pretrain-000000.tar", shards.parent / "outside")
    man = shards / MANIFEST
    m = json.loads(man.read_text())
    m["splits"]["pretrain"]["shards"][0]["name"] = name
    man.write_text(json.dumps(m))
    pattern = re.escape(f"{man}: split 'pretrain' lists the shard {name!r}, which is not a file")
    with pytest.raises(ShardError, match=pattern):
        train_stream(shards)
    with pytest.raises(ShardError, match="not a file inside the manifest's folder"):
        list(iter_samples(str(shards), "pretrain"))


# ---------------------------------------------------------------------------------------------
# Re-running `sarcube shards`


def plan_of(path: Path) -> ShardPlan:
    n = sum(m.name.endswith(".sar.npy") for m in members(path))
    return ShardPlan(path.name.split("-")[0], path.name, [None] * n)  # type: ignore[list-item]


def rerun(small_cube, shards: Path, client, caplog, **kw) -> dict:
    with caplog.at_level(logging.INFO, logger="sarcube.shards"):
        return write_shards(
            small_cube, str(shards.parent / "index.parquet"), str(shards), client=client, **KW, **kw
        )


def assert_repaired(shards: Path, small_shards: Path, manifest: dict, name: str) -> None:
    split = name.split("-")[0]
    entry = next(e for e in manifest["splits"][split]["shards"] if e["name"] == name)
    data = (shards / name).read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["bytes"] == len(data)
    assert data == (small_shards / name).read_bytes()  # what an undisturbed run wrote

    def samples(out: Path) -> list:
        return [
            (x["key"], x["sar"].tobytes(), None if x["lulc"] is None else x["lulc"].tobytes())
            for x in iter_samples(str(out), split)
            if x["shard"] == name
        ]

    assert samples(shards) == samples(small_shards)
    assert read_manifest(str(shards)) == manifest


def test_rerun_rewrites_a_damaged_shard_recorded_in_the_manifest(
    small_cube, small_shards, shards, dask_client, caplog
):
    name = "pretrain-000001.tar"
    plan = plan_of(shards / name)
    unchecked = next(i for i in range(len(plan.samples)) if i not in spot_checks(plan))
    flip_payload(shards / name, unchecked)  # only the old manifest's hash can tell
    edit_sha(shards / "val-000000.tar")  # the file is fine, the manifest lies: rewritten too
    m = rerun(small_cube, shards, dask_client, caplog)
    assert "2 existing shard(s) damaged or stale, rewritten" in caplog.text
    assert "pretrain-000001.tar" in caplog.text and "val-000000.tar" in caplog.text
    assert_repaired(shards, small_shards, m, name)
    assert_repaired(shards, small_shards, m, "val-000000.tar")
    assert (
        m["splits"]["pretrain"]["db_stats"]
        == read_manifest(str(small_shards))["splits"]["pretrain"]["db_stats"]
    )


def test_rerun_without_a_manifest_checks_samples_against_the_cube(
    small_cube, small_shards, shards, dask_client, caplog
):
    (shards / MANIFEST).unlink()  # a crashed run: no recorded hashes
    checked = shards / "train-000000.tar"
    flip_payload(checked, spot_checks(plan_of(checked))[0])  # a spot-checked sample
    hidden = shards / "train-000001.tar"
    plan = plan_of(hidden)
    flip_payload(hidden, next(i for i in range(len(plan.samples)) if i not in spot_checks(plan)))
    m = rerun(small_cube, shards, dask_client, caplog)
    assert "1 existing shard(s) damaged or stale, rewritten: train-000000.tar" in caplog.text
    assert_repaired(shards, small_shards, m, "train-000000.tar")
    assert (shards / "train-000001.tar").read_bytes() != (
        small_shards / "train-000001.tar"
    ).read_bytes()

    (shards / MANIFEST).unlink()
    caplog.clear()
    m = rerun(small_cube, shards, dask_client, caplog, verify=True)  # every sample: found
    assert "1 existing shard(s) damaged or stale, rewritten: train-000001.tar" in caplog.text
    assert_repaired(shards, small_shards, m, "train-000001.tar")


def test_a_killed_rerun_does_not_lose_the_recorded_hashes(
    small_cube, small_shards, shards, dask_client, caplog
):
    """A re-run removes the manifest first; killed right after that, the next run still has the
    hashes the manifest recorded, and finds a damaged payload that no spot check reads."""
    from sarcube.shards.destination import prepare_destination as _prepare_destination

    name = "pretrain-000001.tar"
    plan = plan_of(shards / name)
    flip_payload(
        shards / name, next(i for i in range(len(plan.samples)) if i not in spot_checks(plan))
    )
    recorded = (shards / MANIFEST).read_bytes()
    _prepare_destination(str(shards), {})  # what the killed re-run had done before it died
    assert not (shards / MANIFEST).exists()
    assert (shards / PREVIOUS_MANIFEST).read_bytes() == recorded
    m = rerun(small_cube, shards, dask_client, caplog)
    assert f"1 existing shard(s) damaged or stale, rewritten: {name}" in caplog.text
    assert_repaired(shards, small_shards, m, name)
    assert not (shards / PREVIOUS_MANIFEST).exists()  # gone with the new manifest's commit


def test_shards_command_has_verify():
    from sarcube.cli import build_parser

    argv = ["shards", "--cube", "c", "--index", "i", "--out", "o"]
    assert build_parser().parse_args([*argv, "--verify"]).verify is True
    assert build_parser().parse_args(argv).verify is False


# ---------------------------------------------------------------------------------------------
# The training run reports what its loader skipped


def test_training_reports_skipped_shards(shards, tmp_path):
    from helpers.engine_runs import make_trainer, tiny_cfg

    corrupt_header(shards / "pretrain-000000.tar")
    cfg = tiny_cfg(
        "data.batch_size=8", "schedule.epochs=1", "data.max_bad_shards=1", "data.num_workers=0"
    )
    assert cfg.data.max_bad_shards == 1
    data = train_stream(shards, batch_size=8, max_bad_shards=cfg.data.max_bad_shards)
    res = make_trainer(cfg, tmp_path / "run", data=data).fit()
    assert res.finished
    epochs = [json.loads(ln) for ln in Path(res.metrics).read_text().splitlines()]
    loader = next(d for d in epochs if d["kind"] == "epoch")["loader"]
    assert loader["shards_bad"] == 1 and loader["bad_urls"] == [str(shards / "pretrain-000000.tar")]
    summary = json.loads((tmp_path / "run" / "ranks" / "rank-00000.json").read_text())
    assert summary["loader"]["shards_bad"] == 1


def test_without_hashing_counts_and_sizes_are_still_checked(shards):
    flip_payload(shards / "pretrain-000000.tar")  # same size, same samples: only a hash sees it
    assert len(list(train_stream(shards, verify=False).batches(0))) > 0
    corrupt_header(shards / "pretrain-000001.tar")
    with pytest.raises(ShardIntegrityError, match=r"samples, the manifest lists 16"):
        list(train_stream(shards, verify=False).batches(0))


def test_training_command_fails_in_one_line(shards, tmp_path, capsys):
    from sarcube.cli import main

    delete(shards / "pretrain-000001.tar")
    argv = [
        "pretrain",
        "--manifest",
        str(shards),
        "--out",
        str(tmp_path / "run"),
        "--config",
        "simmim_tiny",
        "data.batch_size=2",
        "data.num_workers=0",
        "train.progress=false",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (
        "sarcube pretrain: error: the shard is missing; re-run `sarcube shards` to "
        "rewrite it; data.max_bad_shards > 0 skips such shards in training "
        f"({shards / 'pretrain-000001.tar'})"
    )
