"""Two modern networks built here with torch for the coverage zoo (bench/coverage.py): the blocks of
mobile and detection exports that are not Conv+ReLU.

  * mnv3_style: a MobileNetV3-Small-style classifier (Howard et al., 2019): stem conv + HardSwish,
    inverted residuals with depthwise convs, squeeze-excite gates (AdaptiveAvgPool -> 1x1 conv ->
    ReLU -> 1x1 conv -> HardSigmoid -> Mul), HardSwish and ReLU, a Linear head with HardSwish;
    input [N,3,224,224], 1000 logits.
  * yolo_style: a YOLOv5n-style detector: Conv-BN-SiLU (torch writes SiLU as x*Sigmoid(x)), C3
    blocks with residual bottlenecks, SPPF (three MaxPools and a Concat), a PAN neck with nearest
    Resize upsampling and Concat, and two detection heads with a Sigmoid; input [N,3,256,256].

No trained weights of these exist offline, so the weights are torch's default initialisation and
the BatchNorm statistics are measured: the model runs in training mode over calibration photos
(cumulative averages), then is exported in eval mode with BatchNorm kept (opset 17, dynamic
batch). Activations therefore have realistic ranges; the outputs mean nothing, and the zoo
compares quantized to float outputs only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _nets():
    from torch import nn

    class ConvBN(nn.Sequential):
        def __init__(self, cin, cout, k=1, s=1, groups=1, act=None):
            layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, momentum=None)]
            if act is not None:
                layers.append(act())
            super().__init__(*layers)

    class SE(nn.Module):
        def __init__(self, c, mid):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1, self.fc2 = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)
            self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, exp, cout, k, s, se, act):
            super().__init__()
            layers = [] if exp == cin else [ConvBN(cin, exp, 1, act=act)]
            layers.append(ConvBN(exp, exp, k, s, groups=exp, act=act))
            if se:
                layers.append(SE(exp, max(8, exp // 4)))
            layers.append(ConvBN(exp, cout, 1))
            self.block = nn.Sequential(*layers)
            self.residual = s == 1 and cin == cout

        def forward(self, x):
            y = self.block(x)
            return x + y if self.residual else y

    class MobileNetV3Style(nn.Module):
        # (kernel, expansion, out, SE, activation, stride): MobileNetV3-Small's table
        CFG = [(3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
               (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
               (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
               (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)]

        def __init__(self, classes=1000):
            super().__init__()
            layers = [ConvBN(3, 16, 3, 2, act=nn.Hardswish)]
            c = 16
            for k, exp, out, se, act, s in self.CFG:
                layers.append(InvertedResidual(c, exp, out, k, s, se, nn.ReLU if act == "RE" else nn.Hardswish))
                c = out
            layers.append(ConvBN(c, 576, 1, act=nn.Hardswish))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, classes))

        def forward(self, x):
            return self.head(self.pool(self.features(x)).flatten(1))

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2 = ConvBN(c, c, 1, act=nn.SiLU), ConvBN(c, c, 3, act=nn.SiLU)

        def forward(self, x):
            return x + self.cv2(self.cv1(x))

    class C3(nn.Module):
        def __init__(self, cin, cout, n=1, shortcut=True):
            super().__init__()
            h = cout // 2
            self.cv1, self.cv2 = ConvBN(cin, h, 1, act=nn.SiLU), ConvBN(cin, h, 1, act=nn.SiLU)
            self.m = nn.Sequential(*[Bottleneck(h) if shortcut else ConvBN(h, h, 3, act=nn.SiLU) for _ in range(n)])
            self.cv3 = ConvBN(2 * h, cout, 1, act=nn.SiLU)

        def forward(self, x):
            import torch
            return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))

    class SPPF(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2 = ConvBN(c, c // 2, 1, act=nn.SiLU), ConvBN(c * 2, c, 1, act=nn.SiLU)
            self.m = nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            import torch
            x = self.cv1(x)
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))

    class YoloStyle(nn.Module):
        def __init__(self, classes=20, anchors=3):
            super().__init__()
            self.b1 = nn.Sequential(ConvBN(3, 16, 6, 2, act=nn.SiLU), ConvBN(16, 32, 3, 2, act=nn.SiLU), C3(32, 32),
                                    ConvBN(32, 64, 3, 2, act=nn.SiLU), C3(64, 64, 2))           # P3, stride 8
            self.b2 = nn.Sequential(ConvBN(64, 128, 3, 2, act=nn.SiLU), C3(128, 128, 2))        # P4, stride 16
            self.b3 = nn.Sequential(ConvBN(128, 256, 3, 2, act=nn.SiLU), C3(256, 256), SPPF(256))  # P5, stride 32
            self.lat5, self.up = ConvBN(256, 128, 1, act=nn.SiLU), nn.Upsample(scale_factor=2, mode="nearest")
            self.c4 = C3(256, 128, shortcut=False)
            self.lat4 = ConvBN(128, 64, 1, act=nn.SiLU)
            self.c3 = C3(128, 64, shortcut=False)                                                 # out, stride 8
            self.down = ConvBN(64, 64, 3, 2, act=nn.SiLU)
            self.c4b = C3(128, 128, shortcut=False)                                               # out, stride 16
            self.head3 = nn.Conv2d(64, anchors * (5 + classes), 1)
            self.head4 = nn.Conv2d(128, anchors * (5 + classes), 1)

        def forward(self, x):
            import torch
            p3 = self.b1(x)
            p4 = self.b2(p3)
            p5 = self.lat5(self.b3(p4))
            n4 = self.lat4(self.c4(torch.cat([self.up(p5), p4], 1)))
            o3 = self.c3(torch.cat([self.up(n4), p3], 1))
            o4 = self.c4b(torch.cat([self.down(o3), n4], 1))
            return self.head3(o3).sigmoid(), self.head4(o4).sigmoid()

    return MobileNetV3Style, YoloStyle


def _calibrate_batchnorm(model, images: np.ndarray) -> None:
    """BatchNorm running statistics from `images` (NCHW float32): training-mode forward passes with
    cumulative averages (momentum None), no gradient."""
    import torch

    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 16):
            model(torch.from_numpy(images[i:i + 16]))
    model.eval()


def build(name: str, out: Path, images: np.ndarray) -> Path:
    """Export `name` ("mnv3_style" or "yolo_style") to out (kept when it exists), its BatchNorm
    statistics measured on `images` (NCHW float32, the model's input size)."""
    import onnx
    import torch

    if out.exists():
        return out
    torch.manual_seed(0)
    mnv3, yolo = _nets()
    model = mnv3() if name == "mnv3_style" else yolo()
    _calibrate_batchnorm(model, images)
    outputs = ["logits"] if name == "mnv3_style" else ["scores_s8", "scores_s16"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(model, torch.from_numpy(images[:1]), str(tmp), input_names=["input"], output_names=outputs,
                          dynamic_axes={k: {0: "N"} for k in ["input"] + outputs}, opset_version=17, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    onnx.checker.check_model(str(tmp))
    tmp.replace(out)
    return out
