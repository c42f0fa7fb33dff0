"""Causal language models end to end: a tiny random Llama (grouped-query attention, gated MLP, tied
token table) through the command line, save and load, and ``generate()`` with a KV cache."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rankwise as rw  # noqa: E402
from rankwise import hf  # noqa: E402
from rankwise.cli import main, read_data  # noqa: E402
from test_cli_hf import SPECIAL, WORDS, write_sentences  # noqa: E402

HEADS, KV_HEADS, WIDTH = 4, 2, 32


def write_tiny_llama(folder, tied=True):
    """A random 2-layer Llama of width 32 (4 query heads sharing 2 key/value heads: k_proj and
    v_proj map 32 -> 16) with a WordPiece tokenizer, saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(SPECIAL + WORDS), hidden_size=WIDTH, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("causal_lm")
    write_tiny_llama(path / "llama")
    write_sentences(path / "text.txt", count=60)
    return path


def test_a_text_file_becomes_chunks_of_running_text_for_a_causal_lm(folder):
    model = hf.load_hf_model(folder / "llama", quiet=True)
    assert hf.is_causal_lm(model)
    batches = read_data(str(folder / "text.txt"), model, 3, str(folder / "llama"), 8)
    tokenizer = hf.load_tokenizer(folder / "llama")
    text = "\n".join(line.strip() for line in (folder / "text.txt").read_text().splitlines() if line.strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = torch.cat([b["input_ids"] for b in batches])
    assert chunks.shape == (len(ids) // 8, 8) and all(b["input_ids"].shape[0] <= 3 for b in batches)
    assert chunks.flatten().tolist() == ids[:chunks.numel()]  # running text, in order, no padding
    assert len(set(ids)) > 10  # words, not unknown tokens
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_the_command_line_compresses_a_causal_lm_folder_that_generates_and_loads(folder, tmp_path, capsys):
    output = tmp_path / "llama.rw"
    status = main(["compress", str(folder / "llama"), "--data", str(folder / "text.txt"), "--max-length", "8",
                   "--batch-size", "2", "--layers", "model.layers.*", "--learnables-reduction", "0.1",
                   "--output", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "candidate criterion=" in printed and "chosen: criterion=" in printed
    assert main(["info", str(output)]) == 0
    assert "decided with criterion=" in capsys.readouterr().out  # the stored choice, with its reason
    net = hf.load_compressed(output)
    original = hf.load_hf_model(folder / "llama", quiet=True)
    assert type(net) is type(original)
    assert net.lm_head.weight is net.model.embed_tokens.weight  # the tie survives save and load
    prompt = torch.tensor([[5, 6, 7, 8]])
    continuation = net.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert continuation.shape == (1, 10)


def with_low_rank_maps(model, rank=6):
    """The key, value and MLP maps of ``model`` made of rank ``rank``: projected at that rank
    they are exact, so an explained variance goal of 1 projects them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "gate_proj", "up_proj"):
                out, width = module.weight.shape
                module.weight.copy_(torch.randn(out, rank, generator=generator)
                                    @ torch.randn(rank, width, generator=generator) / width)
    return model


def test_full_rank_gives_the_same_greedy_continuation_with_the_kv_cache(folder):
    model = with_low_rank_maps(hf.load_hf_model(folder / "llama", quiet=True))
    batches = read_data(str(folder / "text.txt"), model, 2, str(folder / "llama"), 8)
    net, info = rw.compress_network_using_projection(model, batches, explained_variance_goal=1.0,
                                                     layer_names="model.layers.*", verbosity="off")
    projected = [p for p in info.layers.values() if p.side != "dense"]
    assert {p.name.rsplit(".", 1)[-1] for p in projected} >= {"k_proj", "v_proj"}  # the narrow GQA maps too
    assert all(max(p.rank_in or 0, p.rank_out or 0) <= 6 for p in projected)
    key = net.get_submodule("model.layers.0.self_attn.k_proj")
    assert key(torch.randn(3, WIDTH)).shape == (3, WIDTH * KV_HEADS // HEADS)
    prompt = torch.tensor([[5, 9, 12, 7]])
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    got = net.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(net(prompt).logits, model(prompt).logits, atol=1e-4, rtol=1e-4)


def test_thin_text_gives_one_warning_naming_the_layers(folder, tmp_path, capsys):
    write_sentences(tmp_path / "short.txt", count=4)
    status = main(["compress", str(folder / "llama"), "--data", str(tmp_path / "short.txt"), "--max-length", "4",
                   "--batch-size", "1", "--layers", "model.layers.*", "--explained-variance", "0.9",
                   "--output", str(tmp_path / "short.rw"), "--quiet"])
    assert status == 0
    err = capsys.readouterr().err
    assert err.count("saw fewer observations than their width") == 1, err
    assert "model.layers.0.mlp.up_proj" in err  # the one line names them
