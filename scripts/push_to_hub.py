"""Upload an adapter folder to the Hugging Face Hub.

    python scripts/push_to_hub.py runs/qwen14b/adapter user/qwen14b-retaining-heads [--private]

The token comes from `--token`, `HF_TOKEN` or `hf auth login`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="adapter folder written by apb.save_adapter / training")
    parser.add_argument("repo_id", help="Hub repo id, e.g. user/qwen14b-retaining-heads (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    args = parser.parse_args(argv)

    missing = [
        n for n in ("adapter_config.json", "adapter_model.safetensors") if not (args.folder / n).is_file()
    ]
    if missing:
        print(f"error: {args.folder} is not an adapter folder: missing {', '.join(missing)}", file=sys.stderr)
        return 2

    import apb  # after the cheap checks: importing torch takes seconds

    commit = apb.push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(
        f"pushed {args.folder} to https://huggingface.co/{args.repo_id}: {getattr(commit, 'commit_url', commit)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
