"""A short demonstration on the synthetic two-modality benchmark: rates and kept fractions per epoch."""

from __future__ import annotations

import time

import torch
from torch import nn

from .data import modality_competition
from ..fusion import ConcatFusion, modality_param_groups
from .models import MLPEncoder
from ..optim import MaskedMultiModalSGD
from ..significance import ModalSignificance

__all__ = ["run_demo"]


@torch.no_grad()
def _accuracies(encoders, head, split) -> dict[str, float]:
    x, y = split
    feats = {m: encoders[m](x[m]) for m in encoders}
    out = head(feats)
    acc = {"fused": (out.logits.argmax(1) == y).float().mean().item()}
    for m, o in out.modality_logits.items():
        acc[m] = (o.argmax(1) == y).float().mean().item()
    return acc


def run_demo(
    epochs: int = 20,
    mask: str = "amss",
    granularity: str = "element",
    rule: str = "ratio",
    n: int = 5000,
    setting: str = "xor",
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 0.01,
    baseline: bool = True,
    print_fn=print,
) -> dict:
    """Train two MLP encoders and a concatenation head with ``MaskedMultiModalSGD``.

    Every step, ``ModalSignificance(rule=rule)`` turns the head's per-modality slice logits into keep
    rates (``"ratio"``: the weakest modality at rate 1, every rate 1 once both modalities are
    informative (the default release); ``"softmax"``: the paper's, summing to 1, never released);
    each epoch prints the mean rates, the mean fraction of units actually kept, and validation
    accuracy of the fused head and of each modality's slice. With ``baseline``, the same model
    (same seed, same initial weights, same batches) is then trained with ``mask="none"`` (plain
    SGD) and both test accuracies are printed. Returns the per-epoch history and test accuracies.
    """
    ModalSignificance(rule=rule)  # a bad rule fails here, with the estimator's message, before any training
    result = _train(epochs, mask, granularity, rule, n, setting, seed, batch_size, lr, print_fn, verbose=True)
    if baseline and mask != "none":
        joint = _train(epochs, "none", granularity, rule, n, setting, seed, batch_size, lr, print_fn, verbose=False)
        result["baseline_test_accuracy"] = joint["test_accuracy"]
        names = [m for m in joint["test_accuracy"] if m != "fused"]
        print_fn(
            f"plain SGD, same seed and batches:  fused {joint['test_accuracy']['fused']:.3f}, "
            + ", ".join(f"slice {m} {joint['test_accuracy'][m]:.3f}" for m in names)
            + "  (one seed: an illustration, not evidence)"
        )
    return result


def _train(epochs, mask, granularity, rule, n, setting, seed, batch_size, lr, print_fn, verbose) -> dict:
    if not verbose:
        print_fn = lambda *_: None  # noqa: E731
    torch.manual_seed(seed)
    data = modality_competition(setting, n=n, seed=seed)
    encoders = nn.ModuleDict({m: MLPEncoder(d, (128,), 64) for m, d in data.dims.items()})
    head = ConcatFusion({m: 64 for m in encoders}, data.num_classes)
    opt = MaskedMultiModalSGD(
        modality_param_groups(encoders, shared=head),
        lr=lr, momentum=0.9, weight_decay=1e-4, mask=mask, granularity=granularity, seed=seed,
    )
    estimator = ModalSignificance(rule=rule)
    x_train, y_train = data.train
    gen = torch.Generator().manual_seed(seed)
    names = list(encoders)
    print_fn(
        f"masked_optim demo: synthetic '{setting}' data (modality a: fast, partly informative; "
        f"b: slow, fully informative), mask={mask!r}, granularity={granularity!r}, rule={rule!r}, "
        f"{epochs} epochs"
    )
    header = f"{'epoch':>5} {'loss':>7} " + " ".join(f"{'rate_' + m:>7}" for m in names)
    header += " " + " ".join(f"{'kept_' + m:>7}" for m in names)
    header += f" {'val_fused':>9} " + " ".join(f"{'val_' + m:>6}" for m in names) + f" {'fallback':>8}"
    print_fn(header)
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(y_train.shape[0], generator=gen)
        sums = {"loss": 0.0, "steps": 0, "fallback": 0}
        rate_sum = {m: 0.0 for m in names}
        kept_sum = {m: 0.0 for m in names}
        for i in range(0, perm.numel(), batch_size):
            idx = perm[i : i + batch_size]
            feats = {m: encoders[m](x_train[m][idx]) for m in names}
            out = head(feats)
            loss = nn.functional.cross_entropy(out.logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            rates = estimator({m: o.detach() for m, o in out.modality_logits.items()}, y_train[idx])
            opt.step(rates=rates)
            stats = opt.last_step_stats()
            for m in names:
                rate_sum[m] += stats[m].rate
                kept_sum[m] += stats[m].kept_fraction
            sums["loss"] += loss.item()
            sums["steps"] += 1
            sums["fallback"] += int(estimator.last.fallback)
        steps = sums["steps"]
        acc = _accuracies(encoders, head, data.val)
        row = {
            "epoch": epoch,
            "loss": sums["loss"] / steps,
            "rate": {m: rate_sum[m] / steps for m in names},
            "kept_fraction": {m: kept_sum[m] / steps for m in names},
            "val_accuracy": acc,
            "fallback_fraction": sums["fallback"] / steps,
        }
        history.append(row)
        line = f"{epoch:>5} {row['loss']:>7.4f} " + " ".join(f"{row['rate'][m]:>7.3f}" for m in names)
        line += " " + " ".join(f"{row['kept_fraction'][m]:>7.3f}" for m in names)
        line += f" {acc['fused']:>9.3f} " + " ".join(f"{acc[m]:>6.3f}" for m in names)
        line += f" {row['fallback_fraction']:>8.2f}"
        print_fn(line)
    test = _accuracies(encoders, head, data.test)
    print_fn(
        f"{mask + ' test accuracy:':<34} fused {test['fused']:.3f}, "
        + ", ".join(f"slice {m} {test[m]:.3f}" for m in names)
        + f"  ({time.perf_counter() - start:.1f} s)"
    )
    return {"history": history, "test_accuracy": test}
