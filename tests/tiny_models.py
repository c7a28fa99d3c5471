"""Tiny random networks with the real interfaces, built inside the tests."""
from __future__ import annotations

import torch
from torch import nn


class TinyEDMNet(nn.Module):
    """EDM network interface (EDM preconditioning around a small conv net)."""

    def __init__(self, channels=3, resolution=8, label_dim=10, hidden=16, seed=0, compute_dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.compute_dtype = compute_dtype
        self.img_channels, self.img_resolution, self.label_dim = channels, resolution, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = 0.002, 80.0, 0.5
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = nn.Linear(1 + label_dim, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.to(compute_dtype)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        x = x.to(self.compute_dtype)
        sigma = torch.as_tensor(sigma, device=x.device).to(self.compute_dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        labels = class_labels if class_labels is not None else torch.zeros(x.shape[0], self.label_dim, device=x.device)
        emb = self.emb(torch.cat([c_noise.reshape(-1, 1), labels.to(self.compute_dtype)], dim=1))
        h = torch.tanh(self.inp(c_in * x) + emb[:, :, None, None])
        return c_skip * x + c_out * self.out(h)


class TinyEpsModel(nn.Module):
    """ADM eps-model interface `model(x, t, y)`, eps and variance values on channels."""

    def __init__(self, channels=3, num_classes=10, hidden=16, learn_sigma=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = num_classes
        self.channels = channels
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.t_emb = nn.Linear(1, hidden)
        self.y_emb = nn.Embedding(num_classes, hidden) if num_classes else None
        self.out = nn.Conv2d(hidden, channels * (2 if learn_sigma else 1), 3, padding=1)

    def forward(self, x, t, y=None):
        x = x.to(self.inp.weight.dtype)
        emb = self.t_emb(t.to(x.dtype).reshape(-1, 1) / 1000)
        if self.y_emb is not None:
            emb = emb + self.y_emb(y)
        out = self.out(torch.tanh(self.inp(x) + emb[:, :, None, None]))
        # Variance values in [-1, 1], as ADM's learned range expects them.
        if out.shape[1] == 2 * self.channels:
            out = torch.cat([out[:, : self.channels], torch.tanh(out[:, self.channels:])], dim=1)
        return out


class TinyClassifier(nn.Module):
    """A little ResNet-like classifier with BatchNorm, module ReLUs and one functional ReLU."""

    def __init__(self, channels=3, num_classes=10, hidden=8, seed=0, functional_relu=False):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.fc = nn.Linear(hidden, num_classes)
        self.functional_relu = functional_relu
        for bn in (self.bn1, self.bn2):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h)) + h
        h = torch.relu(h) if self.functional_relu else self.relu(h)
        return self.fc(h.mean(dim=(2, 3)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
