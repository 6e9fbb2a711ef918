"""`python tests/fsdp2_cpu.py ARGS...` under torchrun: the daytune command line with FSDP2 sharding on CPUs.

accelerate shards a model only on accelerators (on CPUs its distributed type stays MULTI_CPU), so this launcher
switches the type to FSDP (version 2) as soon as daytune creates its Accelerator. Everything after that is
accelerate's own FSDP2 code over gloo: `fully_shard`, DTensor parameters, the optimizer moved onto them, sharded
optimizer states, full state dicts gathered for saving; so the tests exercise daytune's sharded paths (the save
probe, checkpoints, resume, early-stopping restores, gradient clipping) as a GPU run would, only slower.
"""

import sys

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = Accelerator.__init__


def _fsdp2_init(self, *args, **kwargs):
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )
    kwargs["fsdp_plugin"] = plugin
    _init(self, *args, **kwargs)
    self.state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


Accelerator.__init__ = _fsdp2_init

if __name__ == "__main__":
    from daytune.cli import main

    sys.exit(main(sys.argv[1:]))
