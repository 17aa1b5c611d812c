"""EvalHook and KNNHook inside real (tiny) training runs: records, best epoch, evaluate-only."""
import numpy as np
import paddle
import pytest

from passl.config import load_config
from passl.data import build_dataloader
from passl.engine.trainer import Trainer
from passl.evaluation.knn import knn_evaluate
from passl.io.checkpoint import load_model_weights
from passl.io.metrics_log import read_metrics
from passl.models import MODELS
from tiny_image_folder import linear_config, write_config, write_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"))


def load(tmp_path, cfg):
    return load_config(write_config(tmp_path / "cfg.yaml", cfg))


def accuracy_by_hand(cfg, checkpoint):
    """Top-1 of the checkpoint's model on the val set, by NumPy argmax."""
    model = MODELS.build(cfg.model)
    load_model_weights(model, checkpoint)
    model.eval()
    hits = total = 0
    with paddle.no_grad():
        for images, labels in build_dataloader(cfg.dataloader.val, "val"):
            logits = model.fc(model.backbone(images)).numpy()
            hits += int((logits.argmax(axis=1) == labels.numpy()).sum())
            total += len(labels)
    return 100.0 * hits / total


def test_eval_hook_records_best_and_evaluate_only(tmp_path, data):
    cfg = load(tmp_path, linear_config(data, tmp_path / "out", epochs=3))
    trainer = Trainer(cfg)
    trainer.train()
    evals = read_metrics(str(tmp_path / "out" / "metrics.jsonl"), "eval")
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    top1 = [r["top1"] for r in evals]
    best = int(np.argmax(top1))  # first of the maxima, as the hook keeps the earlier epoch on ties
    assert evals[-1]["best_top1"] == top1[best] and evals[-1]["best_epoch"] == best + 1
    assert all(0.0 <= r["top1"] <= r["top5"] == 100.0 for r in evals)  # 3 classes: top-5 is all

    latest = str(tmp_path / "out" / "checkpoints" / "latest.pd")
    assert top1[-1] == pytest.approx(accuracy_by_hand(cfg, latest))
    saved = paddle.load(latest)["per_rank"][0]["hooks"]["EvalHook"]
    assert saved == {"best_top1": top1[best], "best_epoch": best + 1}
    with open(tmp_path / "out" / "train.log") as f:
        assert f"best val top1 {top1[best]:.2f} at epoch {best + 1}" in f.read()

    result = Trainer(cfg, load=latest, evaluate_only=True).evaluate()
    assert result == pytest.approx({"top1": top1[-1], "top5": 100.0})  # no best_* outside training


def test_knn_hook_records_knn_of_the_trained_model(tmp_path, data):
    plain = linear_config(data, tmp_path / "out", epochs=1)
    knn = {"name": "KNNHook", "k": 5, "train": plain["dataloader"]["train"],
           "val": plain["dataloader"]["val"]}
    knn["train"]["dataset"]["transforms"] = plain["dataloader"]["val"]["dataset"]["transforms"]
    cfg = load(tmp_path, {**plain, "hooks": [knn]})
    Trainer(cfg).train()
    record = read_metrics(str(tmp_path / "out" / "metrics.jsonl"), "eval")[-1]
    assert set(record) == {"type", "epoch", "iter", "knn_top1", "knn_top5"}

    model = MODELS.build(cfg.model)
    load_model_weights(model, str(tmp_path / "out" / "checkpoints" / "latest.pd"))
    bank = dict(cfg.hooks[0].train, sampler={"batch_size": 4})
    expected = knn_evaluate(model, build_dataloader(bank, "val"),
                            build_dataloader(cfg.hooks[0].val, "val"), k=5)
    assert record["knn_top1"] == pytest.approx(expected["knn_top1"])


class ScriptedClassifier(paddle.nn.Layer):
    """Eval-mode outputs from a script: epoch e's logits get ``hits[e]`` of 4 samples right."""

    def __init__(self, hits):
        super().__init__()
        self.hits, self.calls = hits, 0

    def forward(self, batch):
        _, labels = batch
        right = self.hits[self.calls]
        self.calls += 1
        predicted = [label if i < right else (label + 1) % 3 for i, label in enumerate(labels.tolist())]
        return {"logits": paddle.nn.functional.one_hot(paddle.to_tensor(predicted), 3),
                "labels": labels}


class FakeTrainer:
    def __init__(self, model):
        self.model, self.epoch = model, 0
        self.val_loader = [(paddle.zeros([4, 1]), paddle.to_tensor([0, 1, 2, 0]))]


def test_best_top1_survives_a_worse_epoch_and_a_resume():
    from passl.engine.hooks.eval_hook import EvalHook
    trainer, hook = FakeTrainer(ScriptedClassifier([2, 3, 1, 1])), EvalHook(topk=(1,))
    hook.before_run(trainer)
    results = []
    for trainer.epoch in range(3):
        results.append(hook.evaluate(trainer))
    assert [r["top1"] for r in results] == [50.0, 75.0, 25.0]
    assert results[-1]["best_top1"] == 75.0 and results[-1]["best_epoch"] == 2

    resumed = EvalHook(topk=(1,))
    resumed.set_state_dict(hook.state_dict())
    resumed.before_run(trainer)
    trainer.epoch = 3
    assert resumed.evaluate(trainer)["best_epoch"] == 2
