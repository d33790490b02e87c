"""Training retaining heads on a frozen base (`apb.train`).

Entry point: ``deepspeed train/retain.py --config configs/<run>.yaml`` (also ``--num_gpus N``, torchrun,
plain python; ``--dry-run``; ``--set key=value``). Modules:

- `config`: YAML -> typed `RunConfig` (unknown keys / bad values refused, key named); DeepSpeed JSON.
- `labels`: the registered attention function that computes Locret labels inside the forward.
- `loss`: SmoothL1 + smoothness (`retain_loss`).
- `step`: `base_forward` (no-grad base -> block q/k/v + labels), `micro_step`, `HeadsStack`.
- `trainer`: `Trainer(config, dist).build() / train() / export()`; `process_group`: joining and leaving the process group.
- `checkpoint`: save/resume (heads, optimizer, scheduler, sampler, RNG); `export`: adapter folders.

Submodules are imported on use (nothing heavy at ``import apb.train``).
"""
