"""compare_generation_speed: prefill and decode tokens per second of a causal LM, original against
compressed (timings replaced by a clock that advances one second per reading: identities only)."""

import pytest
import torch

import rankwise as rw
from rankwise import throughput

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def test_tokens_per_second_count_every_prompt_token_and_every_decoded_token(monkeypatch):
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: float(next(clock)))  # every interval: 1 s
    calls = []
    model = tiny_llama().train()
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    speed = rw.compare_generation_speed(model, model, torch.randint(0, 50, (3, 7)), new_tokens=4, repeats=2,
                                        warmup=0)
    assert (speed.batch_size, speed.prompt_tokens, speed.new_tokens) == (3, 7, 4)
    assert speed.prefill_before == speed.prefill_after == 3 * 7 and speed.decode_before == 3 * 4
    assert speed.prefill_speedup == speed.decode_speedup == 1.0
    # per model and repeat: a timed prefill, an untimed one, then 4 single-token steps on the cache
    assert calls[:6] == [(3, 7), (3, 7), (3, 1), (3, 1), (3, 1), (3, 1)] and len(calls) == 2 * 2 * 6
    assert model.training  # its mode restored
    assert "prefill 21 -> 21 tokens/s" in str(speed) and "decode 12.0 -> 12.0 tokens/s" in str(speed)


@pytest.mark.parametrize("bad, argument", [(torch.rand(2, 3), "input_ids"), (torch.zeros(4, dtype=torch.long),
                                                                             "input_ids")])
def test_a_prompt_that_is_not_token_ids_is_refused(bad, argument):
    model = tiny_llama()
    with pytest.raises(ValueError, match=f"{argument}: expected a \\(batch, tokens\\) tensor of token ids"):
        rw.compare_generation_speed(model, model, bad)
    with pytest.raises(ValueError, match="new_tokens: expected an integer >= 1"):
        rw.compare_generation_speed(model, model, torch.zeros(1, 3, dtype=torch.long), new_tokens=0)
