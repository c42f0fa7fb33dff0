"""Compression of real pretrained networks without fine-tuning (issue 16).

MobileNetV2 (ImageNet, torchvision) judged by top-1 agreement with the original on crops of
photos it was not calibrated on; all-MiniLM-L6-v2 judged by the cosine of its mean-pooled
sentence embeddings to the original's on sentences of other modules (bench/pretrained_data.py).
Budgets are fractions of ALL the network's learnables (MiniLM's embeddings included). Methods
(bench/pretrained_methods.py for the mathematics), written ``metric-allocation[+options]``:

- ``svd-uniform``: data-free truncated SVD, the same rank fraction in every matrix;
- ``white-uniform``: SVD-LLM-style input-whitened SVD, same fraction everywhere;
- ``white-relative``: the same factors (= output PCA), greedy by per-layer residual fractions;
- ``white-global`` / ``bn-*`` / ``fisher-*`` / ``bnfisher-*``: metric of the output error:
  absolute, after the following BatchNorm (the folded layer's space), the diagonal Fisher of
  sampled labels, or the BN metric scaled per layer so that its total equals the Fisher's
  (the per-channel shape from BN, one sensitivity per layer from the gradients);
  ``global``: greedy by the estimated error per learnable;
- options ``+shrink<alpha>`` (covariance shrunk toward the data-free metric), ``+seq``
  (sequential correction: each layer fitted to the original output given the compressed
  network's input), ``+recal`` (BatchNorm statistics re-estimated on the calibration crops);
- ``rankwise``: ``rw.compress_network_using_projection(model, npca,
  learnables_reduction_goal=f)`` with the default criterion of the rankwise it runs on (rows
  measured before the wave-2 criteria are kept in the results as ``rankwise``; they are the
  wave-1 variance criterion);
- ``rw-<criterion>[+seq][+emb][+uniform]``: the library's own options, on the library's own
  statistics: ``criterion="variance"`` (BatchNorm-aware) or ``"loss"`` (``NeuronPCA(...,
  loss_fn="kl")`` for MobileNetV2, ``"mse"`` on the embeddings for MiniLM), ``+seq``:
  ``correction="sequential"``, ``+emb``: MiniLM's token embedding table projected too,
  ``+uniform``: ``allocation="uniform"`` (the same fraction of each layer's learnables),
  ``+reg<alpha>``: ``NeuronPCA(..., regularization=alpha)`` instead of ``"auto"``;
- ``rw-defaults[+kl][+emb][+data]`` (issue 21): no option set, the measured decisions:
  ``rw.compress_network_using_projection(model, npca, learnables_reduction_goal=f)`` with
  ``npca = rw.NeuronPCA(model, calibration)`` at its defaults (``loss_fn="auto"``,
  ``validation="auto"``: every fourth batch held out and the candidates scored on it), which is
  what passing the calibration batches themselves does (``+data``: they are passed, the statistics
  recomputed per budget, to check that); ``+kl``: ``score_fn="kl"`` (MobileNetV2's batches are
  bare image tensors, without labels, so the automatic score is the relative error of the logits);
  MiniLM gets the library methods' ``forward_fn`` and layers (encoder Linears, ``+emb``: and the
  token table); the rows keep ``info.choice`` and every candidate's score;
- ``rw-old-defaults[+emb]``: the defaults before issue 21, ``criterion="variance",
  allocation="global"`` on ``NeuronPCA(..., loss_fn=None, validation=None)``.

MiniLM is calibrated one sentence per batch (no padding enters any statistic); it is evaluated
on padded batches with attention masks. Each run adds its rows to bench/results/pretrained-<network>.json
(key: method, budget) and rewrites bench/results/pretrained.md from the rows of all networks
(cells: seconds to compress, excluding the shared statistics computed once per network).

    python bench/pretrained.py                      # everything
    python bench/pretrained.py --quick              # MobileNetV2, 20/30%, four methods
    python bench/pretrained.py --network minilm --methods white-uniform,fisher-global
"""

import argparse
import copy
import glob
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F

import pretrained_data as data
import pretrained_methods as pm
import rankwise as rw
from environment import load_rows, write_result
from rankwise.batchnorm import fold_batchnorm, recalibrate_batchnorm
from rankwise.metric import batchnorm_scale

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BUDGETS = (0.1, 0.2, 0.3, 0.4)
PROTOTYPES = ("svd-uniform", "white-uniform", "white-relative", "white-global", "bn-uniform", "bn-global",
              "fisher-uniform", "fisher-global")
METHODS = {"mobilenetv2": PROTOTYPES + ("rw-variance", "rw-variance+reg0.3", "rw-loss", "rw-variance+seq",
                                       "rw-defaults", "rw-defaults+kl", "rw-old-defaults"),
           "mobilenetv2-texture": ("svd-uniform", "white-relative", "bn-global", "rw-defaults", "rw-defaults+kl",
                                   "rw-old-defaults"),
           "minilm": PROTOTYPES + ("rw-variance", "rw-variance+emb", "rw-loss+emb", "rw-loss+uniform",
                                   "rw-defaults", "rw-defaults+emb", "rw-old-defaults", "rw-old-defaults+emb")}
QUICK_METHODS = ("svd-uniform", "white-uniform", "white-relative", "bn-global")


class Network:
    """A pretrained network with its data, its original outputs and its metric."""

    def __init__(self, name, model, calibration, validation, test, run, score, probe, skip=()):
        self.name, self.model, self.run, self.score, self.probe = name, model, run, score, probe
        self.calibration, self.splits = calibration, {"validation": validation, "test": test}
        self.layers = pm.factorable_layers(model, skip)
        self.learnables = rw.count_learnables(model)
        with torch.no_grad():
            self.reference = {split: [run(model, b) for b in batches] for split, batches in self.splits.items()}

    def evaluate(self, model, split):
        with torch.no_grad():
            outputs = [self.run(model, b) for b in self.splits[split]]
        return self.score(torch.cat(outputs), torch.cat(self.reference[split]))


def mobilenet_network(quick, splits=("calibration", "validation", "test"), calibration_crops=64,
                      name="MobileNetV2"):
    crops = {"calibration": calibration_crops, "validation": 16, "test": 12 if quick else 24}
    images = {split: data.image_split(photos, count, seed=i)
              for i, (split, photos, count) in enumerate(zip(crops, splits, crops.values()))}
    batches = {split: list(x.split(32)) for split, x in images.items()}

    def agreement(output, reference):
        return float((output.argmax(1) == reference.argmax(1)).double().mean())

    def sampled_nll(logits):
        labels = torch.distributions.Categorical(logits=logits.detach()).sample()
        return F.cross_entropy(logits, labels, reduction="sum")

    network = Network(name, data.mobilenet_v2(), batches["calibration"], batches["validation"],
                      batches["test"], lambda m, b: m(b), agreement, sampled_nll)
    network.loss = "kl"
    network.library_options = {}  # the library's own selection and forward are these layers and m(b)
    return network


def mobilenet_texture_network(quick):
    """MobileNetV2 calibrated on crops of textures (brick, grass, gravel: 85 crops each, 8 batches),
    validated and tested on the other photos of the validation and test splits."""
    return mobilenet_network(quick, ("texture_calibration", "texture_validation", "texture_test"), 85,
                             "MobileNetV2, texture calibration")


def minilm_network(quick):
    model, tokenizer = data.minilm()
    sentences = {split: data.sentence_split(split, count, seed=i) for i, (split, count)
                 in enumerate({"calibration": 256, "validation": 128, "test": 128 if quick else 256}.items())}
    calibration = data.tokenize(tokenizer, sentences["calibration"], 1)
    generator = torch.Generator().manual_seed(0)

    def cosine(output, reference):
        return float(F.cosine_similarity(output, reference, dim=1).mean())

    def gaussian_probe(embeddings):
        return (torch.randn(embeddings.shape, generator=generator) * embeddings).sum()

    skip = [name for name, _ in model.named_modules() if name.startswith("pooler")]
    network = Network("all-MiniLM-L6-v2", model, calibration, data.tokenize(tokenizer, sentences["validation"], 32),
                      data.tokenize(tokenizer, sentences["test"], 32), data.mean_pooled, cosine,
                      gaussian_probe, skip)
    network.loss = "mse"
    network.library_options = {"forward_fn": data.mean_pooled}
    return network


NETWORKS = {"mobilenetv2": mobilenet_network, "mobilenetv2-texture": mobilenet_texture_network,
            "minilm": minilm_network}


class Statistics:
    """Calibration statistics shared by all methods of one network (computed on first use)."""

    def __init__(self, network):
        self.network, self._moments, self._fisher, self._plans, self._npca = network, None, None, {}, {}
        self.seconds = 0.0

    def moments(self):
        if self._moments is None:
            start = time.perf_counter()
            self._moments = pm.input_moments(self.network.model, self.network.layers,
                                             self.network.calibration, self.network.run)
            self.seconds += time.perf_counter() - start
        return self._moments

    def metric(self, kind):
        layers = self.network.layers
        if kind == "fisher":
            if self._fisher is None:
                start = time.perf_counter()
                self._fisher = pm.fisher_diagonals(self.network.model, layers, self.network.calibration,
                                                   self.network.run, self.network.probe)
                self.seconds += time.perf_counter() - start
            return self._fisher
        if kind == "bnfisher":
            bn, fisher = self.metric("bn"), self.metric("fisher")
            return {n: bn[n] * float(fisher[n].sum() / bn[n].sum()) for n in layers}
        ones = {n: torch.ones(l.weight.shape[0], dtype=torch.float64) for n, l in layers.items()}
        if kind == "bn":
            model = self.network.model
            for layer_name, norm_name in fold_batchnorm(model)[1].items():
                if layer_name in ones:
                    ones[layer_name] = batchnorm_scale(model.get_submodule(norm_name)).detach().double() ** 2
        return ones

    def plans(self, kind, alpha):
        """``{name: LayerPlan}`` for the metric `kind` and shrinkage `alpha` (cached)."""
        if (kind, alpha) not in self._plans:
            self._plans[kind, alpha] = self._new_plans(kind, alpha)
        return self._plans[kind, alpha]

    def neuron_pca(self, loss=False, embeddings=False, regularization="auto"):
        """rankwise's statistics of the factorable layers (and of the embedding table), with the
        gradients of ``criterion="loss"`` when ``loss`` (cached)."""
        key = (loss, embeddings, regularization)
        if key not in self._npca:
            start = time.perf_counter()
            self._npca[key] = rw.NeuronPCA(self.network.model, self.network.calibration,
                                           layer_names=library_layers(self.network, embeddings),
                                           verbosity="off", forward_fn=self.network.run,
                                           loss_fn=self.network.loss if loss else None,
                                           regularization=regularization)
            self.seconds += time.perf_counter() - start
        return self._npca[key]

    def default_neuron_pca(self, embeddings=False, old=False):
        """The NeuronPCA that ``compress_network_using_projection(model, calibration, ...)`` builds
        with no option set (``loss_fn="auto"``, ``validation="auto"``), or with ``old`` the one of
        the defaults before issue 21 (``loss_fn=None, validation=None``); cached."""
        key = ("defaults", embeddings, old)
        if key not in self._npca:
            start = time.perf_counter()
            self._npca[key] = rw.NeuronPCA(self.network.model, self.network.calibration, verbosity="off",
                                           **library_options(self.network, embeddings),
                                           **({"loss_fn": None, "validation": None} if old else {}))
            self.seconds += time.perf_counter() - start
        return self._npca[key]

    def _new_plans(self, kind, alpha):
        layers, metric = self.network.layers, self.metric("ones" if kind in ("svd", "white") else kind)
        plans = {}
        for name, layer in layers.items():
            weight = pm.layer_matrix(layer)
            if kind == "svd":
                n = weight.shape[1]
                mean, covariance = torch.zeros(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
            else:
                moments = self.moments()[name]
                mean, covariance = moments.means()[0], pm.shrunk(moments.covariance_b(), alpha)
            plans[name] = pm.LayerPlan(layer, weight, mean, covariance, metric[name])
        return plans


def parse_method(method):
    """``metric-allocation[+option...]`` -> (metric, allocation, alpha, sequential, recalibrate)."""
    base, *options = method.split("+")
    kind, allocation = base.split("-")
    alpha = next((float(o[len("shrink"):]) for o in options if o.startswith("shrink")), 0.0)
    return kind, allocation, alpha, "seq" in options, "recal" in options


def ranks_for(plans, layers, allocation, target):
    if allocation == "uniform":
        return pm.allocate_uniform(layers, target)
    return pm.allocate_global(plans, target, normalise=allocation == "relative")


def one_shot(network, plans, ranks):
    compressed = copy.deepcopy(network.model)
    for name, rank in ranks.items():
        pm.install(compressed, name, plans[name].factors(rank))
    return compressed


EMBEDDING = {"all-MiniLM-L6-v2": "embeddings.word_embeddings"}


def library_layers(network, embeddings=False):
    """The layers the library methods compress: the factorable ones, and the token table."""
    return list(network.layers) + ([EMBEDDING[network.name]] if embeddings else [])


def library_options(network, embeddings=False):
    """The options the library methods must set for `network`: none for MobileNetV2 (the
    library's default layers are the factorable ones, its default forward ``model(batch)``);
    MiniLM's mean pooling and the encoder Linears (and the token table with `embeddings`)."""
    if not network.library_options:
        return {}
    return {**network.library_options, "layer_names": library_layers(network, embeddings)}


def defaults_compress(network, statistics, method, budget):
    """``rw-defaults[+kl][+emb][+data]`` and ``rw-old-defaults[+emb]`` (see the module docstring):
    the compressed copy and ``{"choice": ..., "score_name": ..., "candidates": [...]}``."""
    base, *options = method.split("+")
    embeddings = "emb" in options
    extra = library_options(network, embeddings)
    if base == "rw-old-defaults":
        compressed, info = rw.compress_network_using_projection(
            network.model, statistics.default_neuron_pca(embeddings, old=True), learnables_reduction_goal=budget,
            criterion="variance", allocation="global", verbosity="off", **extra)
        return compressed, {}
    data = network.calibration if "data" in options else statistics.default_neuron_pca(embeddings)
    compressed, info = rw.compress_network_using_projection(
        network.model, data, learnables_reduction_goal=budget, verbosity="off", **extra,
        **({"score_fn": "kl"} if "kl" in options else {}))
    measured = info.measured
    return compressed, {"choice": info.choice, "score_name": measured.score_name if measured else None,
                        "candidates": [s.as_dict() for s in info.candidates]}


def library_compress(network, statistics, method, budget):
    """``rw-<criterion>[+seq][+emb][+uniform]`` through the library's public API."""
    base, *options = method.split("+")
    criterion = base.split("-")[1]
    regularization = next((float(o[len("reg"):]) for o in options if o.startswith("reg")), "auto")
    npca = statistics.neuron_pca(loss=criterion == "loss", embeddings="emb" in options,
                                 regularization=regularization)
    sequential = "seq" in options
    compressed, _ = rw.compress_network_using_projection(
        network.model, npca, learnables_reduction_goal=budget,
        layer_names=library_layers(network, "emb" in options), criterion=criterion,
        allocation="uniform" if "uniform" in options else "global", verbosity="off",
        forward_fn=network.run, correction="sequential" if sequential else None,
        correction_data=network.calibration if sequential else None)
    return compressed


def compress(network, statistics, method, budget):
    """The compressed copy of the network for `method` at `budget` (fraction of all learnables),
    and a dict of what to add to its row (the measured choice of ``rw-defaults``)."""
    if method.startswith(("rw-defaults", "rw-old-defaults")):
        return defaults_compress(network, statistics, method, budget)
    return compress_only(network, statistics, method, budget), {}


def compress_only(network, statistics, method, budget):
    """The compressed copy of the network for `method` at `budget` (fraction of all learnables)."""
    target = budget * network.learnables
    if method.startswith("rankwise"):
        compressed, _ = rw.compress_network_using_projection(
            network.model, statistics.neuron_pca(), learnables_reduction_goal=budget,
            layer_names=list(network.layers), verbosity="off")
        return compressed
    if method.startswith("rw-"):
        return library_compress(network, statistics, method, budget)
    kind, allocation, alpha, sequential, recalibrate = parse_method(method)
    plans = statistics.plans(kind, alpha)
    ranks = ranks_for(plans, network.layers, allocation, target)
    if sequential:
        metric = statistics.metric("ones" if kind == "white" else kind)
        compressed = pm.sequential_compress(network.model, network.stages, network.calibration, ranks,
                                            metric, alpha)
    else:
        compressed = one_shot(network, plans, ranks)
    if recalibrate:
        recalibrate_batchnorm(compressed, network.calibration)
    return compressed


def save_rows(path, rows, new_rows):
    keys = {(r["network"], r["method"], r["budget"]) for r in new_rows}
    merged = [r for r in rows if (r["network"], r["method"], r["budget"]) not in keys] + new_rows
    with open(path, "w") as stream:
        json.dump(merged, stream, indent=1)
    return merged


def table(rows, network, split, cell=None):
    """Markdown table: one row per method, one column per budget, `split` scores (removed %).

    ``cell(row, split)`` writes a cell (default: score, removed %, seconds)."""
    cell = cell or (lambda row, split: f"{row[split]:.3f} ({100 * row['removed']:.1f}%, {row['seconds']:.0f}s)")
    rows = [r for r in rows if r["network"] == network]
    budgets = sorted({r["budget"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(f"{100 * b:.0f}%" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in methods:
        cells = []
        for budget in budgets:
            row = next((r for r in rows if r["method"] == method and r["budget"] == budget), None)
            cells.append("" if row is None else cell(row, split))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows):
    parts = ["Cells: score (fraction of all learnables actually removed, seconds to compress). "
             "MobileNetV2: top-1 agreement with the original; MiniLM: mean cosine of the "
             "mean-pooled embeddings to the original's. No fine-tuning. Tune on validation, "
             "read test. MobileNetV2: calibration 256 crops of 4 photos, validation 80 crops "
             "of 5 others, test 168 crops of 7 others; factored: the stem, every 1x1 conv and "
             "the classifier (depthwise convs stay). MiniLM: calibration 256 sentences (one "
             "per batch), validation 128, test 256, from disjoint standard-library modules; "
             "factored: every encoder Linear (the unused pooler stays; the embeddings stay except "
             "in the +emb methods, which project the token table; they always count in the denominator). "
             "rankwise-wave1: rankwise before the wave-2 criteria (commit 0594959's variance criterion). A budget not run for a method is an empty cell."]
    if any(r["network"].startswith("MobileNetV2, texture") for r in rows):
        parts.append("MobileNetV2, texture calibration (issue 21): calibration 255 crops of brick, grass and "
                     "gravel (8 batches of 32), validation 64 crops of chelsea, flower, moon, hubble_deep_field, "
                     "test 144 crops of the test photos other than gravel.")
    for network in dict.fromkeys(r["network"] for r in rows):
        for split in ("test", "validation"):
            parts.append(f"## {network}, {split} split\n\n{table(rows, network, split)}")
    measured = [r for r in rows if r.get("candidates")]
    if measured:
        parts.append("## Measured choices (rw-defaults)\n\n" + choices_table(measured))
    return "\n\n".join(parts)


def choices_table(rows):
    """One line per measured row: the choice kept and every candidate's held-out score."""
    def short(c):
        alpha = c["regularization"]
        return (f"{c['criterion']}/{c['allocation']}/"
                + ("data-free" if alpha == 1.0 else f"a={alpha}"))
    lines = ["| network | method | budget | score | candidates (held-out score, lower is better) | chosen |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        candidates = "; ".join(f"{short(c)} {c['score']:.4g}" if c["score"] is not None
                               else f"{short(c)} not built" for c in r["candidates"])
        lines.append(f"| {r['network']} | {r['method']} | {100 * r['budget']:.0f}% | {r['score_name']} "
                     f"| {candidates} | {r['choice'].split(' (')[0]} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(NETWORKS), action="append")
    parser.add_argument("--budgets", help="comma-separated fractions of all learnables, e.g. 0.2,0.3")
    parser.add_argument("--methods", help="comma-separated methods (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="MobileNetV2 at 20/30%%, four methods")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing; rewrite the markdown from the stored rows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--output", default="pretrained", help="name of the results files in bench/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    networks = args.network or (["mobilenetv2"] if args.quick else sorted(NETWORKS))
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else \
        ([0.2, 0.3] if args.quick else list(BUDGETS))
    chosen = args.methods.split(",") if args.methods else None
    for key in [] if args.table_only else networks:
        path = os.path.join(RESULTS, f"{args.output}-{key}.json")
        rows = load_rows(path)
        network = NETWORKS[key](args.quick)
        network.stages = STAGES[key]
        statistics = Statistics(network)
        print(f"{network.name}: {network.learnables} learnables, {len(network.layers)} factorable layers", flush=True)
        methods = chosen or list(QUICK_METHODS if args.quick else METHODS[key])
        for method in methods:
            for budget in budgets:
                start, statistics_before = time.perf_counter(), statistics.seconds
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    compressed, extra = compress(network, statistics, method, budget)
                seconds = time.perf_counter() - start - (statistics.seconds - statistics_before)
                row = {"network": network.name, "method": method, "budget": budget, "seconds": seconds,
                       "removed": 1 - rw.count_learnables(compressed) / network.learnables,
                       "validation": network.evaluate(compressed, "validation"),
                       "test": network.evaluate(compressed, "test"), **extra}
                print(json.dumps(row), flush=True)
                rows = save_rows(path, rows, [row])
        print(f"{network.name}: shared statistics (moments, Fisher) took {statistics.seconds:.0f}s", flush=True)
    rows = [r for p in sorted(glob.glob(os.path.join(RESULTS, f"{args.output}-*.json"))) for r in load_rows(p)]
    write_result(os.path.join(RESULTS, f"{args.output}.md"), "Pretrained networks, no fine-tuning",
                 markdown(rows))


def mobilenet_stages():
    """Stage functions ``f(model, h)`` whose composition is MobileNetV2's forward."""
    blocks = [lambda m, h, i=i: m.features[i](h) for i in range(19)]
    return blocks + [lambda m, h: m.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))]


def minilm_stages():
    """Embeddings then the six encoder layers, for unpadded one-sentence batches."""
    embed = [lambda m, b: m.embeddings(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"])]
    return embed + [lambda m, h, i=i: m.encoder.layer[i](h) for i in range(6)]


STAGES = {"mobilenetv2": mobilenet_stages(), "mobilenetv2-texture": mobilenet_stages(), "minilm": minilm_stages()}

if __name__ == "__main__":
    main()
