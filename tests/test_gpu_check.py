"""benchmarks/gpu_check.py and gpu_lightning.py import without a GPU and refuse to run in one line (they are run by
hand when a GPU machine is lent; nothing here measures anything)."""

import pytest
import torch

from benchmarks import gpu_check, gpu_lightning


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: main() would run the whole check")
@pytest.mark.parametrize("module,name", [(gpu_check, "gpu_check"), (gpu_lightning, "gpu_lightning")])
def test_gpu_scripts_say_there_is_no_cuda(module, name, capsys):
    assert module.main([]) == 1
    assert capsys.readouterr().out == f"{name}: no CUDA device; nothing run\n"
