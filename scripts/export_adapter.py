"""Export an adapter from any checkpoint of a training run.

    python scripts/export_adapter.py runs/tiny                          # newest checkpoint -> runs/tiny/adapter
    python scripts/export_adapter.py runs/tiny --checkpoint step_00000010 --out runs/tiny/adapter_step10
    python scripts/export_adapter.py runs/tiny --push-to-hub user/name
    python scripts/export_adapter.py runs/smollm2_qa --hub-id HuggingFaceTB/SmolLM2-135M-Instruct

Reads the run's resolved config.yaml and the checkpoint's heads.safetensors and trainer_state.json; no
base weights are loaded (the heads' shape comes from the model config on the meta device).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from apb.train.checkpoint import CheckpointError, checkpoint_root, latest_checkpoint, verify_checkpoint
from apb.train.config import config_from_dict
from apb.train.export import export_heads, heads_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("run", help="run folder (its config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", help="checkpoint folder or tag (step_00000100); default: the newest")
    parser.add_argument("--out", help="adapter folder; default: the config's export folder")
    parser.add_argument("--push-to-hub", metavar="USER/NAME", help="also push the adapter to this Hub repo")
    parser.add_argument(
        "--hub-id",
        metavar="NAME",
        help="Hub id the adapter records as its base (model.hub_id); default: the run's, else its model path",
    )
    args = parser.parse_args(argv)

    run = Path(args.run)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        print(f"error: {config_file} not found: is {run} a run folder?", file=sys.stderr)
        return 2
    try:
        data = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as err:
        print(f"error: {config_file}: not valid YAML ({err})", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print(f"error: {config_file}: not a run config", file=sys.stderr)
        return 2
    if args.push_to_hub:
        data.setdefault("export", {})["push_to_hub"] = args.push_to_hub
    if args.hub_id:
        data.setdefault("model", {})["hub_id"] = args.hub_id
    try:
        config = config_from_dict(data)
    except ValueError as err:
        print(f"error: {config_file}: {err}", file=sys.stderr)
        return 2
    if args.checkpoint:
        folder = Path(args.checkpoint)
        if not folder.is_dir():
            folder = checkpoint_root(run) / args.checkpoint
    else:
        folder = latest_checkpoint(run)  # the newest complete one (damaged newer ones are reported)
    if folder is None or not folder.is_dir():
        print(
            f"error: no complete checkpoint {args.checkpoint or ''} under {checkpoint_root(run)}",
            file=sys.stderr,
        )
        return 2
    try:
        state = verify_checkpoint(folder)
        heads = heads_from_checkpoint(config, folder)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = export_heads(
        heads,
        config,
        steps=state["step"],
        tokens_seen=state["tokens_seen"],
        final_loss=state.get("last_loss"),
        folder=args.out,
        config_changes=state.get("config_changes"),
    )
    print(f"exported {folder.name} (step {state['step']}, loss {state.get('last_loss')}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
