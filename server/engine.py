"""The one model instance: loading (full precision or int4), chat generation with streaming and
cooperative cancellation, and log-likelihood scoring for OCR clean-up.

Loading, prompts and decoding are `models.inference`'s (the same stack as `rpiq generate`); this
class keeps what serving adds: the model's name and kind for /v1/models, the prompt-length cap, the
cancel event and deadline of a request, and the simulated slow device of the tests.

Vision-language checkpoints (int4 or full precision) load as their full image-text class with the
checkpoint's own processor (`models.vlm`): `can_see` turns true, and a user message may then carry
the photo as a ``{"type": "image", "image": PIL.Image}`` part next to its text parts; the processor's
chat template and image preprocessing turn that into the model's inputs. Text-only models get text.

Everything here runs on the model lane's single thread (see `lanes.py`); nothing is thread-safe
by itself and nothing needs to be. Cancellation is a `threading.Event` checked after every token,
so a disconnected client or an expired deadline frees the model within one decoding step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.inference import DTypeName, Generation, GenerationOptions, Message, fitted_inputs, generate
from models.int4 import KernelName

log = logging.getLogger("rpiq.server")


class Engine:
    def __init__(
        self,
        model: str | None,
        *,
        device: str = "cpu",
        kernel: KernelName = "auto",
        dtype: DTypeName = "auto",
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
        from models.loading import ModelLoadError, is_quantized_checkpoint
        from models.vlm import ProcessorLoadError, is_cogvlm_style, load_processor

        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        model, tok, where = load_for_inference(self.requested, device=self.device, kernel=self.kernel,
                                               dtype=self.dtype, trust_remote_code=self.trust_remote_code)  # fmt: skip
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
        self.model, self.tokenizer = model.eval(), tok
        self.quantized = is_quantized_checkpoint(where)
        self.path = Path(str(where))
        if not self._explicit_name:
            self.name = self.path.name
        log.info("model %s loaded (%s%s) in %.1f s", self.name, "int4" if self.quantized else "full precision",
                 ", vision-language" if self.can_see else "", time.perf_counter() - t0)  # fmt: skip

    @property
    def loaded(self) -> bool:
        return self.model is not None

    # --- generation (model lane) -------------------------------------------------------------------
    def generate(
        self,
        messages: list[Message],
        options: GenerationOptions,
        cancel: threading.Event,
        deadline: float | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Answer `messages` (photos included for a VLM); stops early once `cancel` is set or `deadline`
        (time.monotonic) has passed, with finish reason "cancelled"."""

        def should_stop() -> bool:
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            return cancel.is_set() or (deadline is not None and time.monotonic() > deadline)

        inputs, cut = fitted_inputs(self.model, self.tokenizer, messages, max_tokens=self.max_prompt_tokens,
                                    processor=self.processor if self.can_see else None)  # fmt: skip
        result = generate(self.model, self.tokenizer, inputs, options, on_text=on_text, should_stop=should_stop)
        result.prompt_truncated = cut
        return result

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
