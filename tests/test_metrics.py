"""Segmentation metrics against torchmetrics 1.9 and hand-computed values, and the DDP reduction.

torchmetrics' absent-class handling (read from torchmetrics/functional/classification/jaccard.py,
_jaccard_index_reduce, and utilities/compute.py, _adjust_weights_safe_divide; zero_division=0):

- per class (``average=None``): 0/0 gives 0, where we report NaN;
- ``MulticlassJaccardIndex(average="macro")``: classes with TP+FP+FN == 0 get weight 0, the same
  exclusion as our mIoU, so the two agree;
- ``MulticlassAccuracy(average="macro")``: the weight is 0 only when TP+FP+FN == 0, so a class that
  is *predicted but absent from the truth* enters the mean with accuracy 0. We leave it out
  (TP+FN == 0: recall undefined), so mAcc differs exactly in that case, and equals the mean of
  torchmetrics' per-class accuracies over the classes present in the truth.
"""

from __future__ import annotations

import json
import math
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sarcube.classes import IGNORE_INDEX, NINE_CLASS_NAMES
from training.metrics import (
    ConfusionMatrix,
    binary_scores,
    confusion_matrix,
    format_table,
    segmentation_scores,
)

IGN = IGNORE_INDEX
K = len(NINE_CLASS_NAMES)
NAMES = NINE_CLASS_NAMES  # water, built-up, ..., greenhouse (Table II order)
PRED_ONLY = 6  # predicted somewhere, never in the truth
NOWHERE = 8  # in neither truth nor prediction
TRUTH_ONLY = 7  # in the truth, never predicted


def _data(seed: int, b: int = 4, h: int = 16, w: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels (with ~20 % ignored) for K = 9 classes where class 6 is only
    predicted, class 7 only in the truth and class 8 nowhere; predictions agree with the truth
    ~50 % of the time so that every score is strictly between 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    truth_classes = torch.tensor([0, 1, 2, 3, 4, 5, 7])
    target = truth_classes[torch.randint(0, len(truth_classes), (b, h, w), generator=g)]
    pred_classes = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    pred = pred_classes[torch.randint(0, len(pred_classes), (b, h, w), generator=g)]
    agree = (torch.rand(b, h, w, generator=g) < 0.5) & (target != TRUTH_ONLY)
    pred = torch.where(agree, target, pred)
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGN
    return pred, target


def _np_confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    p, t = pred.numpy().ravel(), target.numpy().ravel()
    for i in range(p.size):
        if t[i] != IGN:
            cm[t[i], p[i]] += 1
    return cm


def _tm(metric, pred, target) -> np.ndarray:
    metric.update(pred, target)
    return metric.compute().double().numpy()


def test_confusion_matrix_counts_only_valid_pixels():
    pred, target = _data(0)
    cm = confusion_matrix(pred, target, K)
    assert cm.dtype == torch.int64 and cm.shape == (K, K)
    np.testing.assert_array_equal(cm.numpy(), _np_confusion(pred, target, K))
    assert int(cm.sum()) == int((target != IGN).sum())
    # prediction on ignored pixels does not matter
    pred2 = pred.clone()
    pred2[target == IGN] = (pred2[target == IGN] + 1) % K
    assert torch.equal(confusion_matrix(pred2, target, K), cm)


def test_confusion_matrix_hand_example():
    target = torch.tensor([[0, 0, 1, IGN], [2, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 2, 1]])
    want = [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert confusion_matrix(pred, target, 3).tolist() == want


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError):
        confusion_matrix(torch.tensor([0.0]), torch.tensor([0]), 3)


def test_scores_hand_example():
    # rows truth, cols prediction; class 3 absent everywhere, class 2 predicted only.
    cm = torch.tensor([[5, 1, 2, 0], [3, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = segmentation_scores(cm, ["a", "b", "c", "d"])
    # IoU a = 5/(5+3+3) = 5/11, b = 4/(4+1+3) = 1/2, c = 0/(0+2+0) = 0, d = NaN
    assert s["iou"]["a"] == pytest.approx(5 / 11) and s["iou"]["b"] == pytest.approx(0.5)
    assert s["iou"]["c"] == 0.0 and math.isnan(s["iou"]["d"])
    assert s["miou"] == pytest.approx((5 / 11 + 0.5 + 0.0) / 3)
    # Acc a = 5/8, b = 4/7, c and d absent from the truth -> NaN
    assert s["acc"]["a"] == pytest.approx(5 / 8) and s["acc"]["b"] == pytest.approx(4 / 7)
    assert math.isnan(s["acc"]["c"]) and math.isnan(s["acc"]["d"])
    assert s["macc"] == pytest.approx((5 / 8 + 4 / 7) / 2)
    assert s["pixel_acc"] == pytest.approx(9 / 15)
    assert s["iou_excluded"] == ["d"] and s["acc_excluded"] == ["c", "d"]
    assert s["support"] == {"a": 8, "b": 7, "c": 0, "d": 0} and s["total_pixels"] == 15
    assert "NaN" in s["note"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_scores_match_torchmetrics(seed):
    from torchmetrics import classification as tmc  # here, not at the top: see _ddp_worker

    pred, target = _data(seed)
    s = segmentation_scores(confusion_matrix(pred, target, K), NAMES)
    iou = np.array(list(s["iou"].values()))
    acc = np.array(list(s["acc"].values()))
    tm_iou = _tm(tmc.MulticlassJaccardIndex(K, average=None, ignore_index=IGN), pred, target)
    tm_miou = _tm(tmc.MulticlassJaccardIndex(K, average="macro", ignore_index=IGN), pred, target)
    tm_acc = _tm(tmc.MulticlassAccuracy(K, average=None, ignore_index=IGN), pred, target)
    tm_macc = _tm(tmc.MulticlassAccuracy(K, average="macro", ignore_index=IGN), pred, target)
    tm_pix = _tm(tmc.MulticlassAccuracy(K, average="micro", ignore_index=IGN), pred, target)

    # the data really has the three kinds of absent classes
    truth_present = np.isin(np.arange(K), target[target != IGN].unique().numpy())
    assert not truth_present[[PRED_ONLY, NOWHERE]].any() and truth_present[TRUTH_ONLY]
    assert not (pred == NOWHERE).any() and (pred[target != IGN] == PRED_ONLY).any()

    # per-class values agree wherever ours is defined; torchmetrics writes 0 where ours is NaN
    assert np.isnan(iou).tolist() == [k == NOWHERE for k in range(K)]
    np.testing.assert_allclose(iou[~np.isnan(iou)], tm_iou[~np.isnan(iou)], rtol=1e-6)
    assert tm_iou[NOWHERE] == 0.0
    assert np.isnan(acc).tolist() == [k in (PRED_ONLY, NOWHERE) for k in range(K)]
    np.testing.assert_allclose(acc[~np.isnan(acc)], tm_acc[~np.isnan(acc)], rtol=1e-6)
    assert tm_acc[PRED_ONLY] == 0.0 and tm_acc[NOWHERE] == 0.0
    assert iou[TRUTH_ONLY] == 0.0 and acc[TRUTH_ONLY] == 0.0  # a real 0, kept in the means

    # mIoU: same exclusion rule (TP+FP+FN == 0) -> equal
    np.testing.assert_allclose(s["miou"], tm_miou, rtol=1e-6)
    # mAcc: torchmetrics keeps the predicted-only class in the mean with 0, we leave it out
    assert s["macc"] > tm_macc + 1e-3
    np.testing.assert_allclose(tm_macc, np.sum(tm_acc) / (K - 1), rtol=1e-6)  # 8 of 9 classes
    np.testing.assert_allclose(s["macc"], np.mean(tm_acc[truth_present]), rtol=1e-6)
    np.testing.assert_allclose(s["pixel_acc"], tm_pix, rtol=1e-6)
    assert s["iou_excluded"] == [NAMES[NOWHERE]]
    assert s["acc_excluded"] == [NAMES[PRED_ONLY], NAMES[NOWHERE]]


def test_macc_equals_torchmetrics_when_every_class_is_in_the_truth():
    from torchmetrics import classification as tmc  # here, not at the top: see _ddp_worker

    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, K, (3, 12, 12), generator=g)
    target[torch.rand(3, 12, 12, generator=g) < 0.2] = IGN
    pred = torch.randint(0, K, (3, 12, 12), generator=g)
    s = segmentation_scores(confusion_matrix(pred, target, K))
    assert not s["acc_excluded"] and not s["iou_excluded"]
    tm = _tm(tmc.MulticlassAccuracy(K, average="macro", ignore_index=IGN), pred, target)
    np.testing.assert_allclose(s["macc"], tm, rtol=1e-6)


def test_binary_scores_match_torchmetrics():
    from torchmetrics import classification as tmc  # here, not at the top: see _ddp_worker

    g = torch.Generator().manual_seed(7)
    target = (torch.rand(4, 20, 20, generator=g) < 0.3).long()
    pred = torch.where(torch.rand(4, 20, 20, generator=g) < 0.8, target, 1 - target)
    target[torch.rand(4, 20, 20, generator=g) < 0.15] = IGN
    s = binary_scores(confusion_matrix(pred, target, 2))
    for key, metric in {
        "iou": tmc.BinaryJaccardIndex,
        "precision": tmc.BinaryPrecision,
        "recall": tmc.BinaryRecall,
        "f1": tmc.BinaryF1Score,
    }.items():
        want = _tm(metric(ignore_index=IGN), pred, target)
        np.testing.assert_allclose(s[key], want, rtol=1e-6, err_msg=key)
    valid = target != IGN
    assert s["tp"] == int(((pred == 1) & (target == 1) & valid).sum())
    assert s["tp"] + s["fp"] + s["fn"] + s["tn"] == int(valid.sum())


def test_binary_scores_without_water_are_nan_not_zero():
    from torchmetrics import classification as tmc  # here, not at the top: see _ddp_worker

    target = torch.tensor([0, 0, IGN, 0])
    pred = torch.tensor([0, 0, 1, 0])  # the water prediction falls on an ignored pixel
    s = binary_scores(confusion_matrix(pred, target, 2))
    assert all(math.isnan(s[k]) for k in ("iou", "precision", "recall", "f1"))
    assert s["accuracy"] == 1.0
    assert _tm(tmc.BinaryJaccardIndex(ignore_index=IGN), pred, target) == 0.0  # torchmetrics: 0


def test_accumulator_equals_one_shot_and_guards_double_reduction():
    acc = ConfusionMatrix(K)
    preds, targets = zip(*(_data(s, b=2) for s in range(3)), strict=True)
    for p, t in zip(preds, targets, strict=True):
        acc.update(p, t)
    one_shot = confusion_matrix(torch.cat(preds), torch.cat(targets), K)
    assert torch.equal(acc.compute(), one_shot)
    acc.all_reduce()  # not initialised: no-op
    assert torch.equal(acc.compute(), one_shot)
    with pytest.raises(RuntimeError, match="twice"):
        acc.all_reduce()
    with pytest.raises(RuntimeError, match="reset"):
        acc.update(preds[0], targets[0])
    acc.reset()
    assert int(acc.compute().sum()) == 0


def test_format_table_layout():
    pred, target = _data(0)
    s = segmentation_scores(confusion_matrix(pred, target, K), NAMES)
    text = format_table(s, NAMES, method="This work")
    lines = text.splitlines()
    assert lines[0] == (
        "| Method | Water | Built-up | Cropland | Grassland | Forest | Bare | Solar Panel | "
        "Wetland | Greenhouse | mIoU |"
    )
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "This work" and len(cells) == K + 2
    assert cells[1] == f"{s['iou']['water']:.2f}" and cells[-1] == f"{s['miou']:.2f}"
    assert cells[1 + NOWHERE] == "—"
    assert f"mAcc {s['macc']:.2f}" in text and f"pixel accuracy {s['pixel_acc']:.2f}" in text
    assert "greenhouse" in text.split("Left out")[1]


# ---- DDP: 2 gloo ranks, each with its own data -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    # different sizes and seeds per rank; rank 1 never sees class 0 in its truth
    pred, target = _data(100 + rank, b=3 + rank)
    if rank == 1:
        target[target == 0] = IGN
    return pred, target


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # A spawned rank re-imports this module: it imports torchmetrics only inside the tests that
    # use it, since importing it costs seconds per process.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    try:
        cm = ConfusionMatrix(K)
        pred, target = _rank_data(rank)
        for i in range(0, pred.shape[0], 2):  # a few batches
            cm.update(pred[i : i + 2], target[i : i + 2])
        local = cm.compute()
        cm.all_reduce()
        result = {"local": local.tolist(), "cm": cm.compute().tolist(), "scores": cm.scores(NAMES)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks_equals_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    preds, targets = zip(*(_rank_data(r) for r in range(2)), strict=True)
    single = confusion_matrix(
        torch.cat([p.reshape(-1) for p in preds]), torch.cat([t.reshape(-1) for t in targets]), K
    )
    want = json.loads(json.dumps(segmentation_scores(single, NAMES)))  # NaN -> NaN, same path
    for r, res in enumerate(results):
        assert res["local"] == confusion_matrix(preds[r], targets[r], K).tolist()
        assert res["local"] != single.tolist()  # each rank alone would report something else
        assert res["cm"] == single.tolist()
        # exact equality of every score (NaN compared as NaN)
        assert json.dumps(res["scores"], sort_keys=True) == json.dumps(want, sort_keys=True)
    local0 = segmentation_scores(torch.tensor(results[0]["local"]), NAMES)
    assert local0["miou"] != want["miou"]
