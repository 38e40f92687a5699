"""The one model instance: loading (full precision or int4), chat generation with streaming and
cooperative cancellation, and log-likelihood scoring for OCR clean-up.

Vision-language checkpoints (int4 or full precision) load as their full image-text class with the
checkpoint's own processor (`models.vlm`): `can_see` turns true, and a user message may then carry
the photo as a ``{"type": "image", "image": PIL.Image}`` part next to its text parts; the processor's
chat template and image preprocessing turn that into the model's inputs. Text-only models get text.

Everything here runs on the model lane's single thread (see `lanes.py`); nothing is thread-safe
by itself and nothing needs to be. Cancellation is a `threading.Event` checked by a stopping
criterion after every token, so a disconnected client or an expired deadline frees the model
within one decoding step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("rpiq.server")


@dataclass
class GenParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1  # small models loop without it
    stop: list[str] = field(default_factory=list)


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | cancelled
    seconds: float
    first_token_s: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class _Stop:
    """Stopping criterion: cancel event, deadline, stop strings; optional per-token delay (simulated slow device)."""

    def __init__(self, cancel: threading.Event, deadline: float | None, delay: float, stopped: list[bool]) -> None:
        self.cancel, self.deadline, self.delay, self.stopped = cancel, deadline, delay, stopped

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        done = self.cancel.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)
        if done:
            self.stopped[0] = True
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class ModelLoadError(RuntimeError):
    pass


class Engine:
    def __init__(
        self,
        model: str | None,
        *,
        device: str = "cpu",
        kernel: str = "auto",
        dtype: str = "auto",
        name: str | None = None,
        threads: int | None = None,
        max_prompt_tokens: int = 2048,
        token_delay_s: float = 0.0,
        trust_remote_code: bool = False,
    ) -> None:
        self.requested = model
        self.device = device
        self.kernel = kernel
        self.dtype = dtype
        self.threads = threads
        self.max_prompt_tokens = max_prompt_tokens
        self.token_delay_s = token_delay_s
        self.trust_remote_code = trust_remote_code
        self.model = None
        self.tokenizer = None
        self.processor = None  # a VLM's processor (CogVLM-style models: their tokenizer)
        self.path: Path | None = None
        self.name = name or "rpiq"
        self._explicit_name = name
        self.quantized = False
        self.can_see = False  # a vision-language model: takes image parts in generate()
        self.created = int(time.time())

    # --- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        from models.architectures import is_vision_language
        from models.inference import load_for_inference
        from models.loading import DTYPES, is_quantized_checkpoint, resolve_model
        from models.vlm import ProcessorLoadError, is_cogvlm_style, load_processor

        if self.threads:
            torch.set_num_threads(self.threads)
        where = resolve_model(self.requested)
        path = Path(str(where))
        t0 = time.perf_counter()
        # "auto": bfloat16 for int4 checkpoints (the kernels' activation dtype), float32 otherwise.
        dtype = None if self.dtype == "auto" else DTYPES[self.dtype]
        model, tok, where = load_for_inference(
            where, device=self.device, kernel=self.kernel, dtype=dtype, trust_remote_code=self.trust_remote_code
        )
        if is_vision_language(model.config):
            if is_cogvlm_style(model):
                self.processor = tok  # builds its own image inputs from the tokenizer
            else:
                try:
                    self.processor = load_processor(where, trust_remote_code=self.trust_remote_code)
                except ProcessorLoadError as e:
                    raise ModelLoadError(
                        f"{e}. A vision-language checkpoint needs its processor files (preprocessor_config.json, "
                        "chat template): re-quantize with this rpiq, or copy them from the original model"
                    ) from e
                tok = getattr(self.processor, "tokenizer", tok)
            self.can_see = True
        self.model, self.tokenizer = model, tok
        self.quantized = is_quantized_checkpoint(where)
        self.model.eval()
        self.path = path
        if not self._explicit_name:
            self.name = path.name
        log.info("model %s loaded (%s%s) in %.1f s", self.name, "int4" if self.quantized else "full precision",
                 ", vision-language" if self.can_see else "", time.perf_counter() - t0)  # fmt: skip

    @property
    def loaded(self) -> bool:
        return self.model is not None

    # --- prompts ---------------------------------------------------------------------------------
    def _prompt_ids(self, messages: list[dict]) -> torch.Tensor:
        from models.vlm import flat_text

        tok = self.tokenizer
        messages = [{"role": m["role"], "content": flat_text(m["content"])} for m in messages]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # a base model: a plain transcript
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] > self.max_prompt_tokens:  # keep the end: the question and the template's tail
            ids = ids[:, -self.max_prompt_tokens :]
        return ids

    def _inputs(self, messages: list[dict]) -> dict:
        """Model inputs for `messages`: through the processor (photos included) for a VLM.

        A VLM prompt is not cut to `max_prompt_tokens`: cutting could split the image's tokens; its
        text is bounded by the callers instead (OCR text is capped in `ImageContext.prompt_block`).
        """
        if self.can_see:
            from models.vlm import chat_inputs

            return chat_inputs(self.model, self.processor, messages)
        ids = self._prompt_ids(messages).to(self.model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _eos_ids(self) -> list[int]:
        """The tokenizer's end token; a VLM's generation config may add its end-of-turn token
        (SmolVLM's ``<end_of_utterance>``), which ends the answer just the same."""
        ids = [self.tokenizer.eos_token_id]
        if self.can_see:
            extra = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            ids += extra if isinstance(extra, list) else [extra]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate_tokens(self, text: str, n: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else self.tokenizer.decode(ids[:n])

    # --- generation (model lane) -------------------------------------------------------------------
    def generate(
        self,
        messages: list[dict],
        params: GenParams,
        cancel: threading.Event,
        deadline: float | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> GenResult:
        from transformers import StoppingCriteriaList, TextStreamer

        t0 = time.perf_counter()
        tok = self.tokenizer
        inputs = self._inputs(messages)
        ids = inputs["input_ids"]
        first: list[float] = []
        pieces: list[str] = []
        stopped = [False]

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    if not first:
                        first.append(time.perf_counter() - t0)
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)

        streamer = _Streamer(tok, skip_prompt=True, skip_special_tokens=True)
        sample = params.temperature > 0
        gen_kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=self._eos_ids() or None,
            stopping_criteria=StoppingCriteriaList([_Stop(cancel, deadline, self.token_delay_s, stopped)]),
            streamer=streamer,
        )
        if params.stop:
            gen_kwargs["stop_strings"] = params.stop
            gen_kwargs["tokenizer"] = tok
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen_kwargs)
        new = out[0, ids.shape[1] :]
        n_new = int(new.shape[0])
        text = tok.decode(new, skip_special_tokens=True)
        if params.stop:
            cut = [text.find(s) for s in params.stop if s and s in text]
            if cut:
                text = text[: min(cut)]
        if stopped[0]:
            reason = "cancelled"
        elif n_new >= params.max_new_tokens and (n_new == 0 or int(new[-1]) not in self._eos_ids()):
            reason = "length"
        else:
            reason = "stop"
        return GenResult(text.strip(), int(ids.shape[1]), n_new, reason, time.perf_counter() - t0,
                         first[0] if first else None)  # fmt: skip

    def score(self, texts: list[str], prefix: str = "Text read from a photo:\n") -> list[float]:
        """Log-likelihood (sum over tokens, natural log) of each text after `prefix`: for choosing OCR readings."""
        if not texts:
            return []
        tok = self.tokenizer
        pre = tok(prefix, add_special_tokens=False)["input_ids"]
        seqs = [pre + tok(t, add_special_tokens=False)["input_ids"][:128] for t in texts]
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:].to(logp.device)
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        keep = mask[:, 1:].to(logp.device).clone()
        keep[:, : len(pre) - 1] = 0  # score only the text, not the shared prefix
        return (tok_lp * keep).sum(dim=1).tolist()
