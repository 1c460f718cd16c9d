"""Inception-v3 as TensorFlow's FID graph has it (inception-2015-12-05), for FID and IS.

Follows pytorch-fid's `fid_inception_v3` (itself torchvision's Inception3 patched to the TF graph)
and torch-fidelity's `FeatureExtractorInceptionV3`, which build the same network:
- every conv is conv (no bias) -> BatchNorm (eps 1e-3, TF's value) -> ReLU;
- the 3x3 average pools inside the blocks leave the zero padding out of the mean
  (`count_include_pad=False`), as TF's avg_pool does;
- the last block (E2, TF's `mixed_10`) pools its pool branch with a max pool, not an average;
- the classifier has 1008 outputs (the TF graph's ImageNet head), fed by the 2048-d average pool.

Two input paths, one per reference (the features differ a little, so each metric uses its own):
- "pytorch-fid": images in [0, 1], torch's bilinear resize to 299 (align_corners=False), then 2x - 1.
  FID uses it, as BK-SDM's numbers come from pytorch-fid.
- "torch-fidelity": 8-bit values, TF1's bilinear resize (no half-pixel shift), then (x - 128) / 128.
  IS uses it with the unbiased logits (the fc without its bias), as `torch-fidelity --isc` does.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299  # the TF graph's input resolution
RESIZES = ("pytorch-fid", "torch-fidelity")


class FrozenBatchNorm2d(nn.Module):
    """Inference-only BatchNorm: y = (x - mean) / sqrt(var + eps) * weight + bias, from stored statistics."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                            self.eps)


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU: every conv of the TF graph."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = FrozenBatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 'SAME' average pool: the padded zeros do not count in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 grid: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | strided max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 grid with factorised 7x7 convs (1x7 and 7x1): 1x1 | 7x7 | double 7x7 | avg pool -> 1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for i in range(1, 6):
            b7dbl = getattr(self, f"branch7x7dbl_{i}")(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1 -> strided 3x3 | 1x1 -> 1x7 -> 7x1 -> strided 3x3 | strided max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 grid with split 3x3 convs (1x3 and 3x1 side by side): 1x1 | 3x3 | double 3x3 | pool -> 1x1.

    pool: "avg" in the first E block; "max" in the second, as the TF graph has it (pytorch-fid's
    FIDInceptionE_2: likely a slip in that graph, but the FID weights were trained and published with it).
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.max_pool = pool == "max"
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)], 1)


# The stem: (name, in, out, kernel, stride, padding); "maxpool" is a 3x3 stride-2 max pool.
# Sizes for a 299x299 input in the comments.
STEM = (
    ("conv1a", 3, 32, 3, 2, 0),    # 149
    ("conv2a", 32, 32, 3, 1, 0),   # 147
    ("conv2b", 32, 64, 3, 1, 1),   # 147
    "maxpool",                     # 73
    ("conv3b", 64, 80, 1, 1, 0),   # 73
    ("conv4a", 80, 192, 3, 1, 0),  # 71
    "maxpool",                     # 35
)
# The mixed blocks: (name, block, in channels, block argument) -> out channels, grid.
MIXED = (
    ("a1", InceptionA, 192, 32),     # 256, 35x35
    ("a2", InceptionA, 256, 64),     # 288
    ("a3", InceptionA, 288, 64),     # 288
    ("b", InceptionB, 288, None),    # 768, 17x17
    ("c1", InceptionC, 768, 128),    # 768
    ("c2", InceptionC, 768, 160),    # 768
    ("c3", InceptionC, 768, 160),    # 768
    ("c4", InceptionC, 768, 192),    # 768
    ("d", InceptionD, 768, None),    # 1280, 8x8
    ("e1", InceptionE, 1280, "avg"),  # 2048
    ("e2", InceptionE, 2048, "max"),  # 2048
)


def resize_tf1_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1's `resize_bilinear(align_corners=False)`: source = target * (in / out), no half-pixel shift.

    Reproduces torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (method "slow"), including
    its float32 coordinate arithmetic, so the resized images agree bit for bit.
    """
    def axis(n_in: int):
        src = torch.arange(size, dtype=x.dtype,
                           device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, src - lo.float()

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[2]), axis(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def prepare(images: torch.Tensor, resize: str = "pytorch-fid") -> torch.Tensor:
    """Images [B, 3, H, W] (float in [0, 1] or uint8) -> the network's input [B, 3, 299, 299] in [-1, 1]."""
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    if resize == "pytorch-fid":
        # pytorch-fid reads PNGs with ToTensor (uint8 / 255) and resizes in float.
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1
    # torch-fidelity takes uint8 only; float images are quantised as a PNG would store them.
    x = images.float() if images.dtype == torch.uint8 else (images.float() * 255).round().clamp(0, 255)
    return (resize_tf1_bilinear(x) - 128) / 128


class InceptionV3(nn.Module):
    """The FID Inception-v3: images -> (2048-d pool features, 1008 logits)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.ModuleDict({row[0]: BasicConv(*row[1:]) for row in STEM if row != "maxpool"})
        self.mixed = nn.ModuleDict({name: block(cin, arg) if arg is not None else block(cin)
                                    for name, block, cin, arg in MIXED})
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Network input [B, 3, 299, 299] in [-1, 1] -> pool features [B, 2048]."""
        for row in STEM:
            x = F.max_pool2d(x, 3, stride=2) if row == "maxpool" else self.stem[row[0]](x)
        for block in self.mixed.values():
            x = block(x)
        return x.mean(dim=(2, 3))  # global average pool: [B, 2048, 8, 8] -> [B, 2048]

    def unbiased_logits(self, pool: torch.Tensor) -> torch.Tensor:
        """torch-fidelity's `logits_unbiased`: the classifier without its bias, what its IS uses."""
        return pool @ self.fc.weight.T

    def forward(self, images: torch.Tensor, resize: str = "pytorch-fid") -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] (or uint8) -> (pool [B, 2048], logits [B, 1008], bias included)."""
        pool = self.features(prepare(images, resize).to(self.fc.weight.dtype))
        return pool, self.fc(pool)
