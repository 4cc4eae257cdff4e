"""Checkpoints written before a MoE layer's experts became their own submodule name the expert weights
`blocks.N.mlp.w1` (now `blocks.N.mlp.experts.w1`), in model.safetensors and in distcp/ (model and optimizer state).
Such a checkpoint still loads (`load_model`, `load_state_dict`) and resumes to the same losses and weights."""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from minimax_gpt.interop.pretrained import SafetensorsReader, legacy_name
from minimax_gpt.training.checkpoint import load_model, load_saved_run_config, read_manifest, write_manifest
from minimax_gpt.training.run_config import load_run_config
from minimax_gpt.training.trainer import train
from train_helpers import write_config

STEP3 = "checkpoints/step-000003"


def _train(config: Path, out_dir: Path, resume=False) -> None:
    train(load_run_config(config, ["--train.out_dir", str(out_dir), "--train.threads", "1"]), resume=resume)


def _losses(out_dir: Path) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss")) for r in records}


def _rewrite_with_legacy_names(checkpoint: Path) -> None:
    """Rename every expert weight in model.safetensors and distcp/ (model, optimizer state and param_groups) the
    way the previous version wrote them; refresh the manifest."""
    import torch.distributed.checkpoint as dcp

    from minimax_gpt.training.checkpointer import Checkpointer
    from minimax_gpt.training.optim import make_optimizer
    from minimax_gpt.training.run_config import TrainConfig
    from minimax_gpt.parallel.distributed import DistContext
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, _ = load_model(checkpoint)
    optimizer = make_optimizer(model, TrainConfig(**load_saved_run_config(checkpoint)["train"]), torch.device("cpu"))
    Checkpointer(checkpoint.parent.parent, DistContext()).restore(checkpoint, model, optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rename = lambda obj: ({legacy_name(k) if isinstance(k, str) else k: rename(v) for k, v in obj.items()}
                          if isinstance(obj, dict) else [rename(v) for v in obj] if isinstance(obj, list)
                          else legacy_name(obj) if isinstance(obj, str) else obj)
    manifest = read_manifest(checkpoint)
    shutil.rmtree(checkpoint / "distcp")
    dcp.save({"model": rename(model_sd), "optim": rename(optim_sd)}, checkpoint_id=str(checkpoint / "distcp"),
             no_dist=True)
    with SafetensorsReader(checkpoint) as reader:
        weights = {legacy_name(n): reader.get(n).contiguous() for n in reader.keys()}
    assert "blocks.0.mlp.w1" in weights
    safetensors.torch.save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(checkpoint, manifest["step"], manifest["sharded"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_with_the_old_expert_names_loads_and_resumes(tmp_path):
    config = write_config(tmp_path, tmp_path / "unused")
    ref, old, resumed = tmp_path / "ref", tmp_path / "old", tmp_path / "resumed"
    _train(config, ref)
    shutil.copytree(ref / STEP3, old / STEP3)
    _rewrite_with_legacy_names(old / STEP3)

    model, _ = load_model(old / STEP3)
    want, _ = load_model(ref / STEP3)
    for name, p in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    plain = type(want)(want.config)
    plain.load_state_dict({legacy_name(k): v for k, v in want.state_dict().items()})  # an in-memory old state dict
    assert torch.equal(plain.blocks[0].mlp.experts.w1, want.blocks[0].mlp.experts.w1)

    _train(config, resumed, resume=str(old / STEP3))
    a, b = _losses(resumed), {k: v for k, v in _losses(ref).items() if k[1] > 3}
    assert a == b and a
    final = sorted((ref / "checkpoints").glob("step-*"))[-1].name
    with SafetensorsReader(ref / "checkpoints" / final) as x, SafetensorsReader(resumed / "checkpoints" / final) as y:
        assert x.keys() == y.keys()
        for name in x.keys():
            assert torch.equal(x.get(name), y.get(name)), name
