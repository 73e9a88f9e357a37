"""Run ``melora`` under ``accelerate launch`` with FSDP or DeepSpeed on CPU processes (the distributed tests).

accelerate (1.15) shards only when the processes have an accelerator (GPU, NPU, XPU, ...):

- FSDP: CPU processes get ``DistributedType.MULTI_CPU``, and ``AcceleratorState.__init__`` attaches the
  FSDP plugin only for the multi-accelerator types, so an FSDP config silently runs plain DDP. torch's
  FSDP2 runs on CPU over gloo: here the plugin accelerate built from the config is handed back to the
  state. Everything after that (``fully_shard``, the Trainer's FSDP paths, state-dict gathering,
  sharded checkpoints) is the code a GPU run takes.
- DeepSpeed: with ``use_cpu`` the Trainer never initialises DeepSpeed; without it, on a host with no
  accelerator, accelerate picks no backend and counts one process. DeepSpeed's own CPU accelerator
  (``DS_ACCELERATOR=cpu``) works once the Trainer runs with ``use_cpu=False, ddp_backend="gloo"``.

    DS_ACCELERATOR=cpu accelerate launch --config_file tests/configs/<config>.yaml -m tests.cpu_sharding glue ...
"""

from __future__ import annotations

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # every later AcceleratorState() re-reads the type from PartialState: set it there too
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _deepspeed_on_cpu() -> None:
    import melora.lab.finetune.training as training

    plain = training.training_arguments

    def on_cpu(train, output_dir, **overrides):
        return plain(train, output_dir, **{**overrides, "use_cpu": False, "ddp_backend": "gloo"})

    training.training_arguments = on_cpu


def main(argv: list[str]) -> int:
    from melora.cli import main as cli_main
    from melora.lab.finetune.sharding import requested_sharding

    if requested_sharding() == "DeepSpeed":
        _deepspeed_on_cpu()
    else:
        AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
