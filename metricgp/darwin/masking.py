"""Genomes applied to the dense model in place by masking, touching only the genes that changed.

`StructuredMasks.apply(genome)` restores the output projection of every module whose level differs
from the previously applied genome, then zeroes the columns of the units its new level removes
(`metricgp.structured.shrink.mask_plan`: the same logits as physical shrinking). The result is
bitwise the same as restoring everything and masking the whole genome, whatever came before.
`build(genome)` gives a physically smaller copy instead (for training, which must not let pruned
structures grow back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metricgp.darwin.database import LevelDatabase
from metricgp.structured.evaluator import StructuredPruner, StructuredSpec
from metricgp.structured.shrink import mask_plan


def restore_linears(dense, names: Sequence[str]) -> None:
    """Copy the dense weights back into the named linears only."""
    dense.restore(names)


class StructuredMasks:
    """`refit` (the pruner's `output_refit()`, optional): each level's output projection gets its
    least-squares update instead of plain zeroed columns, masked and shrunk alike (`build` asks the
    pruner for the same refit)."""

    def __init__(self, pruner: StructuredPruner, db: LevelDatabase, refit=None):
        if [m.name for m in pruner.modules] != db.names:
            raise ValueError("the level database was built for another model (module names differ)")
        self.pruner = pruner
        self.db = db
        self.refit = refit
        self.model: nn.Module = pruner.setup.model
        self.current = [0] * len(db.names)
        pruner.setup.dense.restore()

    def apply(self, genome: Sequence[int]) -> int:
        """Mask `genome` on the model; returns how many modules were swapped."""
        changed = [i for i, (a, b) in enumerate(zip(genome, self.current, strict=True)) if a != b]
        for i in changed:
            module, units = self.pruner.modules[i], self.db.units_at(i, genome[i])
            out = module.slices[-1].linear
            restore_linears(self.pruner.setup.dense, [out])
            if self.refit is not None and units:
                with torch.no_grad():
                    self.model.get_submodule(out).weight.copy_(self.refit.weight(module, units))
            else:
                mask_plan(self.model, self.pruner.modules, units)
            self.current[i] = int(genome[i])
        return len(changed)

    def reset(self) -> None:
        self.pruner.setup.dense.restore()
        self.current = [0] * len(self.db.names)

    def build(self, genome: Sequence[int]) -> nn.Module:
        """A physically shrunk deep copy without the genome's units (the dense model is untouched)."""
        self.reset()
        return self.pruner.build(self.db.removed(tuple(genome)), StructuredSpec(refit=self.refit is not None))
