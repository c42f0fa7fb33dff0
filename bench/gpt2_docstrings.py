"""A small causal language model compressed without fine-tuning (issue 13): perplexity on held-apart text.

**Text.** Everything ships with Python, nothing is downloaded: the docstrings of the standard
library's source files (read with :mod:`ast`, nothing imported; one document per file, the
module's, classes' and functions' docstrings joined by blank lines; ``test``, ``idlelib``,
``tkinter``, ``turtledemo``, ``lib2to3`` and ``site-packages`` left out) and the topics of
:mod:`pydoc_data.topics` (one document per topic). The documents are shuffled with a fixed
seed and dealt, whole, to test, validation and calibration until each holds its share of the
bytes (:data:`SPLIT_BYTES`); the rest is the training text.

**Tokens.** Byte-level: the UTF-8 bytes of the text are tokens 0-255 and token 256 ends a
document, so nothing needs training or downloading (:data:`VOCAB_SIZE` = 257).

**Network.** ``GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=128,
vocab_size=257, tie_word_embeddings=False))``: 875 520 learnables. The output head is untied
from the token table: rankwise refuses to project a tied layer (projecting either side would
break the tie and add learnables), and untied every method can factor the head. Trained once
with :data:`RECIPE` (AdamW, warm-up then cosine decay, random windows of the training stream)
and cached under ``rankwise.examples.cache_dir()`` in a file named by a hash of the recipe and
the architecture (:func:`cache_path`).

**Score.** Perplexity ``exp(mean_t -log p(x_t | x_<t))`` over every predicted byte of the
non-overlapping 128-token windows of the split (the first token of a window is not predicted).

    python bench/gpt2_docstrings.py --train-only        # train and cache the network
    python bench/gpt2_docstrings.py                     # every method at 20/40/60%
"""

import argparse
import ast
import hashlib
import json
import math
import os
import pathlib
import sysconfig
import time
import warnings

import numpy
import torch
import torch.nn.functional as F

import lowrank_baselines as lb
import pretrained as bench
import rankwise as rw
from environment import write_result
from rankwise.examples import _save_atomically, cache_dir

END_OF_DOCUMENT = 256
VOCAB_SIZE = 257
CONTEXT = 128
SKIPPED_PACKAGES = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages")
SPLIT_BYTES = {"test": 120_000, "validation": 60_000, "calibration": 60_000}
"""Bytes (at least) dealt to each held-apart split, whole documents, in this order."""
SPLIT_SEED = 0
CALIBRATION_WINDOWS = 256
"""Windows of 128 tokens the compression methods see (32 768 tokens)."""
RECIPE = {"steps": 300, "batch_size": 32, "lr": 2e-3, "warmup": 50, "weight_decay": 0.1,
          "betas": (0.9, 0.95), "clip": 1.0, "seed": 0}
"""Training: AdamW, linear warm-up over ``warmup`` steps then cosine decay to 0, batches of
``batch_size`` windows of 129 tokens drawn at random from the training stream, gradients
clipped to norm ``clip``."""
ARCHITECTURE = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": CONTEXT,
                "vocab_size": VOCAB_SIZE, "tie_word_embeddings": False}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BUDGETS = (0.2, 0.4, 0.6)


def docstring_documents():
    """``[(name, text)]``: the docstrings of each standard-library source file, in path order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if path.relative_to(root).parts[0] in SKIPPED_PACKAGES:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(doc for doc in docs if doc)
        if text:
            documents.append((str(path.relative_to(root)), text))
    return documents


def topic_documents():
    """``[(name, text)]``: the topics of :mod:`pydoc_data.topics`, sorted by name."""
    from pydoc_data.topics import topics
    return [(f"topic:{name}", topics[name]) for name in sorted(topics)]


def split_documents():
    """``{split: [text]}`` for train, calibration, validation and test (see the module docstring)."""
    documents = docstring_documents() + topic_documents()
    order = numpy.random.default_rng(SPLIT_SEED).permutation(len(documents))
    splits, position = {}, 0
    for split, goal in SPLIT_BYTES.items():
        splits[split] = []
        while sum(len(t.encode()) for t in splits[split]) < goal:
            splits[split].append(documents[order[position]][1])
            position += 1
    splits["train"] = [documents[i][1] for i in order[position:]]
    return splits


def token_stream(texts):
    """The texts' UTF-8 bytes as one LongTensor, each document followed by `END_OF_DOCUMENT`."""
    tokens = []
    for text in texts:
        tokens.extend(text.encode("utf-8"))
        tokens.append(END_OF_DOCUMENT)
    return torch.tensor(tokens, dtype=torch.long)


def windows(stream, count=None):
    """Non-overlapping ``(N, CONTEXT)`` windows of `stream` (the first `count` of them)."""
    usable = (len(stream) // CONTEXT) * CONTEXT
    return stream[:usable].view(-1, CONTEXT)[:count]


def gpt2_architecture():
    """The untrained network (see the module docstring), seeded by the caller."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(**ARCHITECTURE, bos_token_id=END_OF_DOCUMENT, eos_token_id=END_OF_DOCUMENT)
    return GPT2LMHeadModel(config)


def cache_path():
    """Cache file: ``gpt2_docstrings_<hash>.pt``, the hash of the recipe, architecture and splits."""
    key = json.dumps({"recipe": RECIPE, "architecture": ARCHITECTURE, "splits": SPLIT_BYTES,
                      "split_seed": SPLIT_SEED}, sort_keys=True)
    return cache_dir() / f"gpt2_docstrings_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def learning_rate_factor(step):
    """Linear warm-up over ``RECIPE["warmup"]`` steps, then cosine decay to 0 at the last step."""
    warmup, steps = RECIPE["warmup"], RECIPE["steps"]
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def train(model, stream, verbose=True):
    """Train `model` in place with :data:`RECIPE` on random windows of `stream`; returns seconds."""
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], betas=RECIPE["betas"],
                                  weight_decay=RECIPE["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    model.train()
    start = time.perf_counter()
    for step in range(RECIPE["steps"]):
        starts = torch.randint(0, len(stream) - CONTEXT - 1, (RECIPE["batch_size"],), generator=generator)
        batch = torch.stack([stream[s:s + CONTEXT + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip"])
        optimizer.step()
        schedule.step()
        if verbose and step % 100 == 0:
            print(f"step {step}: training loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return time.perf_counter() - start


def gpt2_docstrings(verbose=True):
    """The trained network (eval mode), trained once and then loaded from :func:`cache_path`."""
    path = cache_path()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        model = gpt2_architecture()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if verbose:
            print(f"loaded the GPT-2 of the docstrings from {path}")
        return model.eval()
    seconds = train(model, token_stream(split_documents()["train"]), verbose)
    if verbose:
        print(f"trained the GPT-2 of the docstrings in {seconds:.0f} s ({torch.get_num_threads()} threads)")
    _save_atomically(model.state_dict(), path)
    return model.eval()


def logits_of(model, batch):
    """The network's logits for a batch ``{"input_ids": (N, T)}``."""
    return model(**batch).logits


@torch.no_grad()
def perplexity(model, batches):
    """``exp`` of the mean negative log-likelihood of every predicted token of `batches`."""
    total, count = 0.0, 0
    for batch in batches:
        tokens = batch["input_ids"]
        logits = logits_of(model, batch)[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).double(), tokens[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += tokens[:, 1:].numel()
    return math.exp(total / count)


class Benchmark:
    """The trained network, its held-apart windows and the statistics the methods share."""

    def __init__(self):
        self.model = gpt2_docstrings()
        splits = split_documents()
        calibration = windows(token_stream(splits["calibration"]), CALIBRATION_WINDOWS)
        self.calibration = [{"input_ids": w} for w in calibration.split(16)]
        self.splits = {split: [{"input_ids": w} for w in windows(token_stream(splits[split])).split(32)]
                       for split in ("validation", "test")}
        self.layer_names = [name for name, m in self.model.named_modules()
                            if lb.is_conv1d(m) or isinstance(m, torch.nn.Linear)] + ["transformer.wte"]
        self.learnables = rw.count_learnables(self.model)
        self.rankwise_model = self.model if rankwise_handles_conv1d(self.model) else lb.with_linear_layers(self.model)
        self._statistics, self._svds, self._npca = None, {}, {}

    def baseline(self, method, budget):
        """`method` (``"svd"``, ``"asvd"``, ``"svd-llm"``) at one rank ratio removing `budget`."""
        if self._statistics is None:
            self._statistics = lb.input_statistics(self.model, self.layer_names, self.calibration, logits_of)
        if method not in self._svds:
            self._svds[method] = lb.decompositions(self.model, self.layer_names, method, self._statistics)
        return lb.compress(self.model, budget, self._svds[method])

    def rankwise(self, criterion, budget):
        """``rw.compress_network_using_projection`` (``criterion="loss"``: ``loss_fn="kl"``)."""
        loss_fn = "kl" if criterion == "loss" else None
        if criterion not in self._npca:
            self._npca[criterion] = rw.NeuronPCA(self.rankwise_model, self.calibration, layer_names=self.layer_names,
                                                 verbosity="off", loss_fn=loss_fn)
        compressed, _ = rw.compress_network_using_projection(
            self.rankwise_model, self._npca[criterion], learnables_reduction_goal=budget,
            layer_names=self.layer_names, criterion=criterion, verbosity="off")
        return compressed

    def compress(self, method, budget):
        if method.startswith("rw-"):
            return self.rankwise(method[len("rw-"):], budget)
        return self.baseline(method, budget)


def rankwise_handles_conv1d(model):
    """Whether this rankwise has a layer kind for GPT-2's ``Conv1D`` (else the bench converts it)."""
    from rankwise.kinds import kind_of
    return all(kind_of(m) is not None for m in model.modules() if lb.is_conv1d(m))


METHODS = ("svd", "asvd", "svd-llm", "rw-variance", "rw-loss")


def table(rows, split):
    """Markdown: the original's perplexity, then one row per method, cells ``perplexity (removed %)``."""
    original = next(r for r in rows if r["method"] == "original")
    compressed = [r for r in rows if r["method"] != "original"]
    return (f"Original network: perplexity {original[split]:.3f}.\n\n"
            + bench.table(compressed, "gpt2", split, lambda row, s: f"{row[s]:.3f} ({100 * row['removed']:.1f}%)"))


def row_for(benchmark, method, budget, model, seconds):
    return {"network": "gpt2", "method": method, "budget": budget, "seconds": seconds,
            "removed": 1 - rw.count_learnables(model) / benchmark.learnables,
            "conv1d_as_linear": method.startswith("rw-") and benchmark.rankwise_model is not benchmark.model,
            **{split: perplexity(model, batches) for split, batches in benchmark.splits.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.train_only:
        gpt2_docstrings()
        return
    path = os.path.join(RESULTS, "gpt2_docstrings.json")
    benchmark = Benchmark()
    rows = bench.save_rows(path, bench.load_rows(path), [row_for(benchmark, "original", 0.0, benchmark.model, 0.0)])
    for method in args.methods.split(","):
        for budget in map(float, args.budgets.split(",")):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compressed = benchmark.compress(method, budget)
            row = row_for(benchmark, method, budget, compressed, time.perf_counter() - start)
            print(json.dumps(row), flush=True)
            rows = bench.save_rows(path, rows, [row])
    body = (f"GPT-2 of the docstrings ({benchmark.learnables} learnables, cache {cache_path().name}); "
            "perplexity on held-apart documents, no fine-tuning. Cells: perplexity (fraction of all "
            "learnables actually removed).\n\n"
            f"## Test split\n\n{table(rows, 'test')}\n\n## Validation split\n\n{table(rows, 'validation')}")
    write_result(os.path.join(RESULTS, "gpt2_docstrings.md"), "A small GPT-2 compressed without fine-tuning", body)


if __name__ == "__main__":
    main()
