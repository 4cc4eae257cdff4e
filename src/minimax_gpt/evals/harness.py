"""`minimax_gpt` for the lm-evaluation-harness (`pip install 'minimax-gpt[eval]'`).

Importing this module registers the model under the name `minimax_gpt` in lm_eval's model registry. lm_eval's own
command line imports only its built-in models, so run it through this module, which registers ours first and then
hands every argument to lm_eval unchanged:

    python -m minimax_gpt.evals.harness --model minimax_gpt --model_args checkpoint=out --tasks lambada_openai
    python -m minimax_gpt.evals.harness --model minimax_gpt --model_args checkpoint=out,max_length=512 \\
        --tasks my_task --include_path my_tasks/

From Python: `import minimax_gpt.evals.harness` and then `lm_eval.simple_evaluate(model="minimax_gpt", ...)`.
The work is in `evals.scoring` (log-likelihoods on the cache, greedy generation).
"""

from __future__ import annotations

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("the lm-evaluation-harness adapter needs lm_eval: pip install 'minimax-gpt[eval]' "
                      f"(or pip install lm_eval); {e}") from e

from minimax_gpt.evals.scoring import (fit_context, greedy_until, prefix_token, score_continuations,
                                      score_rolling)

MODEL_NAME = "minimax_gpt"


@register_model(MODEL_NAME)
class MiniMaxLM(LM):
    """model_args: checkpoint (a checkpoint or training output directory, required), device (auto, cpu, cuda,
    cuda:N; default auto), max_length (tokens of context + continuation; default the model's block_size).
    lm_eval's batch_size is accepted and requests run one context at a time."""

    def __init__(self, checkpoint: str | None = None, device: str | None = None, max_length: int | str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None):
        super().__init__()
        from minimax_gpt.training.checkpoint import load_model
        from minimax_gpt.training.devices import resolve_device

        if not checkpoint:
            raise ValueError("minimax_gpt needs model_args checkpoint=DIR (a checkpoint or training output "
                             "directory)")
        self._device = resolve_device(device or "auto")
        self.model, self.tokenizer = load_model(checkpoint, device=self._device)
        if self.tokenizer is None:
            raise ValueError(f"{checkpoint} has no tokenizer/ directory; lm_eval hands the model text")
        self.max_length = int(max_length) if max_length is not None else self.model.config.block_size
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        self.prefix = prefix_token(self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation, split as lm_eval's Hugging Face model splits them: trailing spaces of
        the context move to the continuation, the whole is encoded, the context's tokens are cut off."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        n = len(self.tokenizer.encode(context)) if context else 0
        return (whole[:n] or [self.prefix]), whole[n:]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        pairs = [(fit_context(context, cont, self.max_length), cont) for context, cont in pairs]
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            by_context.setdefault(tuple(context), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for context, indices in by_context.items():  # each (cut) context prefilled once
            scored = score_continuations(self.model, list(context), [pairs[i][1] for i in indices])
            for i, result in zip(indices, scored):
                results[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i].args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for r in requests:
            total = score_rolling(self.model, self.tokenizer.encode(r.args[0]), self.prefix, self.max_length)
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"minimax_gpt generates greedily; got sampling arguments {kwargs}")
            ids = (self.tokenizer.encode(context) or [self.prefix])[-max(1, self.max_length - max_new):]
            text = greedy_until(self.model, self.tokenizer, ids, until, max_new)
            self.cache_hook.add_partial("generate_until", r.args, text)
            results.append(text)
        return results


def main() -> None:
    """lm_eval's command line with `minimax_gpt` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
