"""The lm-evaluation-harness model ``hmora``: a base model with an hmora-ds adapter (or a full
fine-tune's saved model) under the harness everyone reports with.

    hmora-ds lm-eval --model hmora \\
        --model_args pretrained=smollm2-135m-instruct,adapter=runs/default/adapter_best \\
        --tasks arc_easy --batch_size 8

``hmora-ds lm-eval`` is the harness's own ``lm-eval`` command (every flag as documented by
lm-eval 0.4.13) with this model class registered. lm-eval has no plug-in mechanism for models
outside its package: an installed wheel adds the class to lm-eval's model table through a
start-up hook (``hmora_ds/_lm_eval_hook.py``), so the bare ``lm_eval --model hmora`` works
there too. From Python, ``import hmora_ds.lm_eval_model`` registers it for
``lm_eval.simple_evaluate(model="hmora")``.

``model_args``: ``pretrained`` (HF name / dir / ``.gguf`` / alias, as ``hmora-ds eval --model``),
``adapter`` (optional), ``tokenizer``, ``chat_template`` (as ``data.chat_template``), ``dtype``,
``device``, ``max_length`` (default: the model's position limit), ``max_gen_toks``.

Routing: every request is scored with the task routing taken from its context, as in training
(the context is the prompt): ``prompt_mask`` and ``instruction_mask`` cover the context tokens,
the continuation is what is scored. Written by hand because the harness's ``HFLM`` calls the
model with token ids only, which would make the task encoder read the answer too.

How the numbers relate to ``hmora-ds eval`` (docs/eval.md): the harness's tasks use their own
prompt text (e.g. ``Question: …\\nAnswer:``) without a chat template (unless
``--apply_chat_template``), score each option's log-likelihood (``acc``) and its length-normalised
form (``acc_norm``), over the task's full split and its own few-shot setting. ``hmora-ds eval``
renders the paper's prompts with the model's chat template and scores the option letter
(``letter``) or option text (``loglik``) on the paper's subsets. Both are valid; they are not
the same protocol, so their accuracies are not interchangeable.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F

# The harness fills its registry with its own models only while the registry is empty: ours must
# come after them, or registering it would hide every built-in model (hf, vllm, …).
import lm_eval.models  # noqa: F401  (isort: skip)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _batch_size(value: Any) -> int:
    """The harness passes ``--batch_size`` as given (an int, a digit string or ``auto``)."""
    if value is None or value == "auto" or str(value).startswith("auto"):
        return 8
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {value}")
    return size


@register_model("hmora", "hmora-ds")
class HMoRALM(TemplateLM):
    """A causal LM (optionally with an hmora-ds adapter) for the harness; one process."""

    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: Any = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **_ignored: Any,
    ) -> None:
        from hmora_ds.inference import load_for_inference

        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's --device defaults to cuda even where there is none.
            logger.warning("device %s: no CUDA device here; evaluating on the CPU", device)
            device = "cpu"
        self.tokenizer, self.model = load_for_inference(
            str(pretrained),
            str(adapter) if adapter else None,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device or "auto",
            chat_template=chat_template,
        )
        self._device = next(self.model.parameters()).device
        self.batch_size = _batch_size(batch_size)
        hf_config = getattr(self.model, "base_model", self.model).config
        self._max_length = int(max_length or hf_config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "hmora")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any):
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ scoring
    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, prompt: torch.Tensor):
        from hmora_ds.model import HMoRAModel

        if isinstance(self.model, HMoRAModel):
            return self.model(
                input_ids=ids,
                attention_mask=attn,
                prompt_mask=prompt,
                instruction_mask=prompt,
                return_router_stats=False,
            ).logits
        return self.model(input_ids=ids, attention_mask=attn).logits

    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        """Σ log p(continuation | context) and whether greedy decoding gives it, per request."""
        # Longest first: similar lengths share a batch; results go back to the input order.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="loglikelihood", disable=disable_tqdm):
            chunk = order[start : start + self.batch_size]
            rows = []
            for i in chunk:
                _, ctx, cont = requests[i]
                whole = (ctx + cont)[-(self.max_length + 1) :]
                inputs = whole[:-1]
                n_ctx = max(0, len(inputs) - len(cont) + 1)  # the context's share of inputs
                rows.append((inputs, n_ctx, cont))
            width = max(len(r[0]) for r in rows)
            ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0)
            attn = torch.zeros(len(rows), width, dtype=torch.long)
            prompt = torch.zeros(len(rows), width, dtype=torch.long)
            for r, (inputs, n_ctx, _) in enumerate(rows):
                ids[r, : len(inputs)] = torch.tensor(inputs)
                attn[r, : len(inputs)] = 1
                prompt[r, :n_ctx] = 1
            logits = self._forward(
                ids.to(self._device), attn.to(self._device), prompt.to(self._device)
            )
            logp = F.log_softmax(logits.float(), dim=-1).cpu()
            for r, (i, (inputs, _, cont)) in enumerate(zip(chunk, rows, strict=True)):
                end = len(inputs)
                scored = logp[r, end - len(cont) : end]
                target = torch.tensor(cont)
                total = scored.gather(-1, target.unsqueeze(-1)).sum().item()
                greedy = bool((scored.argmax(-1) == target).all())
                out[i] = (total, greedy)
                if requests[i][0] is not None and requests[i][0][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: the whole text's log-likelihood over disjoint rolling windows."""
        results = []
        for (text,) in tqdm([r.args for r in requests], desc="rolling", disable=disable_tqdm):
            windows = [
                (None, *lm_utils.make_disjoint_window(w))
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            total = sum(s for s, _ in scores)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation tasks: greedy (or the task's sampling) until one of its stop strings."""
        from hmora_ds.model import HMoRAModel

        results = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], desc="generate", disable=disable_tqdm
        ):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            x = torch.tensor([ids], device=self._device)
            attn = torch.ones_like(x)
            options: dict[str, Any] = {
                "max_new_tokens": max_new,
                "pad_token_id": self.tokenizer.pad_token_id,
                "do_sample": do_sample and temperature > 0,
            }
            if options["do_sample"]:
                options["temperature"] = temperature
            if isinstance(self.model, HMoRAModel):
                gen = self.model.generate(x, attention_mask=attn, prompt_mask=attn, **options)
            else:
                gen = self.model.generate(input_ids=x, attention_mask=attn, **options)
            text = self.tokenizer.decode(gen[0, x.shape[1] :], skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


def main(argv: list[str] | None = None) -> int:
    """``hmora-ds lm-eval …``: the harness's ``lm-eval`` command with ``--model hmora``."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["hmora-ds lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
