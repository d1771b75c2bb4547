"""Trial packs: K trials of one family that share their shapes and data, trained as one stacked model.

A pack's members share every parameter but the family's `pack_members` (learning rate, schedule, optimizer,
weight decay, momentum, loss, dropout); each starts from its solo run's weights and sees its solo run's
batches (the pack's data seed), so a member equals the trial it would have been alone. `run_pack` trains
them through the epoch loop every trial runs through (`runner`, over `search.trial.train_members`),
`StackedOptimizer` steps them (`optim`), `pack_size` says how many fit (`size`).
"""

from search.pack.optim import StackedOptimizer
from search.pack.runner import Member, MemberResult, check_pack, member_losses, run_pack
from search.pack.size import pack_size

__all__ = ["Member", "MemberResult", "StackedOptimizer", "check_pack", "member_losses", "pack_size", "run_pack"]
