"""Recovery fine-tuning of a pruned causal LM, for any pruning: structured (shrunk layers), unstructured
and N:M (masks kept), with cross-entropy, distillation from the dense model, or both.

    loop.py     `recover`: token budget, seeded batches, lr schedule, clipping, validation perplexity,
                checkpoints with a callback and a resumable state; `training_windows` (never a test split)
    methods.py  what is trained: "lora", "full"; masks that keep a sparsity pattern (`sparse_masks`)
    losses.py   "ce", "kd", "ce+kd": the dense model's top-k on disk (`build_teacher`, before pruning),
                the student's loss a chunk of positions at a time

`metricgp.structured.recover` adds group LoRA (SAAP) on top of this loop.
"""

from metricgp.recover.loop import SCHEDULES, RecoveryConfig, RecoveryReport, recover, training_windows
from metricgp.recover.losses import KD_TOPK, LOSSES, Teacher, build_teacher, get_loss, kl_per_position
from metricgp.recover.methods import RECOVERY_METHODS, Method, Trainable, sparse_masks

__all__ = ["KD_TOPK", "LOSSES", "RECOVERY_METHODS", "SCHEDULES", "Method", "RecoveryConfig", "RecoveryReport",
           "Teacher", "Trainable", "build_teacher", "get_loss", "kl_per_position", "recover", "sparse_masks",
           "training_windows"]
