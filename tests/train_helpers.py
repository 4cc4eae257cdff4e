"""A tiny run config and corpus shared by the training, checkpoint and CLI tests."""

from pathlib import Path

TINY_TOML = """
[model]
n_layer = 2
n_head = 2
n_embd = 16
hybrid_period = 2
lightning_chunk_size = 8
intermediate_size = 32
use_moe = true
num_experts = 4
moe_top_k = 2
dropout = {dropout}

[train]
out_dir = "{out_dir}"
data = "{data}"
tokenizer = "char"
log_interval = 1
eval_interval = 3
eval_batches = 2
sample_tokens = 12
sample_prompt = "the "
progress = false
tensorboard = false

[[phases]]
iters = 3
seq_len = 8
batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup_iters = 1

[[phases]]
iters = 3
seq_len = 16
batch_size = 2
lr = 1e-3
min_lr = 1e-4
warmup_iters = 1
"""

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n" * 60


def write_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def write_config(tmp_path: Path, out_dir: Path, dropout: float = 0.0, name: str = "tiny.toml") -> Path:
    data = write_corpus(tmp_path)
    path = tmp_path / name
    path.write_text(TINY_TOML.format(out_dir=out_dir.as_posix(), data=data.as_posix(), dropout=dropout))
    return path


def poison_training_forward(set_attr, is_bad, where="loss"):
    """Make the training forward calls n (1-based) with is_bad(n) non-finite: their loss, or (where="grad") the
    gradient of the embedding while the loss stays finite. `set_attr` installs the patched forward
    (monkeypatch.setattr in tests, setattr in scripts that restore it). Returns the call counter."""
    import torch

    from minimax_gpt import EnhancedMiniMaxGPT

    calls = {"n": 0}
    original = EnhancedMiniMaxGPT.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if is_bad(calls["n"]):
                if where == "loss":
                    out.loss.data.fill_(float("nan"))
                else:  # a one-shot hook: this step's gradient only
                    def nan_grad(g):
                        handle.remove()
                        return torch.full_like(g, float("nan"))

                    handle = self.wte.weight.register_hook(nan_grad)
        return out

    set_attr(EnhancedMiniMaxGPT, "forward", forward)
    return calls


def legacy_copy(checkpoint, out_dir):
    """The checkpoint rewritten in the layout single-process runs used before every checkpoint had distcp/: full
    weights in model.safetensors and the optimizer's own state dict (parameters by index) in trainer_state.pt, no
    distcp/. Returns the new checkpoint, `out_dir/checkpoints/step-N` (with its `latest`)."""
    import torch

    from minimax_gpt.training.checkpoint import (load_model, load_saved_run_config, load_trainer_state,
                                                 save_training_checkpoint)
    from minimax_gpt.training.checkpointer import Checkpointer
    from minimax_gpt.parallel.distributed import DistContext
    from minimax_gpt.training.optim import make_optimizer
    from minimax_gpt.training.run_config import TrainConfig

    model, tokenizer = load_model(checkpoint)
    run = load_saved_run_config(checkpoint)
    optimizer = make_optimizer(model, TrainConfig(**run["train"]), torch.device("cpu"))
    state = Checkpointer(out_dir, DistContext()).restore(checkpoint, model, optimizer)
    legacy = {k: v for k, v in state.items() if k not in ("rng_per_rank", "world_size", "parallel")}
    legacy["optimizer"] = optimizer.state_dict()
    step = load_trainer_state(checkpoint)["progress"]["step"]
    return save_training_checkpoint(out_dir, step, model, tokenizer, legacy, run)
