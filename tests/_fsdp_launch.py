"""`lowlm` under accelerate's FSDP on CPU ranks, for tests/test_fsdp_cpu.py.

Run as the training script of `accelerate launch --config_file <an FSDP config> ...`; the
launcher turns the config into ACCELERATE_USE_FSDP / FSDP_* variables and starts the ranks
with torchrun, and `Accelerator()` builds its FSDP plugin from them, as on GPUs. One thing
differs without a GPU: accelerate/state.py (AcceleratorState.__init__) switches the
distributed type to FSDP only from the GPU-like types (MULTI_GPU, MULTI_XPU, ...), and lowlm
asks for `cpu=True` on a machine without CUDA, which makes it MULTI_CPU; the plugin is then
built and ignored, and the run is plain DDP over gloo.

The patch below adds MULTI_CPU to that switch and nothing else: after accelerate's own
__init__ it does what the GPU branch does (distributed type FSDP, the plugin kept, its mixed
precision set, the PartialState told). Everything after it is accelerate's and torch's own
code: prepare wraps the model with fully_shard on a gloo CPU mesh, save_state / load_state
go through accelerate's FSDP2 save and load (torch.distributed.checkpoint folders, or rank
0's gathered files), get_state_dict gathers the full state.
"""

from __future__ import annotations

import sys


def allow_fsdp_on_cpu_ranks() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    accelerate_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    allow_fsdp_on_cpu_ranks()
    from lowlm.cli import app

    sys.argv[0] = "lowlm"
    app()
