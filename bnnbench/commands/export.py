"""``bnnbench export RUN_DIR --packed``: a trained run's binary layers as bits, for XNOR-popcount inference."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models import ModelSpec

HELP = "export a trained run bit-packed for XNOR-popcount inference (bnnbench export RUN_DIR --packed)"

KINDS = ("best", "last")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory (results/runs/<run-id>/) or a checkpoint .pt file")
    parser.add_argument("--packed", action="store_true", help="pack the binary layers' weights into bits (the export format)")
    parser.add_argument("--checkpoint", choices=KINDS, default="best", help="which checkpoint of the run (default: best)")
    parser.add_argument("--out", default=None, help="output file (default: RUN_DIR/packed_<checkpoint file name>)")
    parser.add_argument("--verify", type=int, default=16, metavar="N", help="compare float and packed logits on N random images (default: 16)")


def main(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from ..packed import export_packed, save_packed
    from ..preflight import writable_file
    from ..runners.results import load_checkpoint, load_model_state
    from ..summary import RESOLUTIONS

    if not args.packed:
        raise ValueError("the only export format is the bit-packed one: add --packed")
    source = find_checkpoint(Path(args.run), args.checkpoint)
    out = writable_file(args.out if args.out else source.parent / f"packed_{source.name}", "--out")
    state = load_checkpoint(source)
    spec = checkpoint_model(state, source)
    model = spec.build(stage=2)
    load_model_state(model, state, source, f"{spec.net} with method {spec.label} (its configuration)")
    model.eval()
    packed = export_packed(model)
    console = Console()
    if args.verify > 0:
        size = RESOLUTIONS[spec.family]
        images = torch.randn(args.verify, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected, got = model(images), packed(images)
        agree = int((expected.argmax(1) == got.argmax(1)).sum())
        console.print(f"check on {args.verify} random images: argmax agreement {agree}/{args.verify}, max |logit difference| {float((expected - got).abs().max()):.2e}")
        if agree != args.verify:
            console.print("[red]warning: packed and float predictions differ; please report this with the checkpoint[/red]")
    save_packed(packed, out)
    float_bytes = sum(t.numel() * t.element_size() for t in state["model"].values() if torch.is_tensor(t))
    console.print(
        f"{spec.family}/{spec.net} + {spec.label}: {len(packed.packed_layers)} binary layers packed; "
        f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB; float32 state {float_bytes / 2**20:.2f} MiB)"
    )
    return 0


def find_checkpoint(run: Path, kind: str) -> Path:
    """The checkpoint file of ``run``: the path itself, or stage2_<kind>.pt / <kind>.pt inside the run directory."""
    if run.is_file():
        return run
    if not run.is_dir():
        raise FileNotFoundError(f"{str(run)!r} is neither a run directory nor a checkpoint file")
    for name in (f"stage2_{kind}.pt", f"{kind}.pt"):
        if (run / name).is_file():
            return run / name
    present = sorted(p.name for p in run.glob("*.pt")) or ["none"]
    raise FileNotFoundError(
        f"no stage-2 {kind} checkpoint (stage2_{kind}.pt or {kind}.pt) in {run}; checkpoints there: {', '.join(present)}. "
        "Only stage-2 models (binary weights and activations) can be packed."
    )


def checkpoint_model(state: dict[str, Any], checkpoint: Path) -> ModelSpec:
    """The network of a checkpoint: its ``spec`` (or, written before specs, ``bnn_config``), else the
    ``config.json`` of the run directory holding it."""
    from ..io import read_json
    from ..models import ModelSpec
    from ..runners.spec import RunSpec

    if "spec" in state:
        return RunSpec.from_dict(state["spec"]).model
    if "bnn_config" in state:
        return ModelSpec.from_legacy(state["bnn_config"])
    config = checkpoint.parent / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r} records no model spec and there is no config.json next to it")
    return RunSpec.from_saved(read_json(config)).model
