"""Whole-network inference benchmark: a binary ResNet as float, int8 and packed models, timed interleaved.

Contenders, all from one model (ImageNet ResNet-18 + BiPer by default) in eval mode:

    float model    the model as trained (BinaryConv2d binarising its weights on every call)
    float path     the exported model with its bits as +-1 float32 filters through F.conv2d
    int8 path      the exported model with its bits as int8 through oneDNN's int8 conv
    packed         the exported model on the XNOR-popcount kernel, float between layers
    packed in bits the exported model chained in bits (:func:`bnnbench.packed.chain_in_bits`):
                   each binary conv's epilogue folds BatchNorm, the residual add and hardtanh
                   and packs the next conv's input

Every contender gets the faster of NCHW and channels-last input (the stem's
memory format follows it).  The model's BatchNorm statistics and affine
parameters are randomised ("trained-looking", seeded): a freshly built
ImageNet ResNet starts its BatchNorm weights at 1e-8, which would make every
pre-activation sit at the shift.  Before timing, every contender's
predictions (argmax) are compared with the float model's on the timed batch.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import bnnbench
from bnnbench.packed import chain_in_bits, export_packed, set_backend

from .bench import machine_info, set_threads, time_interleaved

CONTENDERS = ("float model", "float path", "int8 path", "packed", "packed in bits")


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking BatchNorm statistics and affine parameters (means in [-0.5, 0.5), variances in [0.5, 2), ...)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(0.6 * torch.rand(n, generator=generator) - 0.3)


def model_contenders(model: nn.Module) -> dict[str, nn.Module]:
    """The float model and its exported variants (see the module docstring), by contender name."""
    packed = export_packed(model.eval())
    return {
        "float model": model,
        "float path": set_backend(copy.deepcopy(packed), "float"),
        "int8 path": set_backend(copy.deepcopy(packed), "int8"),
        "packed": packed,
        "packed in bits": chain_in_bits(packed),
    }


def model_benchmark(
    net: str = "resnet18",
    family: str = "imagenet",
    method: str = "biper",
    batches: Sequence[int] = (1, 16),
    threads: int = 1,
    budget_s: float = 20.0,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per (batch, contender): best and median ms, speed-ups over the float model and float path, agreement.

    ``budget_s``: timing seconds per batch size (all contenders together, at
    least 3 calls each).  Returns (rows, machine).
    """
    set_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = bnnbench.build_model(net, method, family=family).eval()
    randomise_batchnorm(model, generator)
    contenders = model_contenders(model)
    size = 224 if model.spec.family == "imagenet" else 32
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=generator)
        layouts = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
        with torch.no_grad():
            reference = model(x)
            outputs = {name: m(x) for name, m in contenders.items()}
            calls: dict[str, Callable[[], Tensor]] = {
                f"{name}|{layout}": (lambda m=m, t=t: m(t)) for name, m in contenders.items() for layout, t in layouts.items()
            }
            times = time_interleaved(calls, budget_s, min_runs=3, block_s=0.05)
        fastest = {name: min(layouts, key=lambda layout: times[f"{name}|{layout}"].best) for name in contenders}
        best = {name: times[f"{name}|{fastest[name]}"] for name in contenders}
        for name in contenders:
            rows.append(
                {
                    "net": f"{family}/{net}",
                    "method": method,
                    "batch": batch,
                    "contender": name,
                    "ms": 1e3 * best[name].best,
                    "median_ms": 1e3 * best[name].median,
                    "memory": fastest[name],
                    "speedup_vs_float_model": best["float model"].best / best[name].best,
                    "speedup_vs_float_path": best["float path"].best / best[name].best,
                    "speedup_vs_float_path_median": best["float path"].median / best[name].median,
                    "predictions_identical": bool(torch.equal(outputs[name].argmax(1), reference.argmax(1))),
                    "max_logit_difference": float((outputs[name] - reference).abs().max()),
                    "runs": best[name].runs,
                }
            )
    return rows, machine_info(threads)
