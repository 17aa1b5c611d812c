"""Top-k evaluation of a classifier over a whole val loader (all ranks)."""
import paddle

from passl.utils.accuracy import TopKEvaluator


def evaluate(model, loader, ks=(1, 5)):
    """Top-k accuracy (percent) of ``model`` over ``loader``, summed over every rank.

    ``model(batch)`` in eval mode must return ``{'logits', 'labels'}`` (as ``Classification``
    does). The model runs in eval mode without gradients and gets its previous mode back.

    Returns:
        ``{'top1': float, 'top5': float, 'count': int}`` (one ``topK`` per ``k`` in ``ks``).
    """
    evaluator = TopKEvaluator(ks)
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            for batch in loader:
                outputs = model(batch)
                evaluator.update(outputs["logits"], outputs["labels"])
    finally:
        if was_training:
            model.train()
    return evaluator.result()
