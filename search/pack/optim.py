"""One optimizer for a pack: every member's own torch.optim update over the stacked parameters.

Each parameter is [K, ...] with member k in row k (`models.stacked.StackedNet`). Member k steps with its own
kind (Adam, AdamW, SGD with momentum, RMSprop with momentum), learning rate, weight decay and momentum, by the
update rules of `torch.optim.Adam`, `AdamW`, `SGD` and `RMSprop` at this project's settings (betas, eps and
alpha at torch's defaults, no dampening, no Nesterov, no AMSGrad, RMSprop not centered). Members of one kind
in consecutive rows are updated together, as views of the stacked tensors: a pack orders its members by kind.

Learning rates come per step as a [K] float64 tensor on the device (base rate x the member's schedule
factor), so no step reads the device from the host. Per-member coefficients are computed in float64 and
rounded once to the parameters' precision, as torch.optim rounds its Python-float scalars, and each update
uses the same fused operations as torch.optim's (add with alpha is addcmul, addcdiv with a value is addcdiv of
a scaled numerator): on the CPU the members' parameters equal torch.optim's bit for bit. Updates are in place
and use two workspaces the size of the largest parameter, because a fresh temporary of a large stacked
parameter costs a page-faulting allocation on every step on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

KINDS = ("adam", "adamw", "sgd", "rmsprop")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam and AdamW defaults
ADAM_EPS = 1e-8
RMSPROP_ALPHA = 0.99  # torch.optim.RMSprop defaults
RMSPROP_EPS = 1e-8


@dataclass(frozen=True)
class _Run:
    """Rows start..stop-1, all of one optimizer kind."""

    kind: str
    start: int
    stop: int


def _runs(kinds: Sequence[str]) -> list[_Run]:
    runs: list[_Run] = []
    for row, kind in enumerate(kinds):
        if runs and runs[-1].kind == kind:
            runs[-1] = _Run(kind, runs[-1].start, row + 1)
        else:
            runs.append(_Run(kind, row, row + 1))
    return runs


class StackedOptimizer:
    """Per-member updates of stacked parameters; see the module docstring.

    State per parameter: two slots shaped like it ("first": Adam's exp_avg or the momentum buffer of SGD and
    RMSprop; "second": Adam's exp_avg_sq or RMSprop's square_avg), allocated only when a member's kind uses
    them. Adam's step count is shared: members step together and only ever leave.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], kinds: Sequence[str], weight_decay: Sequence[float],
                 momentum: Sequence[float]) -> None:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown optimizer kind {', '.join(unknown)}; known: {', '.join(KINDS)}")
        if not len(kinds) == len(weight_decay) == len(momentum):
            raise ValueError("one kind, weight decay and momentum per member")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameter")
        device = self.params[0].device
        self.kinds = list(kinds)
        self.weight_decay = torch.tensor(list(weight_decay), dtype=torch.float64, device=device)
        self.momentum = torch.tensor(list(momentum), dtype=torch.float64, device=device)
        self.steps = 0
        self.first = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        needs_second = any(kind in ("adam", "adamw", "rmsprop") for kind in kinds)
        self.second = [torch.zeros_like(p, memory_format=torch.contiguous_format) if needs_second else None
                       for p in self.params]
        self._work = self._workspaces()
        self._runs = _runs(self.kinds)
        self._decays = {run: bool((self.weight_decay[run.start:run.stop] != 0).any()) for run in self._runs}

    def _workspaces(self) -> tuple[torch.Tensor, torch.Tensor]:
        size, like = max(p.numel() for p in self.params), self.params[0]
        return tuple(torch.empty(size, dtype=like.dtype, device=like.device) for _ in range(2))

    @property
    def members(self) -> int:
        return len(self.kinds)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update of every member; lr is [K] float64 on the device: each member's rate for this step."""
        self.steps += 1
        for run in self._runs:
            rows = slice(run.start, run.stop)
            update = _UPDATES[run.kind]
            coefficients = {name: value.to(self.params[0].dtype)
                            for name, value in update.coefficients(self, lr[rows], rows).items()}
            for index, p in enumerate(self.params):
                if p.grad is None:
                    continue
                shape = (run.stop - run.start,) + (1,) * (p.ndim - 1)
                scalars = {name: value.view(shape) for name, value in coefficients.items()}
                work, spare = (w[: p[rows].numel()].view(p[rows].shape) for w in self._work)
                second = self.second[index][rows] if self.second[index] is not None else None
                update.apply(p[rows], p.grad[rows], self.first[index][rows], second, work, spare, scalars,
                             self._decays[run], self.steps)

    def state_dict(self) -> dict[str, Any]:
        """The step count and the state slots, for a checkpoint; kinds and coefficients come with the members."""
        return {"steps": self.steps, "first": list(self.first), "second": list(self.second)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the state of an optimizer of the same members (a ValueError for one of other shapes)."""
        for slots, saved in ((self.first, state["first"]), (self.second, state["second"])):
            if len(saved) != len(slots) or any(
                    (slot is None) != (tensor is None) or (slot is not None and slot.shape != tensor.shape)
                    for slot, tensor in zip(slots, saved)):
                raise ValueError("the saved optimizer state is of other members or parameters")
        for slots, saved in ((self.first, state["first"]), (self.second, state["second"])):
            for slot, tensor in zip(slots, saved):
                if slot is not None:
                    slot.copy_(tensor)
        self.steps = int(state["steps"])

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with members `rows` only (the parameters were sliced the same way, in place)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.weight_decay.device)
        self.kinds = [self.kinds[i] for i in index.tolist()]
        self.weight_decay, self.momentum = self.weight_decay[index], self.momentum[index]
        self.first = [slot[index].clone() for slot in self.first]
        self.second = [slot[index].clone() if slot is not None else None for slot in self.second]
        self._work = self._workspaces()
        self._runs = _runs(self.kinds)
        self._decays = {run: bool((self.weight_decay[run.start:run.stop] != 0).any()) for run in self._runs}


class _Adam:
    """torch.optim.Adam (coupled weight decay) and, decoupled, AdamW: `_single_tensor_adam`."""

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled

    def coefficients(self, optimizer: StackedOptimizer, lr: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        beta1, _ = ADAM_BETAS
        coefficients = {"step_size": -lr / (1 - beta1 ** optimizer.steps)}
        if self.decoupled:
            coefficients["shrink"] = 1 - lr * optimizer.weight_decay[rows]
        else:
            coefficients["decay"] = optimizer.weight_decay[rows]
        return coefficients

    def apply(self, p, grad, exp_avg, exp_avg_sq, work, spare, scalars, decays: bool, steps: int) -> None:
        beta1, beta2 = ADAM_BETAS
        if decays:
            if self.decoupled:
                p.mul_(scalars["shrink"])
            else:
                grad.addcmul_(p, scalars["decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = torch.sqrt(exp_avg_sq, out=work).div_((1 - beta2 ** steps) ** 0.5).add_(ADAM_EPS)
        p.addcdiv_(torch.mul(exp_avg, scalars["step_size"], out=spare), denom)


class _SGD:
    """torch.optim.SGD with momentum, no dampening: its first step's buffer is the gradient (0 * 0 + g)."""

    def coefficients(self, optimizer: StackedOptimizer, lr: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        return {"lr": -lr, "decay": optimizer.weight_decay[rows], "momentum": optimizer.momentum[rows]}

    def apply(self, p, grad, buf, _second, _work, _spare, scalars, decays: bool, steps: int) -> None:
        if decays:
            grad.addcmul_(p, scalars["decay"])
        buf.mul_(scalars["momentum"]).add_(grad)
        p.addcmul_(buf, scalars["lr"])


class _RMSprop:
    """torch.optim.RMSprop with momentum, not centered (momentum 0 gives its plain update: buf = g / avg)."""

    def coefficients(self, optimizer: StackedOptimizer, lr: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        return {"lr": -lr, "decay": optimizer.weight_decay[rows], "momentum": optimizer.momentum[rows]}

    def apply(self, p, grad, buf, square_avg, work, _spare, scalars, decays: bool, steps: int) -> None:
        if decays:
            grad.addcmul_(p, scalars["decay"])
        square_avg.mul_(RMSPROP_ALPHA).addcmul_(grad, grad, value=1 - RMSPROP_ALPHA)
        avg = torch.sqrt(square_avg, out=work).add_(RMSPROP_EPS)
        buf.mul_(scalars["momentum"]).addcdiv_(grad, avg)
        p.addcmul_(buf, scalars["lr"])


_UPDATES = {"adam": _Adam(decoupled=False), "adamw": _Adam(decoupled=True), "sgd": _SGD(), "rmsprop": _RMSprop()}

__all__ = ["KINDS", "StackedOptimizer"]
