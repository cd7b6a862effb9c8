"""MicroNet and its SGD step in PyTorch eager, written from the spec.

The reference the JAX step is timed against: NCHW, ghost BN by the original's reshape
N×C×H×W → (N/4)×(4C)×H×W, swish, squeeze-excite, drop-connect, TF-"same"-for-32 padding by
an explicit F.pad, the 63-px nearest upsample, SGD with momentum and coupled weight decay
(biases and BN shifts undecayed), label-smoothed mixup cross entropy. Only the network's
shape is read from `Architecture`, so the two implementations share no numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from micronet_jax import Architecture
from micronet_jax.models.architecture import BlockSpec, conv_padding


class GhostBN(nn.Module):
    """BatchNorm2d over 4 interleaved ghost batches, as the original reshapes it."""

    def __init__(self, channels: int, splits: int = 4, momentum: float = 0.1):
        super().__init__()
        self.splits, self.momentum = splits, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5
            )
        n, c, h, w = x.shape
        s = self.splits
        mean = self.running_mean.repeat(s)
        var = self.running_var.repeat(s)
        y = F.batch_norm(
            x.reshape(n // s, c * s, h, w),
            mean,
            var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum,
            1e-5,
        )
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
        return y.reshape(n, c, h, w)


class PaddedConv(nn.Conv2d):
    """A conv whose padding is explicit (before, after), as TF 'same' for 32 px."""

    def __init__(self, cin, cout, k=1, stride=1, padding=(0, 0), groups=1, bias=False):
        super().__init__(cin, cout, k, stride, 0, groups=groups, bias=bias)
        self.pad = (padding[0], padding[1], padding[0], padding[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)


class MBConv(nn.Module):
    def __init__(self, spec: BlockSpec, padding: tuple[int, int]):
        super().__init__()
        self.spec = spec
        mid = spec.mid_filters
        if spec.has_expand:
            self.expand = PaddedConv(spec.input_filters, mid)
            self.bn0 = GhostBN(mid)
        self.dw = PaddedConv(mid, mid, spec.kernel_size, spec.stride, padding, groups=mid)
        self.bn1 = GhostBN(mid)
        if spec.se_filters:
            self.se_reduce = PaddedConv(mid, spec.se_filters, bias=True)
            self.se_expand = PaddedConv(spec.se_filters, mid, bias=True)
        self.project = PaddedConv(mid, spec.output_filters)
        self.bn2 = GhostBN(spec.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        h = x
        if spec.has_expand:
            h = F.silu(self.bn0(self.expand(h)))
        h = F.silu(self.bn1(self.dw(h)))
        if spec.se_filters:
            s = F.adaptive_avg_pool2d(h, 1)
            s = self.se_expand(F.silu(self.se_reduce(s)))
            h = torch.sigmoid(s) * h
        h = self.bn2(self.project(h))
        if spec.has_skip:
            rate = spec.drop_connect_rate
            if self.training and rate > 0:
                keep = 1.0 - rate
                mask = torch.floor(keep + torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype))
                h = h / keep * mask
            h = h + x
        return h


class TorchMicroNet(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.stem = PaddedConv(3, arch.stem_filters, 3, 2, conv_padding(arch, 3, 2))
        self.stem_bn = GhostBN(arch.stem_filters)
        self.blocks = nn.ModuleList(
            MBConv(s, conv_padding(arch, s.kernel_size, s.stride)) for s in arch.blocks
        )
        last = arch.blocks[-1].output_filters
        self.head = PaddedConv(last, arch.head_filters)
        self.head_bn = GhostBN(arch.head_filters)
        self.dropout = nn.Dropout(arch.dropout_rate)
        self.fc = nn.Linear(arch.head_filters, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=self.arch.image_size, mode="nearest")
        h = F.silu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        h = F.silu(self.head_bn(self.head(h)))
        h = self.dropout(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        return self.fc(h)


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.3):
    k = logits.shape[-1]
    target = torch.full_like(logits, smoothing / (k - 1))
    target.scatter_(1, labels[:, None], 1.0 - smoothing)
    return -(target * F.log_softmax(logits, -1)).sum(-1)


def make_optimizer(model: nn.Module, lr: float = 0.13) -> torch.optim.SGD:
    """SGD momentum 0.9, weight decay 1e-5 on everything but biases and BN shifts."""
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": 1e-5}, {"params": no_decay, "weight_decay": 0}]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def train_step(model, optimizer, x, labels_a, labels_b, lam: float) -> torch.Tensor:
    """One mixup step: forward, λ-weighted smoothed CE, backward, SGD update."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = (lam * smoothed_ce(logits, labels_a) + (1 - lam) * smoothed_ce(logits, labels_b)).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()
