"""K networks of one shape run as one: a shared input meets every member's weights in one wide operation.

`StackedNet.of(nets)` takes K flat `nn.Sequential`s of one architecture (Linear, Conv2d, BatchNorm, ReLU,
Dropout, pooling, Flatten), each already initialised, and copies their weights into stacked tensors. Every
parameter and buffer has shape [K, *the member's own shape] (a Linear layer after the first holds its weight
transposed, [K, in, out]), so member k is row k of each tensor: an optimizer broadcasts per-member
hyperparameters over the first dimension, and `keep` slices members out.

The forward pass, for an input batch x shared by all members:
- the first Linear is one GEMM of x [B, F] with the members' weights side by side ([F, K*H]); later Linears
  are one batched matmul over [K, B, H];
- the first Conv2d is one convolution with K*C output channels; later ones are grouped (groups=K), so member
  k owns channels k*C..(k+1)*C-1 throughout;
- BatchNorm normalises K*C channels, which is per member per channel (its own weights and running statistics);
- Dropout applies each member's own rate, with its masks drawn from the member's own generator when given
  (the masks its solo network draws on the CPU), else one mask for all; pooling and ReLU act per channel.
The output is [K, B, classes]. Member k's weights, read back with `member_state_dict(k)`, load into the
Sequential it came from.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Where a tensor between layers stands: one input shared by every member ([B, ...]), member k's channels as
# block k of the channel dimension ([B, K*C, H, W]), or one row per member ([K, B, F]).
SHARED, CHANNELS, MEMBERS = "shared", "channels", "members"
_ELEMENTWISE = (nn.ReLU, nn.Identity, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class NotStackable(ValueError):
    """The networks cannot be stacked: not flat Sequentials of supported layers, or not of one shape."""


class StackedNet(nn.Module):
    """K members as one network; see the module docstring. Build it with `StackedNet.of`."""

    def __init__(self, layers: list[nn.Module], members: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.members = members

    @classmethod
    def of(cls, nets: Sequence[nn.Module], generators: Sequence[torch.Generator] | None = None) -> StackedNet:
        """Stack `nets`; with `generators` (one per member), member k's dropout masks come from generators[k]."""
        if not nets:
            raise NotStackable("no network to stack")
        flat = [list(net) if isinstance(net, nn.Sequential) else None for net in nets]
        if any(f is None for f in flat):
            raise NotStackable("only nn.Sequential networks can be stacked")
        if len({len(f) for f in flat}) != 1:
            raise NotStackable("the networks have different numbers of layers")
        layout, layers = SHARED, []
        for position in range(len(flat[0])):
            layer, layout = _stack_layer([f[position] for f in flat], layout, position,
                                         list(generators) if generators is not None else None)
            layers.append(layer)
        if layout != MEMBERS:
            raise NotStackable("the networks must end with a Linear layer or a Flatten")
        return cls(layers, len(nets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [K, B, classes] of the shared input batch x."""
        for layer in self.layers:
            x = layer(x)
        return x

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with members `rows` (in that order) only: every stacked parameter and buffer is sliced.

        Parameters stay the same objects (their data is replaced, their gradients dropped).
        """
        index = torch.as_tensor(list(rows), dtype=torch.long)
        for module in self.layers:
            if isinstance(module, _Stacked):
                module.keep(index)
        self.members = len(index)

    def member_state_dict(self, row: int) -> dict[str, torch.Tensor]:
        """Member `row`'s weights and statistics under the names of the Sequential it was stacked from."""
        state = {}
        for position, module in enumerate(self.layers):
            if isinstance(module, _Stacked):
                state.update({f"{position}.{name}": tensor for name, tensor in module.member_state(row).items()})
        return state


class _Stacked(nn.Module):
    """A layer of K members whose parameters and buffers are [K, ...]."""

    members: int

    def keep(self, index: torch.Tensor) -> None:
        for param in self.parameters(recurse=False):  # in place: an optimizer holding them keeps working
            param.grad = None
            param.data = param.data[index.to(param.device)].clone()
        for name, buffer in list(self.named_buffers(recurse=False)):
            self.register_buffer(name, buffer[index.to(buffer.device)].clone(),
                                 persistent=name not in self._non_persistent_buffers_set)
        self.members = len(index)

    def member_state(self, row: int) -> dict[str, torch.Tensor]:
        """Member `row`'s state dict, as the layer it was stacked from names and shapes it."""
        return {name: tensor[row].clone() for name, tensor in self.state_dict().items()}


class _Linear(_Stacked):
    """Linear layers of K members, bias [K, out]. On the shared input, weight [K, out, in]: one GEMM with all
    members' rows. After it, weight [K, in, out], so the batched matmul and its gradient need no transpose."""

    def __init__(self, linears: list[nn.Linear], shared_input: bool) -> None:
        super().__init__()
        self.members, self.shared_input = len(linears), shared_input
        weights = [m.weight.detach() if shared_input else m.weight.detach().t() for m in linears]
        self.weight = nn.Parameter(torch.stack(weights).contiguous())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears]).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:  # one GEMM: [B, F] x [F, K*out]
            k, out = self.weight.shape[:2]
            y = F.linear(x, self.weight.reshape(k * out, -1), self.bias.reshape(k * out))
            return y.view(len(x), k, out).transpose(0, 1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def member_state(self, row: int) -> dict[str, torch.Tensor]:
        state = super().member_state(row)
        if not self.shared_input:
            state["weight"] = state["weight"].t().contiguous()
        return state


class _Conv(_Stacked):
    """Conv2d layers of K members: weight [K, out, in, kh, kw]; one convolution, grouped after the first."""

    def __init__(self, convs: list[nn.Conv2d], shared_input: bool) -> None:
        super().__init__()
        first = convs[0]
        self.members, self.shared_input = len(convs), shared_input
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.weight = nn.Parameter(torch.stack([m.weight.detach().contiguous() for m in convs]))
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in convs])) if first.bias is not None
                     else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        weight = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, 1 if self.shared_input else k)


class _BatchNorm(_Stacked):
    """BatchNorm of K members over K*C channels: weight, bias, running statistics [K, C]; counts [K]."""

    def __init__(self, norms: list[nn.modules.batchnorm._BatchNorm], layout: str) -> None:
        super().__init__()
        first = norms[0]
        self.members, self.layout = len(norms), layout
        self.eps, self.momentum = first.eps, first.momentum
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in norms]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in norms]))
        self.register_buffer("running_mean", torch.stack([m.running_mean for m in norms]).clone())
        self.register_buffer("running_var", torch.stack([m.running_var for m in norms]).clone())
        self.register_buffer("num_batches_tracked", torch.stack([m.num_batches_tracked for m in norms]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        args = (self.running_mean.view(-1), self.running_var.view(-1), self.weight.reshape(-1),
                self.bias.reshape(-1), self.training, self.momentum, self.eps)
        if self.layout == CHANNELS:
            return F.batch_norm(x, *args)
        k, b, width = x.shape  # [K, B, H] -> [B, K*H]: member k's features are channels k*H..(k+1)*H-1
        y = F.batch_norm(x.transpose(0, 1).reshape(b, k * width), *args)
        return y.view(b, k, width).transpose(0, 1)


class _Dropout(_Stacked):
    """Dropout of K members, each at its own rate (buffer `rates` [K]).

    Without generators, one mask is drawn for all members at once. With one generator per member, member k's
    mask is drawn from its own generator as `torch.nn.functional.dropout` draws on the CPU (no draw at rate 0,
    a Bernoulli draw of the member's [B, H] block, scaled by 1/(1 - rate)): a generator in the state the global
    one has when a solo network starts training gives that network's masks.
    """

    def __init__(self, dropouts: list[nn.Dropout], generators: list[torch.Generator] | None) -> None:
        super().__init__()
        self.members = len(dropouts)
        self.rate_list = [float(m.p) for m in dropouts]  # on the host: no device read per step
        self.register_buffer("rates", torch.tensor(self.rate_list), persistent=False)
        self.generators = generators

    def keep(self, index: torch.Tensor) -> None:
        rows = index.tolist()
        self.rate_list = [self.rate_list[i] for i in rows]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in rows]
        super().keep(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.rate_list):
            return x
        if self.generators is None:  # one draw: unit u of member k is kept when uniform < 1 - rate_k
            keep = 1.0 - self.rates.view(-1, 1, 1)
            scale = torch.where(keep > 0, 1.0 / keep.clamp_min(1e-12), torch.zeros_like(keep)).to(x.dtype)
            return x * (torch.rand(x.shape, device=x.device) < keep) * scale
        noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for block, rate, generator in zip(noise, self.rate_list, self.generators):
            if rate == 0:
                block.fill_(1)
            elif rate == 1:
                block.zero_()
            else:
                block.bernoulli_(1 - rate, generator=generator).div_(1 - rate)
        return x * noise


class _Stateless(nn.Module):
    """A parameterless layer that acts the same on every member's part: ReLU, pooling (per channel)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class _Flatten(_Stacked):
    """Flatten from dimension 1, per member: [B, ...] stays shared, [B, K*C, H, W] becomes [K, B, C*H*W]."""

    def __init__(self, members: int, layout: str) -> None:
        super().__init__()
        self.members, self.layout = members, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == SHARED:
            return x.flatten(1)
        if self.layout == MEMBERS:
            return x.flatten(2)
        return x.reshape(len(x), self.members, -1).transpose(0, 1)


def _same(modules: list[nn.Module], *attributes: str) -> bool:
    first = modules[0]
    return all(type(m) is type(first) and all(getattr(m, a) == getattr(first, a) for a in attributes)
               for m in modules)


def _stack_layer(modules: list[nn.Module], layout: str, position: int,
                 generators: list[torch.Generator] | None) -> tuple[nn.Module, str]:
    """The stacked layer for the members' layers at `position`, and the layout of its output."""
    first = modules[0]
    where = f"layer {position} ({type(first).__name__})"
    if not all(type(m) is type(first) for m in modules):
        raise NotStackable(f"{where}: the networks differ in layer type")
    if isinstance(first, nn.Linear):
        if not _same(modules, "in_features", "out_features") or any(m.bias is None for m in modules):
            raise NotStackable(f"{where}: Linear layers must have one shape and a bias")
        if layout == CHANNELS:
            raise NotStackable(f"{where}: a Linear layer on channels needs a Flatten before it")
        return _Linear(modules, shared_input=layout == SHARED), MEMBERS
    if isinstance(first, nn.Conv2d):
        if not _same(modules, "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode") or first.groups != 1 or first.padding_mode != "zeros":
            raise NotStackable(f"{where}: Conv2d layers must have one shape, groups=1 and zero padding")
        if (first.bias is None) != any(m.bias is None for m in modules) or layout == MEMBERS:
            raise NotStackable(f"{where}: Conv2d layers must agree on bias and follow images or convolutions")
        return _Conv(modules, shared_input=layout == SHARED), CHANNELS
    if isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not _same(modules, "num_features", "eps", "momentum", "affine", "track_running_stats") \
                or not first.affine or not first.track_running_stats or first.momentum is None:
            raise NotStackable(f"{where}: BatchNorm layers must be affine, track running statistics with a "
                               "momentum, and agree on eps and momentum")
        wanted = CHANNELS if isinstance(first, nn.BatchNorm2d) else MEMBERS
        if layout != wanted:
            raise NotStackable(f"{where}: BatchNorm on a tensor shared by all members")
        return _BatchNorm(modules, layout), layout
    if isinstance(first, nn.Dropout):
        if layout != MEMBERS:
            raise NotStackable(f"{where}: Dropout only after a Linear layer")
        return _Dropout(modules, generators), layout
    if isinstance(first, nn.Flatten):
        if not _same(modules, "start_dim", "end_dim") or (first.start_dim, first.end_dim) != (1, -1):
            raise NotStackable(f"{where}: only Flatten(1, -1)")
        return _Flatten(len(modules), layout), MEMBERS if layout == CHANNELS else layout
    if isinstance(first, _ELEMENTWISE + _POOLS):
        if any(repr(m) != repr(first) for m in modules):
            raise NotStackable(f"{where}: the networks' layers differ ({first!r})")
        if isinstance(first, _POOLS) and layout == MEMBERS:
            raise NotStackable(f"{where}: pooling after a Linear layer")
        return _Stateless(first), layout
    raise NotStackable(f"{where}: this layer type cannot be stacked")


__all__ = ["NotStackable", "StackedNet"]
