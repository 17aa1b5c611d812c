"""Top-k accuracy against hand-computed answers."""
import paddle
import pytest

from passl.evaluation.classification import evaluate
from passl.utils.accuracy import TopKEvaluator, topk_accuracy

# Four samples, four classes. Ranking of the classes per row (best first):
#   row 0: 2, 0, 1, 3   label 2 -> top1 hit
#   row 1: 3, 1, 2, 0   label 1 -> 2nd guess: top2 hit, not top1
#   row 2: 0, 3, 1, 2   label 2 -> 4th guess: miss for k < 4
#   row 3: 1, 3, 0, 2   label 0 -> 3rd guess: top3 hit
LOGITS = [[0.3, 0.2, 0.9, 0.1],
          [0.0, 0.5, 0.2, 0.7],
          [0.8, 0.3, 0.1, 0.4],
          [0.2, 0.9, 0.1, 0.6]]
LABELS = [2, 1, 2, 0]


def test_topk_accuracy_matches_hand_count_without_reading_the_device(host_reads):
    result = topk_accuracy(paddle.to_tensor(LOGITS), paddle.to_tensor(LABELS), ks=(1, 2, 3, 5))
    assert host_reads == []  # a training step logs these: read at log steps only
    assert {k: float(v) for k, v in result.items()} == pytest.approx(
        {"top1": 25.0, "top2": 50.0, "top3": 75.0, "top5": 100.0})


def test_evaluator_accumulates_batches_and_reads_the_device_once(host_reads):
    evaluator = TopKEvaluator(ks=(1, 2))
    evaluator.update(paddle.to_tensor(LOGITS[:1]), paddle.to_tensor(LABELS[:1]))  # 1/1, 1/1
    evaluator.update(paddle.to_tensor(LOGITS[1:]), paddle.to_tensor(LABELS[1:]))  # 0/3, 1/3
    assert host_reads == []
    assert evaluator.result() == pytest.approx({"top1": 25.0, "top2": 50.0, "count": 4})
    assert host_reads == ["numpy"]
    assert TopKEvaluator(ks=(1,)).result() == {"top1": 0.0, "count": 0}
    evaluator.reset()
    evaluator.update(paddle.to_tensor(LOGITS[2:3]), paddle.to_tensor(LABELS[2:3]))
    assert evaluator.result() == pytest.approx({"top1": 0.0, "top2": 0.0, "count": 1})


class FixedLogits(paddle.nn.Layer):
    """Stands in for Classification: returns the batch's 'images' as logits in eval mode."""

    def forward(self, batch):
        logits, labels = batch
        assert not self.training
        return {"logits": logits, "labels": labels}


def test_evaluate_over_a_loader_restores_train_mode():
    model = FixedLogits()
    model.train()
    loader = [(paddle.to_tensor(LOGITS[:3]), paddle.to_tensor(LABELS[:3])),
              (paddle.to_tensor(LOGITS[3:]), paddle.to_tensor(LABELS[3:]))]
    result = evaluate(model, loader, ks=(1, 3))
    assert result == pytest.approx({"top1": 25.0, "top3": 75.0, "count": 4})
    assert model.training
