"""FLOPs goals and speed of pretrained networks, and the latency-aware path (issue 25).

**Networks and quality.** MobileNetV2 (ImageNet; top-1 agreement with the original on 224x224
crops of photos, :func:`pretrained.mobilenet_network`: calibration 256 crops of 4 photos,
validation 80 crops of 5 others, test 168 crops of 7 others), all-MiniLM-L6-v2 (cosine of the
mean-pooled sentence embeddings to the original's, :func:`pretrained.minilm_network`:
calibration 256 sentences, validation 128, test 256, from disjoint standard-library modules),
SmolLM2-135M (test perplexity, :mod:`smollm2`: calibration 32 chunks of 256 tokens, validation
8, test 16, from disjoint standard-library modules), and the MNIST CNN
(:func:`rankwise.examples.pretrained_mnist`, test accuracy on images 5000-9999 as in
:mod:`flops_speed`).

**Goals.** ``flops_reduction_goal`` = 0.25 and 0.5 with ``flops_input`` = one calibration batch
at the timed (large) shape, each next to the ``learnables_reduction_goal`` of the same quality:
the largest learnables goal (bisection, :data:`BISECTION_STEPS` steps) whose quality on the
*validation* split is at least the FLOPs-goal network's there; qualities are reported on the
*test* split, which chose nothing (SmolLM2: :data:`LM_BISECTION_STEPS` steps within
:data:`LM_BRACKET` of the FLOPs-goal network's learnables removed). MobileNetV2 and MiniLM use the library's defaults
(``NeuronPCA`` with ``loss_fn="auto"``, ``validation="auto"``; the measured choice of criterion
and allocation; MiniLM with the encoder Linears and the mean-pooling ``forward_fn``). SmolLM2 uses
``criterion="variance", allocation="global"`` on the 210 Linears of all 30 decoder layers (tied
table and head dense; ``NeuronPCA(..., loss_fn=None, validation=None)``), the cheap setting that
fits the shared machine's memory. The MNIST CNN rows repeat :mod:`flops_speed`'s calibration and
timing rounds, and add the goal ``flops_reduction_goal=0.7, round_to=8`` that :mod:`flops_speed`
chose on validation (no learnables match).

**Latency-aware rows.** The same FLOPs goal with ``latency_input=`` a batch of 1 test input
(the deployment batch where the MNIST CNN was slower), and for the MNIST CNN also a batch of
256: layers whose projected form is not faster in isolation are kept dense
(:mod:`rankwise.latency_aware`); ``info.kept_dense_for_latency`` is reported.

**Speed.** :func:`rankwise.compare_speed` (the library's settling rule), original against
compressed on the same input, at batch 1 and a large batch: 256 for the MNIST CNN, 32 for
MobileNetV2 (224x224) and MiniLM (32 tokens; attention mask of ones, the embeddings' mean), the
largest that keeps one comparison within about a minute at 1 thread. Backends: PyTorch eager (for the
convolutional networks also channels-last), ONNX Runtime (1 intra-op thread, the file of
:func:`rankwise.export_onnx`, via :class:`flops_speed.OnnxRuntime`) and, with ``--compile``,
``torch.compile`` (the 25 / 50% FLOPs-goal rows; compilation not timed). SmolLM2:
:func:`rankwise.compare_generation_speed`, prompt of 64 test tokens, batch 1 and 8, 16 greedy
decode steps, prefill and decode tokens/s (eager only). Efficiency = speedup / (FLOPs before /
FLOPs after) on the timed input.

    OMP_NUM_THREADS=1 python bench/flops_speed_pretrained.py --networks cnn,mobilenetv2,minilm,smollm2 [--compile]

Each network writes ``bench/results/flops_speed_pretrained-<network>.json``; the markdown
``bench/results/flops_speed_pretrained.md`` is rebuilt from every such file present.
"""

import argparse
import copy
import gc
import glob
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rankwise as rw  # noqa: E402
from environment import environment_markdown, write_result  # noqa: E402
from flops_speed import SPEED, OnnxRuntime, compress  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FLOPS_GOALS = [0.25, 0.5]
BISECTION_STEPS = 6
TOKENS = 32                      # MiniLM's timed sequence length
LARGE = {"cnn": 256, "mobilenetv2": 32, "minilm": 32, "smollm2": 8}
TIMING = {"small": dict(repeats=20, max_rounds=6), "large": dict(repeats=5, max_rounds=5)}
"""compare_speed's rounds at batch 1 and at the large batch (the MNIST CNN: :data:`flops_speed.SPEED`)."""
LM_PROMPT, LM_NEW_TOKENS, LM_REPEATS = 64, 16, 3
LM_BISECTION_STEPS, LM_BRACKET = 4, 0.2
"""SmolLM2's learnables goal is searched in the FLOPs-goal network's learnables removed +- LM_BRACKET
(4 steps: to 0.025), each step a decision over 210 Linears (about a minute)."""
LM_MEMORY_GIB = 9                # wait for this much available memory before the LM rows


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def matching_learnables_goal(compress_with, validation_score, target, high, low=0.0, steps=BISECTION_STEPS):
    """``(goal, net, info)``: the largest learnables goal in ``[low, high]`` whose validation score is
    >= ``target`` (bisection; ``low`` when none is found)."""
    best = low
    for _ in range(steps):
        middle = (low + high) / 2
        net, _ = compress_with(learnables_reduction_goal=middle)
        passed = validation_score(net) >= target
        del net  # one compressed copy at a time (SmolLM2: 0.5 GiB each)
        gc.collect()
        low, high, best = (middle, high, middle) if passed else (low, middle, best)
    return (best, *compress_with(learnables_reduction_goal=best))


class Embedder(torch.nn.Module):
    """MiniLM on a ``(B, T)`` tensor of token ids without padding: the mean of the last hidden states."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state.mean(1)


def speed_rows(original, compressed, inputs, backends, timing):
    """``{backend: {batch: measurement}}`` for tensor inputs ``{batch: x}``; a backend that fails
    to build is recorded as ``{"error": ...}``."""
    results = {}
    for backend in backends:
        try:
            pair = build_backend(backend, original, compressed, inputs[max(inputs)])
        except Exception as error:  # noqa: BLE001 (a backend that does not work is reported, not fatal)
            results[backend] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            print(f"  {backend}: FAILED {results[backend]['error']}", flush=True)
            continue
        results[backend] = {}
        for batch, x in inputs.items():
            x = x.contiguous(memory_format=torch.channels_last) if backend.endswith("channels-last") else x
            start = time.perf_counter()
            comparison = quiet(rw.compare_speed, *pair, x, **timing[batch])
            flops = rw.count_flops(original, inputs[batch]), rw.count_flops(compressed, inputs[batch])
            speedup = comparison.realised_speedup
            results[backend][batch] = dict(flops_before=flops[0], flops_after=flops[1],
                                           seconds_before=comparison.seconds_before,
                                           seconds_after=comparison.seconds_after, speedup=speedup,
                                           efficiency=speedup * flops[1] / flops[0], stable=comparison.stable,
                                           wall=time.perf_counter() - start)
            print(f"  {backend} batch {batch}: {speedup:.2f}x, eff. {speedup * flops[1] / flops[0]:.2f}"
                  f"{'' if comparison.stable else ' unstable'} ({time.perf_counter() - start:.0f} s)", flush=True)
    return results


def build_backend(backend, original, compressed, example):
    if backend == "eager":
        return original, compressed
    if backend == "eager channels-last":
        return tuple(copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (original, compressed))
    if backend == "onnxruntime":
        return tuple(quiet(OnnxRuntime, m, example) for m in (original, compressed))
    if backend == "torch.compile":
        pair = torch.compile(original), torch.compile(compressed)
        start = time.perf_counter()
        with torch.inference_mode():
            for module in pair:
                module(example[:1])
                module(example)
        print(f"  torch.compile: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        return pair
    raise ValueError(backend)


# --- the networks: each gives (model, compress_with, scores, speed inputs, backends) ------------------

def compressor(model, npca, flops_input, **options):
    """``compress_with(**goal)``: the compressed copy and its info; ``flops_input`` with a FLOPs goal."""
    def compress_with(**goal):
        extra = {"flops_input": flops_input} if "flops_reduction_goal" in goal else {}
        return compress(model, npca, **options, **extra, **goal)
    return compress_with


class Setting:
    """One network's calibration, goals, quality scores and timed inputs."""

    def __init__(self, name, model, compress_with, validation, test, inputs, latency_input, backends,
                 wrap=lambda m: m, high=0.95, compile_backends=("torch.compile",), timing=None, extra_goals=()):
        self.name, self.model, self.compress_with = name, model, compress_with
        self.validation, self.test, self.inputs, self.latency_input = validation, test, inputs, latency_input
        self.backends, self.wrap, self.high, self.compile_backends = backends, wrap, high, compile_backends
        self.extra_goals = extra_goals  # (label, goal): a goal row and its latency-aware rows, no learnables match
        self.timing = timing or {b: TIMING["small" if b == 1 else "large"] for b in inputs}


def cnn_setting():
    from rankwise.datasets import load_mnist
    from rankwise.examples import accuracy, pretrained_mnist
    model = pretrained_mnist("cnn", verbose=False)
    train_images, _ = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    npca = rw.NeuronPCA(model, list(train_images[:2048].split(256)), verbosity="off")
    flops_input = train_images[:256]
    return Setting("cnn", model, compressor(model, npca, flops_input),
                   lambda net: accuracy(net, test_images[:5000], test_labels[:5000]),
                   lambda net: accuracy(net, test_images[5000:], test_labels[5000:]),
                   {1: test_images[:1], 256: test_images[:256]},
                   {1: test_images[:1], 256: test_images[:256]},
                   ("eager", "eager channels-last", "onnxruntime"), high=0.99, timing=SPEED,
                   extra_goals=[("flops -70%, round_to=8 (chosen on validation by flops_speed.py)",
                                 dict(flops_reduction_goal=0.7, round_to=8))])


def mobilenet_setting():
    from pretrained import mobilenet_network
    network = mobilenet_network(False)
    npca = rw.NeuronPCA(network.model, network.calibration, verbosity="off")
    flops_input = network.calibration[0]
    test_batch = network.splits["test"][0]
    return Setting("mobilenetv2", network.model, compressor(network.model, npca, flops_input), lambda net: network.evaluate(net, "validation"),
                   lambda net: network.evaluate(net, "test"), {1: test_batch[:1], 32: test_batch[:32]},
                   {1: test_batch[:1]}, ("eager", "eager channels-last", "onnxruntime"),
                   high=npca.learnables_reduction_range[1])


def minilm_setting():
    import pretrained_data as data
    from pretrained import library_options, minilm_network
    network = minilm_network(False)
    options = library_options(network)
    npca = rw.NeuronPCA(network.model, network.calibration, verbosity="off", **options)
    _, tokenizer = data.minilm()
    ids = {split: fixed_length_ids(tokenizer, data.sentence_split(split, 256, seed=seed))  # minilm_network's seeds
           for split, seed in (("calibration", 0), ("test", 2))}
    as_batch = lambda x: {"input_ids": x, "attention_mask": torch.ones_like(x),  # noqa: E731
                          "token_type_ids": torch.zeros_like(x)}
    flops_input = as_batch(ids["calibration"][:LARGE["minilm"]])
    test = ids["test"]
    return Setting("minilm", network.model, compressor(network.model, npca, flops_input, **options), lambda net: network.evaluate(net, "validation"),
                   lambda net: network.evaluate(net, "test"), {1: test[:1], 32: test[:LARGE["minilm"]]},
                   {1: as_batch(test[:1])}, ("eager", "onnxruntime"), wrap=Embedder,
                   high=npca.learnables_reduction_range[1])


def fixed_length_ids(tokenizer, sentences):
    """``(N, TOKENS)`` token ids of the sentences of at least :data:`TOKENS` tokens, cut there."""
    rows = [ids[:TOKENS] for ids in tokenizer(sentences, truncation=True, max_length=128).input_ids
            if len(ids) >= TOKENS]
    if len(rows) < LARGE["minilm"]:
        raise SystemExit(f"only {len(rows)} sentences of {TOKENS} tokens or more")
    return torch.tensor(rows)


SETTINGS = {"cnn": cnn_setting, "mobilenetv2": mobilenet_setting, "minilm": minilm_setting}


def network_rows(setting, compile_too, rows, save, compile_only=False):
    """Appends to ``rows`` (calling ``save()`` after each) the original row, then per FLOPs goal:
    the goal, its learnables match, the latency-aware rows (``compile_only``: the goal, torch.compile only)."""
    rows.append(dict(network=setting.name, goal="original", quality=setting.test(setting.model),
                     flops_reduction=0.0, learnables_reduction=0.0))
    flops = {b: rw.count_flops(setting.wrap(setting.model), x) for b, x in setting.inputs.items()}
    print(f"{setting.name} original: test quality {rows[0]['quality']:.4f}, FLOPs {flops}", flush=True)

    def add(label, net, info, compiled=False):
        wrapped = setting.wrap(net)
        row = dict(network=setting.name, goal=label, quality=setting.test(net),
                   flops_reduction=1 - rw.count_flops(wrapped, setting.inputs[max(setting.inputs)]) / flops[max(flops)],
                   learnables_reduction=info.learnables_reduction, goal_reached=info.goal_reached,
                   kept_dense=list(info.kept_dense_for_latency))
        print(f"{setting.name} {label}: test quality {row['quality']:.4f}, FLOPs removed {row['flops_reduction']:.1%}, "
              f"learnables removed {row['learnables_reduction']:.1%}, kept dense {len(row['kept_dense'])}", flush=True)
        backends = setting.backends + (setting.compile_backends if compiled else ())
        row["speed"] = speed_rows(setting.wrap(setting.model), wrapped, setting.inputs, backends, setting.timing)
        rows.append(row)
        save()

    goals = [(f"flops -{f:.0%}", dict(flops_reduction_goal=f), True) for f in FLOPS_GOALS]
    if compile_only:
        setting.backends, goals = (), [(label, goal, False) for label, goal, _ in goals]
        setting.latency_input, setting.extra_goals = {}, ()
    for label, goal, match in goals + [(label, goal, False) for label, goal in setting.extra_goals]:
        net, info = setting.compress_with(**goal)
        add(label, net, info, compile_too and (match or compile_only))
        if match:
            target = setting.validation(net)
            learnables, same, same_info = matching_learnables_goal(setting.compress_with, setting.validation,
                                                                   target, setting.high)
            add(f"learnables -{learnables:.1%} (same validation quality as {label})", same, same_info)
        for batch, latency_input in setting.latency_input.items():
            net, info = setting.compress_with(**goal, latency_input=latency_input)
            add(f"{label} + latency_input batch {batch}", net, info)


# --- SmolLM2 ----------------------------------------------------------------------------------------

def available_gib():
    with open("/proc/meminfo") as stream:
        return next(int(line.split()[1]) for line in stream if line.startswith("MemAvailable")) / 2 ** 20


def smollm2_rows(rows, save, quick=False):
    from smollm2 import PROFILES, decoder_linear_names, learnables_of, perplexity, rss_gib, smollm2, splits
    while available_gib() < LM_MEMORY_GIB:
        print(f"waiting: {available_gib():.1f} GiB available, {LM_MEMORY_GIB} needed", flush=True)
        time.sleep(60)
    model, tokenizer = smollm2()
    batches, _ = splits(tokenizer, PROFILES["quick" if quick else "full"])
    names = decoder_linear_names(model, (0,) if quick else None)
    most = learnables_of(model, names) / rw.count_learnables(model)  # the most a learnables goal can remove
    start = time.perf_counter()
    npca = rw.NeuronPCA(model, batches["calibration"], layer_names=names, loss_fn=None, validation=None,
                        verbosity="off")
    print(f"smollm2 statistics: {time.perf_counter() - start:.0f} s, rss (now, peak) {rss_gib()}", flush=True)
    prompt = batches["test"][0]["input_ids"][:, :LM_PROMPT]
    flops_input = {"input_ids": batches["calibration"][0]["input_ids"][:, :LM_PROMPT]}
    compress_with = compressor(model, npca, flops_input, layer_names=names, criterion="variance",
                               allocation="global")

    flops = rw.count_flops(model, {"input_ids": prompt})
    rows.append(dict(network="smollm2", goal="original", quality=perplexity(model, batches["test"]),
                     flops_reduction=0.0, learnables_reduction=0.0))
    print(f"smollm2 original: test perplexity {rows[0]['quality']:.2f}", flush=True)

    def add(label, net, info):
        after = rw.count_flops(net, {"input_ids": prompt})
        row = dict(network="smollm2", goal=label, quality=perplexity(net, batches["test"]),
                   flops_reduction=1 - after / flops, learnables_reduction=info.learnables_reduction,
                   goal_reached=info.goal_reached,
                   kept_dense=list(info.kept_dense_for_latency), speed={"eager": {}})
        for batch in (1, LARGE["smollm2"]):
            speed = rw.compare_generation_speed(model, net, prompt.repeat(batch, 1), new_tokens=LM_NEW_TOKENS,
                                                repeats=LM_REPEATS)
            row["speed"]["eager"][batch] = dict(
                flops_before=flops, flops_after=after, prefill_before=speed.prefill_before,
                prefill_after=speed.prefill_after, decode_before=speed.decode_before, decode_after=speed.decode_after,
                speedup=speed.prefill_speedup, efficiency=speed.prefill_speedup * after / flops,
                decode_speedup=speed.decode_speedup, decode_efficiency=speed.decode_speedup * after / flops,
                stable=True)
        print(f"smollm2 {label}: perplexity {row['quality']:.2f}, FLOPs removed {row['flops_reduction']:.1%}, "
              f"kept dense {len(row['kept_dense'])}, speed {row['speed']}, rss {rss_gib()}", flush=True)
        row["peak_rss_gib"] = rss_gib()[1]
        rows.append(row)
        save()

    for fraction in FLOPS_GOALS:
        label = f"flops -{fraction:.0%}"
        net, info = compress_with(flops_reduction_goal=fraction)
        add(label, net, info)
        target = -perplexity(net, batches["validation"])
        del net
        gc.collect()
        bracket = max(0.0, info.learnables_reduction - LM_BRACKET), min(most, info.learnables_reduction + LM_BRACKET)
        del info
        goal, same, same_info = matching_learnables_goal(compress_with, lambda n: -perplexity(n, batches["validation"]),
                                                         target, bracket[1], bracket[0], LM_BISECTION_STEPS)
        add(f"learnables -{goal:.1%} (same validation perplexity as {label})", same, same_info)
        del same
        gc.collect()
        net, info = compress_with(flops_reduction_goal=fraction, latency_input={"input_ids": prompt})
        add(f"{label} + latency_input batch 1", net, info)
        del net


# --- the table ---------------------------------------------------------------------------------------

QUALITY = {"cnn": "test accuracy", "mobilenetv2": "test top-1 agreement", "minilm": "test cosine",
           "smollm2": "test perplexity"}
BACKENDS = ("eager", "eager channels-last", "onnxruntime", "torch.compile")


def cell(measurement):
    if measurement is None:
        return "-"
    if "error" in measurement:
        return "failed"
    text = f"{measurement['speedup']:.2f}x ({measurement['efficiency']:.2f})"
    if "decode_speedup" in measurement:
        text += f"; decode {measurement['decode_speedup']:.2f}x ({measurement['decode_efficiency']:.2f})"
    return text + ("" if measurement["stable"] else " unstable")


def table(rows):
    name = rows[0]["network"]
    settings = [b for b in BACKENDS if any(b in r.get("speed", {}) for r in rows)]
    batches = sorted({int(b) for r in rows for s in r.get("speed", {}).values() for b in s if b != "error"})
    header = ["goal", QUALITY[name], "FLOPs removed", "learnables removed", "kept dense for latency"]
    header += [f"{s} b{b}" for s in settings for b in batches]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        quality = f"{r['quality']:.2f}" if name == "smollm2" else f"{r['quality']:.4f}"
        cells = [r["goal"], quality, f"{r['flops_reduction']:.1%}", f"{r['learnables_reduction']:.1%}",
                 (str(len(r.get("kept_dense", []))) if "latency" in r["goal"] else "-")
                 + ("" if r.get("goal_reached", True) else ", goal not reached")]
        for s in settings:
            for b in batches:
                speeds = r.get("speed", {}).get(s, {})
                cells.append("failed" if "error" in speeds else cell(speeds.get(b, speeds.get(str(b)))))
        lines.append("| " + " | ".join(cells) + " |")
    errors = {s: r["speed"][s]["error"] for r in rows for s in r.get("speed", {}) if "error" in r["speed"][s]}
    lines += [f"\n{s} failed: {e}" for s, e in errors.items()]
    return "\n".join(lines)


def write_markdown():
    parts = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "flops_speed_pretrained-*.json"))):
        with open(path) as stream:
            record = json.load(stream)
        heading = os.path.basename(path)[len("flops_speed_pretrained-"):-len(".json")]
        parts.append(f"## {heading}\n\n{record['environment']}\n\n{table(record['rows'])}")
    write_result(os.path.join(RESULTS, "flops_speed_pretrained.md"),
                 "FLOPs goals and speed: MobileNetV2, MiniLM, SmolLM2, and the latency-aware path",
                 "Cells: speedup = original seconds / compressed seconds (rankwise.compare_speed; for smollm2 "
                 "prefill tokens/s ratio, then decode), (eff.) = speedup / FLOP reduction on the timed input; "
                 "'unstable': the timings did not settle (shared machine under load).\n\n" + "\n\n".join(parts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="cnn,mobilenetv2,minilm,smollm2")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the FLOPs-goal rows")
    parser.add_argument("--lm-quick", action="store_true", help="smoke run: SmolLM2 decoder layer 0, "
                        "the quick splits (pass small --flops-goals)")
    parser.add_argument("--compile-only", action="store_true", help="only the FLOPs-goal rows, timed "
                        "under torch.compile only (-> flops_speed_pretrained-<network>-compile.json)")
    parser.add_argument("--flops-goals", default=",".join(map(str, FLOPS_GOALS)))
    args = parser.parse_args()
    FLOPS_GOALS[:] = [float(g) for g in args.flops_goals.split(",")]
    for name in args.networks.split(","):
        torch.manual_seed(0)
        start = time.perf_counter()
        rows = []
        file_name = name + ("-quick" if name == "smollm2" and args.lm_quick else "") + (
            "-compile" if args.compile_only else "")
        save = lambda: save_rows(file_name, rows, start)  # noqa: E731 (after every row: a cut run keeps its rows)
        if name == "smollm2":
            smollm2_rows(rows, save, args.lm_quick)
        else:
            network_rows(SETTINGS[name](), args.compile or args.compile_only, rows, save, args.compile_only)
        save()


def save_rows(name, rows, start):
    with open(os.path.join(RESULTS, f"flops_speed_pretrained-{name}.json"), "w") as stream:
        json.dump({"environment": environment_markdown() + f"\n- wall: {time.perf_counter() - start:.0f} s",
                   "rows": rows}, stream, indent=1, default=str)
    write_markdown()


if __name__ == "__main__":
    main()
