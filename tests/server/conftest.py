"""Server fixtures: one real `rpiq serve` process per model, on a free loopback port, reused by the tests.

Most HTTP tests talk to a tiny random-weight Llama with the embedded model's real tokenizer (fast,
answers are noise but every byte goes through the real server); a few use the real embedded model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .helpers import ServerProcess

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, max_position_embeddings=4096,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """Queue of 8, a simulated slow device (20 ms per token) so queueing and timeouts are observable."""
    server = ServerProcess(
        str(tiny_model_dir),
        tmp_path_factory.mktemp("srv") / "tiny",
        env={
            "RPIQ_QUEUE_SIZE": "8",
            "RPIQ_TOKEN_DELAY_S": "0.02",
            "RPIQ_REQUEST_TIMEOUT_S": "30",
            "RPIQ_MAX_UPLOAD_BYTES": str(2 * 2**20),
            "RPIQ_MAX_NEW_TOKENS": "512",
            "RPIQ_THREADS": "1",
        },
        api_key=API_KEY,
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_server(tmp_path_factory):
    """The embedded default model (SmolLM2-135M-Instruct), started with no model argument like a user would."""
    from models.embedded import ensure_default_model

    ensure_default_model()
    server = ServerProcess(None, tmp_path_factory.mktemp("srv") / "real", env={"RPIQ_QUEUE_SIZE": "4"}).start()
    yield server
    server.stop()


@pytest.fixture()
def client(tiny_server):
    with tiny_server.client() as c:
        yield c
