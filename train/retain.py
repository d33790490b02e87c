"""Train retaining heads on a frozen base: parse, build, train, export.

    deepspeed train/retain.py --config configs/tiny.yaml              # one process (GPU or CPU)
    deepspeed --num_gpus 2 train/retain.py --config configs/tiny.yaml # 2 ranks (CPU: gloo)
    torchrun --nproc-per-node 8 train/retain.py --config configs/qwen14b.yaml
    python train/retain.py --config configs/tiny.yaml --dry-run       # check the config, load nothing

A killed run restarted with the same command resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# `deepspeed train/retain.py` puts train/ first on sys.path; nothing here is imported by a bare name.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved config, load nothing"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. optim.max_steps=10 or 'data.sources[0].num_samples=2000' (quote [i])",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def missing_training_packages(tensorboard: bool = True) -> list[str]:
    """The `[train]` extra's packages this Python cannot import (checked before any work)."""
    import importlib.util

    needed = ["deepspeed", "datasets"] + (["tensorboard"] if tensorboard else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import yaml
    from apb.train.config import load_config

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        config = load_config(args.config, overrides)
        from apb.train.config import check_rerun
        from apb.train.trainer import check_model_paths, check_sources

        # Reported before any process group or model: a missing data file, model or tokenizer path, and
        # a config that differs from the run already in output_dir in what resuming cannot honour.
        check_sources(config)
        check_model_paths(config)
        check_rerun(config)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    missing = missing_training_packages(tensorboard=config.logging.tensorboard)
    if missing and not args.dry_run:
        print(
            f"training needs {', '.join(missing)}: pip install 'apb-retain[train]' "
            '(from a checkout: pip install -e ".[train]")',
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        print("# deepspeed config:\n" + json.dumps(config.deepspeed_config(world_size), indent=2))
        return 0

    from apb.train.process_group import close_distributed, init_distributed
    from apb.train.trainer import Trainer

    dist_info = init_distributed()
    logging.basicConfig(
        level=logging.INFO if dist_info.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {dist_info.rank}] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    trainer = Trainer(config, dist_info)
    ok = False
    try:
        try:
            trainer.build()
        except ValueError as err:  # bad input: one clear line, before any training
            print(f"error: {err}", file=sys.stderr, flush=True)
            ok = True  # every rank refuses the same config: the group is still in step
            return 2
        result = trainer.train()
        folder = trainer.export()
        ok = True
        if dist_info.is_main:
            print(
                f"done: {result['steps']} steps, {result['tokens_seen']} tokens, final loss "
                f"{result['final_loss']:.5f}; adapter at {folder}",
                flush=True,
            )
    finally:
        trainer.close()
        # Destroy the process group while the interpreter is fully alive: left to interpreter
        # shutdown, gloo's worker threads can still hold work objects whose tensors need the GIL,
        # which aborts the process ("terminate called without an active exception", exit 134).
        # The closing barrier runs only when every rank got here normally; after a failure on one
        # rank it would wait for the others until the timeout.
        close_distributed(barrier=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
