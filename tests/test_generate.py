"""KV-cache decoding equals recomputing the whole sequence; sampling is seeded and sane."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.generate import Generator, Sampling, sample
from sft_jax.model import GPT, GPTConfig

VOCAB = 300


def _params(cfg):
    p = GPT(cfg).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
    return nn.meta.unbox(p)


PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [99]]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_cached_decoding_equals_full_recomputation(preset, scan_layers):
    cfg = GPTConfig.preset(preset, vocab_size=VOCAB, scan_layers=scan_layers)
    params = _params(cfg)
    gen = Generator(cfg, params, unroll=False)
    new = 6
    out, step_logits = gen.generate(PROMPTS, Sampling(max_new_tokens=new), return_logits=True)
    model = GPT(cfg)
    for b, prompt in enumerate(PROMPTS):
        assert len(out[b]) == new
        seq = list(prompt) + out[b]
        full = np.asarray(model.apply({"params": params}, jnp.asarray([seq])))[0]
        for i in range(new):
            # Logits before token i was chosen = full logits at the position before it.
            np.testing.assert_allclose(step_logits[i][b], full[len(prompt) + i - 1], atol=2e-4)
            assert out[b][i] == int(np.argmax(full[len(prompt) + i - 1]))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    cfg = GPTConfig.preset("tiny-llama", vocab_size=VOCAB)
    gen = Generator(cfg, _params(cfg))
    hot = Sampling(max_new_tokens=8, temperature=1.5, seed=1)
    a = gen.generate(PROMPTS, hot)
    assert a == gen.generate(PROMPTS, hot)
    assert a != gen.generate(PROMPTS, Sampling(max_new_tokens=8, temperature=1.5, seed=2))
    greedy = gen.generate(PROMPTS, Sampling(max_new_tokens=8))
    assert gen.generate(PROMPTS, Sampling(max_new_tokens=8, temperature=1.0, top_k=1)) == greedy
    assert gen.generate(PROMPTS, Sampling(max_new_tokens=8, temperature=0.7, top_p=1e-6)) == greedy


def test_top_k_and_top_p_only_draw_from_the_allowed_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
    keys = jax.random.split(jax.random.key(0), 50)
    top_k = {int(t) for k in keys for t in sample(logits, k, Sampling(temperature=1.0, top_k=2))}
    assert top_k == {0, 1}
    top_p = {int(t) for k in keys for t in sample(logits, k, Sampling(temperature=1.0, top_p=0.7))}
    assert top_p == {0, 1}  # 0.5 alone < 0.7; 0.5 + 0.3 reaches it


def test_end_tokens_and_stop_strings_stop_a_row():
    from sft_jax.data import load_tokenizer

    cfg = GPTConfig.preset("tiny", vocab_size=50257)
    params = _params(cfg)
    tok = load_tokenizer("gpt2")
    prompt = tok.encode("Hello there")
    free = Generator(cfg, params).generate([prompt], Sampling(max_new_tokens=12))[0]
    # Make its 4th greedy token an end token: the row stops before it.
    ended = Generator(cfg, params, end_ids=[free[3]]).generate(
        [prompt], Sampling(max_new_tokens=12)
    )
    assert ended[0] == free[: free.index(free[3])]
    text = tok.decode(free[:5])
    stopped = Generator(cfg, params).generate(
        [prompt], Sampling(max_new_tokens=12), stop=[text[-2:]], tokenizer=tok
    )[0]
    assert len(stopped) <= 5 and text[-2:] in tok.decode(stopped)
