"""The rankwise command on Hugging Face folders: a tiny random BERT and a tokenizer built here."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import rankwise as rw  # noqa: E402
from rankwise import hf  # noqa: E402
from rankwise.cli import main, read_data  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow big small red blue house tree under over".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BATCH_SIZE = 8


def write_tiny_bert(folder, model_class=transformers.BertModel):
    """A random 2-layer BERT of width 16 and its WordPiece tokenizer, saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(SPECIAL + WORDS), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=24)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sentences(path, count=30, seed=0):
    """``count`` sentences of 3 to 12 words, one per line, blank lines between some."""
    generator = random.Random(seed)
    lines = [" ".join(generator.choice(WORDS) for _ in range(generator.randint(3, 12))) for _ in range(count)]
    path.write_text("\n".join(line + ("\n" if i % 7 == 3 else "") for i, line in enumerate(lines)) + "\n")
    return lines


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_hf")
    write_tiny_bert(path / "bert")
    write_sentences(path / "sentences.txt")
    (path / "empty.txt").write_text("\n  \n")
    (path / "bert_alone").mkdir()
    for name in ("config.json", "model.safetensors"):
        (path / "bert_alone" / name).write_bytes((path / "bert" / name).read_bytes())
    (path / "no_config").mkdir()
    torch.save(torch.zeros(4, 5, dtype=torch.long), path / "ids.pt")
    return path


def library_batches(folder):
    """The batches the command builds, built here with the tokenizer directly."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "bert", local_files_only=True)
    sentences = [line.strip() for line in (folder / "sentences.txt").read_text().splitlines() if line.strip()]
    return [dict(tokenizer(sentences[i:i + BATCH_SIZE], padding=True, truncation=True, max_length=24,
                           return_tensors="pt"))
            for i in range(0, len(sentences), BATCH_SIZE)]


def compress(folder, output, *extra):
    return main(["compress", str(folder / "bert"), "--data", str(folder / "sentences.txt"),
                 "--tokenizer", str(folder / "bert"), "--learnables-reduction", "0.2",
                 "--batch-size", str(BATCH_SIZE), "--output", str(output), "--quiet", *extra])


def test_compress_a_folder_matches_the_library_and_loads_from_its_config(folder, tmp_path, capsys):
    assert compress(folder, tmp_path / "out.rw") == 0
    original = transformers.AutoModel.from_pretrained(folder / "bert", local_files_only=True)
    net, info = rw.compress_network_using_projection(original, library_batches(folder),
                                                     learnables_reduction_goal=0.2, verbosity="off")
    stored = load_file(tmp_path / "out.rw")
    expected = net.state_dict()
    assert set(stored) == set(expected) and all(torch.equal(stored[k], expected[k]) for k in stored)
    assert rw.io.projection_info(rw.io.read_spec(tmp_path / "out.rw")) == info
    assert not rw.io.has_architecture(tmp_path / "out.rw")  # nothing pickled: the config rebuilds it
    config = transformers.AutoConfig.from_pretrained(folder / "bert", local_files_only=True)
    for loaded in (rw.load(tmp_path / "out.rw", model=transformers.AutoModel.from_config(config)),
                   hf.load_compressed(tmp_path / "out.rw")):
        assert type(loaded) is transformers.BertModel
        assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
        batch = library_batches(folder)[0]
        torch.testing.assert_close(loaded(**batch).last_hidden_state, net(**batch).last_hidden_state,
                                   rtol=0, atol=0)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "out.rw")]) == 0
    printed = capsys.readouterr().out
    assert "from its Hugging Face config, BertModel (model_type bert)" in printed
    assert all(name in printed for name in info.layers if info.layers[name].rank_out or info.layers[name].rank_in)


def test_analyze_a_compressed_file_and_a_folder(folder, tmp_path):
    assert compress(folder, tmp_path / "out.rw") == 0
    for model in (tmp_path / "out.rw", folder / "bert"):
        report = tmp_path / "report.json"
        assert main(["analyze", str(model), "--data", str(folder / "sentences.txt"), "--tokenizer",
                     str(folder / "bert"), "--json", str(report), "--quiet"]) == 0
        layers = json.loads(report.read_text())["layers"]
        assert any("intermediate.dense" in layer["name"] for layer in layers)


def test_the_tokenizer_defaults_to_the_model_folder_and_truncates(folder):
    model = hf.load_hf_model(folder / "bert", quiet=True)
    batches = read_data(str(folder / "sentences.txt"), model, BATCH_SIZE, str(folder / "bert"), max_length=5)
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 8, 6]
    assert all(b["input_ids"].shape[1] <= 5 and set(b) >= {"input_ids", "attention_mask"} for b in batches)
    shard = read_data(str(folder / "sentences.txt"), model, BATCH_SIZE, str(folder / "bert"), shard=(1, 3))
    whole = library_batches(folder)
    assert len(shard) == 1 and torch.equal(shard[0]["input_ids"], whole[1]["input_ids"])  # batches 1, 4, ...


def test_a_head_is_kept_and_its_class_recorded(tmp_path):
    write_tiny_bert(tmp_path / "classifier", transformers.BertForSequenceClassification)
    model = hf.load_hf_model(tmp_path / "classifier", quiet=True)
    assert type(model) is transformers.BertForSequenceClassification
    assert hf.hf_metadata(model)[hf.CLASS_KEY] == "BertForSequenceClassification"


@pytest.mark.parametrize("case, message", [
    ("no_config", "MODEL: '{f}/no_config' is a folder without config.json"),
    ("no_tokenizer", "--tokenizer: '{f}/bert_alone' holds no tokenizer"),
    ("missing_tokenizer", "--tokenizer: '{f}/nowhere' is not a folder"),
    ("no_sentence", "--data: '{f}/empty.txt' holds no sentence"),
    ("tokenizer_for_tensors", "--tokenizer: only a .txt DATA (one sentence per line) is tokenized"),
    ("tensors_need_no_tokenizer", None),
])
def test_mistakes_exit_2_naming_the_option(folder, tmp_path, capsys, case, message):
    data, model, extra = folder / "sentences.txt", folder / "bert", []
    if case == "no_config":
        model = folder / "no_config"
    elif case == "no_tokenizer":
        model = folder / "bert_alone"
    elif case == "missing_tokenizer":
        extra = ["--tokenizer", str(folder / "nowhere")]
    elif case == "no_sentence":
        data = folder / "empty.txt"
    else:
        data = folder / "ids.pt"
        extra = ["--tokenizer", str(folder / "bert")] if case == "tokenizer_for_tensors" else []
    status = main(["compress", str(model), "--data", str(data), *extra, "--learnables-reduction", "0.1",
                   "--output", str(tmp_path / "out.rw"), "--quiet"])
    error = capsys.readouterr().err
    if message is None:  # token ids in a tensor file need no tokenizer
        assert status == 0, error
        return
    assert status == 2 and f"rankwise: error: {message.format(f=folder)}" in error
    assert not (tmp_path / "out.rw").exists()
