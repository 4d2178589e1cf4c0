"""The ``qat`` mode: quantization-aware fine-tuning of a calibrated ``torch_ptq`` model.

The calibrated model keeps its Q/DQ (fixed amax, straight-through gradients) and its weights are
fine-tuned for a few epochs at a low learning rate with cosine decay (NVIDIA's QAT recipe: start
from a calibrated model, ~10% of the original schedule). Export is the same as ``torch_ptq``
(:func:`qatcheck.quantize.torch_quant.export_qdq_onnx`).

Training is seeded inside a forked RNG so a QAT artifact is reproducible for the cache and the
global RNG of the test session is left untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from qatcheck.errors import ConfigError, DataError
from qatcheck.tasks.heads import HeadTargets

__all__ = ["QATConfig", "cross_entropy", "finetune"]

OPTIMIZERS = ("sgd", "adam")
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QATConfig:
    """Fine-tuning schedule. ``max_batches_per_epoch`` caps each epoch (quick suites);
    ``optimizer`` is SGD with momentum 0.9 (the usual QAT choice) or Adam."""

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 64
    max_batches_per_epoch: int | None = None
    seed: int = 0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.lr > 0 or self.batch_size < 1:
            raise ConfigError(f"QATConfig needs epochs >= 1, lr > 0, batch_size >= 1; got {self}")
        if self.max_batches_per_epoch is not None and self.max_batches_per_epoch < 1:
            raise ConfigError(f"QATConfig.max_batches_per_epoch must be >= 1 or None; "
                              f"got {self.max_batches_per_epoch}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"QATConfig.optimizer {self.optimizer!r} is unknown; "
                              f"choose one of {', '.join(OPTIMIZERS)}")


def _make_optimizer(params: Iterable[nn.Parameter], config: QATConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


def cross_entropy(output: int = 0, head: str | None = None) -> LossFn:
    """The default loss: cross-entropy against int labels (they often arrive as int32 / uint8, CE
    needs int64). A model returning several outputs is trained on output ``output`` (the one its
    task scores); targets given per head (:class:`~qatcheck.tasks.heads.HeadTargets`) are read at
    ``head``."""
    def loss(outputs: Any, targets: Any) -> torch.Tensor:
        scores = outputs[output] if isinstance(outputs, (tuple, list)) else outputs
        if isinstance(targets, HeadTargets):
            targets = torch.as_tensor(np.asarray(targets[head]), device=scores.device)
        try:
            return nn.functional.cross_entropy(scores, targets.long())
        except (AttributeError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            # a task that is not classification, targets that are not labels: torch's words
            # would not say what to set
            where = f"output {head!r}" if head else f"output {output}"
            raise ConfigError(f"QAT's default loss (cross-entropy of {where} against int class labels) "
                              f"cannot train on this model and train_data ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}): set Recipe.loss") from exc
    return loss


def _targets(labels: Any, device: torch.device) -> Any:
    """Numeric labels become a tensor on ``device``; anything else (detection annotations, targets
    per head) is handed to the caller's loss function unchanged."""
    if torch.is_tensor(labels):
        return labels.to(device)
    if isinstance(labels, HeadTargets):
        return labels
    try:
        array = np.asarray(labels)
    except ValueError:  # ragged per-image annotations
        return labels
    if array.dtype.kind in "biuf":
        return torch.as_tensor(array, device=device)
    return labels


def _cosine(step: int, total: int) -> float:
    """Cosine decay factor from 1 at step 0 towards 0 at ``total``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _epoch_batches(train_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                   config: QATConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for n, batch in enumerate(train_batches()):
        if config.max_batches_per_epoch is not None and n >= config.max_batches_per_epoch:
            return
        yield batch


def _steps_per_epoch(train_batches: Callable[[], Iterable[Any]], config: QATConfig) -> int | None:
    """Steps per epoch when knowable without a data pass (for a per-step cosine schedule)."""
    if config.max_batches_per_epoch is not None:
        return config.max_batches_per_epoch
    probe = train_batches()
    return len(probe) if hasattr(probe, "__len__") else None  # type: ignore[arg-type]


def finetune(qmodel: nn.Module,
             train_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
             config: QATConfig, loss_fn: LossFn | None = None,
             device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``qmodel`` in place; returns ``{"epochs", "final_loss", "losses", "steps"}``
    (``losses``: mean loss per epoch). The model ends in eval mode.

    ``train_batches()`` must return a fresh iterable of ``(images, labels)`` per epoch (shuffling is
    the dataset's concern). ``loss_fn(outputs, targets)`` gets what the model returns (a tuple for
    several outputs) and the batch's targets (a tensor for numeric labels, a HeadTargets or the
    annotations as given otherwise); it defaults to :func:`cross_entropy` on output 0
    (classification); detection recipes pass their own. The learning rate decays per step along a
    cosine when the epoch length is known (``max_batches_per_epoch`` or a sized iterable), else per
    epoch (so a single uncapped epoch of an unsized iterator runs at constant ``lr``).
    """
    device = torch.device(device)
    loss_fn = loss_fn or cross_entropy()
    qmodel.to(device)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("QAT: the model has no trainable parameters (all requires_grad=False)")
    steps_per_epoch = _steps_per_epoch(train_batches, config)
    total = steps_per_epoch * config.epochs if steps_per_epoch else config.epochs
    losses: list[float] = []
    step = 0
    rng_devices = [device] if device.type == "cuda" else []
    cudnn = torch.backends.cudnn
    saved_cudnn = (cudnn.deterministic, cudnn.benchmark)
    # cuDNN's autotuned / atomic-add kernels make conv backward nondeterministic; a QAT artifact is
    # cached by its inputs, so it must come out the same each time.
    cudnn.deterministic, cudnn.benchmark = True, False
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        optimizer = _make_optimizer(params, config)
        qmodel.train()
        try:
            for epoch in range(config.epochs):
                batches: Iterable[Any] = _epoch_batches(train_batches, config)
                if progress:
                    from tqdm import tqdm
                    batches = tqdm(batches, desc=f"qat epoch {epoch + 1}/{config.epochs}",
                                   unit="batch", total=steps_per_epoch)
                epoch_sum, epoch_n = 0.0, 0
                for images, labels in batches:
                    position = step if steps_per_epoch else epoch
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * _cosine(position, total)
                    x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=device)
                    y = _targets(labels, device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(qmodel(x), y)
                    if not torch.isfinite(loss):
                        raise ConfigError(f"QAT loss became {loss.item()} at epoch {epoch + 1}, "
                                          f"step {epoch_n + 1} (lr={config.lr} too high?)")
                    loss.backward()
                    optimizer.step()
                    epoch_sum += float(loss.detach())
                    epoch_n += 1
                    step += 1
                if epoch_n == 0:
                    raise DataError(f"QAT training data yielded no batches in epoch {epoch + 1}")
                losses.append(epoch_sum / epoch_n)
        finally:
            qmodel.eval()
            cudnn.deterministic, cudnn.benchmark = saved_cudnn
    return {"epochs": config.epochs, "final_loss": losses[-1], "losses": losses, "steps": step}
