"""Projected LSTM and GRU on Japanese Vowels: MATLAB's projection example, reproduced.

An LSTM with 100 hidden units reading the 12 cepstrum coefficients of each frame, its last
hidden state classified by a fully connected layer into the 9 speakers (MATLAB's
``dlnetJapaneseVowels``), and a GRU of the same size. Each is trained here with a fixed seed
on the 270 training sequences, then, for each learnables reduction goal:

- ``NeuronPCA`` on the training sequences, in packed batches (no padding enters the PCA);
- ``compress_network_using_projection(model, npca, learnables_reduction_goal=goal)`` (the
  global allocation shares the goal between the recurrent layer and the classifier);
- test accuracy (370 sequences) without fine-tuning, then after a few epochs of fine-tuning
  on the training sequences; the original network fine-tuned the same way is the control;
- the residual of the recurrent layer's gate pre-activations measured over one step with the
  original's inputs and hidden states (teacher forcing), against the estimate that ranked it;

and for each explained variance goal (``explained_variance_goal=goal``): the learnables, the
test accuracy, and the explained variance of the recurrent layer's output sequence,
``1 - E|h - h'|^2 / E|h - mean h|^2``, measured here by running the original and the projected
layer on the training (calibration) and on the test sequences.

CPU latency (one torch thread, median of repeats) of the original and of the projected
network with either execution path of the projected layer: the whole test set as one packed
batch, and one sequence at a time.

Run from the repository root: ``python bench/recurrent_projection.py``.
Writes ``bench/results/recurrent_projection.md``.
"""

import copy
import os
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rankwise as rw
from environment import write_result
from rankwise.datasets import load_japanese_vowels
from rankwise.statistics.recurrent import RESERVOIR_STEPS

GOALS = (0.5, 0.6, 0.7, 0.8, 0.9)
EXPLAINED_VARIANCE_GOALS = (0.999, 0.99, 0.95)
HIDDEN, CLASSES, FEATURES = 100, 9, 12
TRAIN = {"epochs": 60, "lr": 3e-3, "batch_size": 27, "clip": 1.0, "seed": 0}
FINE_TUNE = {"epochs": 8, "lr": 1e-3, "batch_size": 27, "clip": 1.0, "seed": 1}
LATENCY_REPEATS = {"batch": 15, "sequence": 101}
RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "recurrent_projection.md")


class VowelClassifier(nn.Module):
    """A recurrent layer over the frames, its last hidden state into a fully connected layer."""

    def __init__(self, kind: str):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(FEATURES, HIDDEN, batch_first=True)
        self.fc = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(h[-1])


def batches(sequences, labels, batch_size, generator=None):
    """``(PackedSequence, labels)`` batches, shuffled when a generator is given."""
    order = (torch.randperm(len(sequences), generator=generator) if generator is not None
             else torch.arange(len(sequences)))
    return [(pack_sequence([sequences[i] for i in chunk], enforce_sorted=False), labels[chunk])
            for chunk in order.split(batch_size)]


def train(model, sequences, labels, recipe):
    """Adam with a cosine decay, gradient norm clipped; the model is left in eval mode."""
    generator = torch.Generator().manual_seed(recipe["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    steps = recipe["epochs"] * -(-len(sequences) // recipe["batch_size"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(recipe["epochs"]):
        for packed, target in batches(sequences, labels, recipe["batch_size"], generator):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(packed), target).backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, sequences, labels):
    packed = pack_sequence(sequences, enforce_sorted=False)
    return (model.eval()(packed).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def one_step_residual(original, projected, sequences):
    """Fraction of the variance of ``W_ih x_t`` and ``W_hh h_{t-1}`` (with the original's
    inputs and hidden states, ``h_0 = 0``) that the projected weights lose in one step."""
    rnn, cell = original.rnn, projected.rnn
    x = torch.cat(sequences)
    h = torch.cat([torch.cat([torch.zeros(1, HIDDEN), rnn(s)[0][:-1]]) for s in sequences])
    w_ih, w_hh, b_ih, b_hh = cell.dense_weights("l0")
    lost = ((x @ (w_ih - rnn.weight_ih_l0).T + b_ih - rnn.bias_ih_l0
             + h @ (w_hh - rnn.weight_hh_l0).T + b_hh - rnn.bias_hh_l0) ** 2).sum()
    total = sum(((z - z.mean(0)) ** 2).sum() for z in (x @ rnn.weight_ih_l0.T, h @ rnn.weight_hh_l0.T))
    return (lost / total).item()


@torch.no_grad()
def sequence_explained_variance(original, projected, sequences):
    """``1 - E|h - h'|^2 / E|h - mean h|^2`` over every time step of the recurrent layer's output."""
    packed = pack_sequence(sequences, enforce_sorted=False)
    h, h_projected = original.rnn(packed)[0].data, projected.rnn(packed)[0].data
    return (1 - ((h - h_projected) ** 2).sum() / ((h - h.mean(0)) ** 2).sum()).item()


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, the calls taking turns (so that the load of the shared
    machine drifts alike for all); the first round warms up."""
    times = {key: [] for key in calls}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t[1:]) for key, t in times.items()}


def with_execution(model, path):
    """``model`` called with its projected layer on ``path`` (the original model as it is)."""
    def call(x):
        if path is not None:
            model.rnn.execution = path
        return model(x)
    return call


def latencies(networks: dict, sequences) -> dict:
    """``{(network, path): {"batch": s, "sequence": s}}``: medians on the whole packed test set
    and on one sequence of median length, for each execution path of each projected network
    (path ``None`` for the original)."""
    packed = pack_sequence(sequences, enforce_sorted=False)
    one = sorted(sequences, key=len)[len(sequences) // 2]
    calls = {(name, path): with_execution(model, path) for name, model in networks.items()
             for path in (("dense", "factored") if isinstance(model.rnn, rw.ProjectedLayer) else (None,))}
    medians = {form: interleaved_medians({key: lambda c=c: c(x) for key, c in calls.items()},
                                         LATENCY_REPEATS[form])
               for form, x in (("batch", packed), ("sequence", one))}
    return {key: {form: medians[form][key] for form in medians} for key in calls}


def auto_paths(model, batch: int) -> dict:
    """The path ``execution="auto"`` takes on the whole test set and on one sequence."""
    model.rnn.execution = "auto"
    return {form: "factored" if model.rnn.uses_factored(n, torch.device("cpu")) else "dense"
            for form, n in (("batch", batch), ("sequence", 1))}


def benchmark(kind, data):
    (train_x, train_y), (test_x, test_y) = data
    torch.manual_seed(TRAIN["seed"])
    start = time.perf_counter()
    model = train(VowelClassifier(kind), train_x, train_y, TRAIN)
    training_time = time.perf_counter() - start
    original = {"learnables": rw.count_learnables(model), "accuracy": accuracy(model, test_x, test_y),
                "fine_tuned": accuracy(train(copy.deepcopy(model), train_x, train_y, FINE_TUNE),
                                       test_x, test_y),
                "training_time": training_time}
    start = time.perf_counter()
    npca = rw.NeuronPCA(model, [packed for packed, _ in batches(train_x, train_y, 27)], verbosity="off")
    calibration_time = time.perf_counter() - start
    rows, networks = [], {"original": model}
    for goal in GOALS:
        net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                         verbosity="off")
        row = {"goal": goal, "info": info, "accuracy": accuracy(net, test_x, test_y),
               "auto": auto_paths(net, len(test_x)), "one_step": one_step_residual(model, net, train_x)}
        tuned = train(copy.deepcopy(net), train_x, train_y, FINE_TUNE)
        row["fine_tuned"] = accuracy(tuned, test_x, test_y)
        rows.append(row)
        networks[goal] = net
    variance_rows = []
    for goal in EXPLAINED_VARIANCE_GOALS:
        net, info = rw.compress_network_using_projection(model, npca, explained_variance_goal=goal,
                                                         verbosity="off")
        variance_rows.append({"goal": goal, "info": info, "accuracy": accuracy(net, test_x, test_y),
                              "calibration": sequence_explained_variance(model, net, train_x),
                              "test": sequence_explained_variance(model, net, test_x)})
    return {"kind": kind, "original": original, "rows": rows, "variance_rows": variance_rows,
            "calibration_time": calibration_time,
            "reduction_range": npca.learnables_reduction_range, "latency": latencies(networks, test_x)}


def ranks(projection):
    return f"{projection.side}, in {projection.rank_in or '-'}, out {projection.rank_out or '-'}"


def accuracy_table(result):
    o = result["original"]
    low, high = result["reduction_range"]
    lines = [f"### {result['kind'].upper()} (100 hidden units) + fully connected: {o['learnables']:,} "
             f"learnables, test accuracy {o['accuracy']:.2%} ({o['fine_tuned']:.2%} after the same "
             f"fine-tuning as the projected networks); trained in {o['training_time']:.0f} s; "
             f"NeuronPCA {result['calibration_time']:.2f} s; reduction range {low:.1%} to {high:.1%}",
             "",
             "| goal | learnables (removed) | recurrent layer: side, ranks | fc | explained var. "
             "(network) | recurrent residual: estimated / one step measured "
             "| accuracy, no fine-tuning (change) | after fine-tuning (change) |",
             "|---:|---:|---|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        info = row["info"]
        lines.append(
            f"| {row['goal']:.0%} | {layer_columns(info)} | {info.explained_variance:.4f} "
            f"| {1 - info.layers['rnn'].explained_variance:.4f} / {row['one_step']:.4f} "
            f"| {with_change(row['accuracy'], o)} | {with_change(row['fine_tuned'], o)} |")
    return "\n".join(lines)


def layer_columns(info):
    """``learnables (removed) | recurrent layer's side and ranks | fc's`` of a table row."""
    fc = info.layers["fc"]
    return (f"{info.learnables_after:,} ({info.learnables_reduction:.1%}) | {ranks(info.layers['rnn'])} "
            f"| {'dense' if fc.side == 'dense' else ranks(fc)}")


def with_change(accuracy, original):
    return f"{accuracy:.2%} ({100 * (accuracy - original['accuracy']):+.2f})"


def variance_goal_table(result):
    o = result["original"]
    lines = [f"### {result['kind'].upper()}: explained variance goals (test accuracy of the original "
             f"{o['accuracy']:.2%})", "",
             "| goal | learnables (removed) | recurrent layer: side, ranks | fc "
             "| recurrent output sequence explained var.: calibration / test (measured here) "
             "| the same, as rankwise measured it on its reservoir | accuracy, no fine-tuning (change) |",
             "|---:|---:|---|---|---:|---:|---:|"]
    for row in result["variance_rows"]:
        info = row["info"]
        reported = info.layers["rnn"].measured_explained_variance
        lines.append(f"| {row['goal']:g} | {layer_columns(info)} | {row['calibration']:.4f} / {row['test']:.4f} "
                     f"| {'-' if reported is None else f'{reported:.4f}'} | {with_change(row['accuracy'], o)} |")
    return "\n".join(lines)


def latency_table(results):
    lines = ["| network | goal | 370 sequences, packed: dense path / factored path (ms) "
             "| one sequence: dense / factored (ms) | auto picks (batch / one) |",
             "|---|---:|---:|---:|---|"]
    for result in results:
        t = result["latency"]
        o = t[("original", None)]
        lines.append(f"| {result['kind'].upper()} original | - | {1e3 * o['batch']:.2f} "
                     f"| {1e3 * o['sequence']:.3f} | - |")
        for row in result["rows"]:
            dense, factored, auto = t[(row["goal"], "dense")], t[(row["goal"], "factored")], row["auto"]
            lines.append(f"| {result['kind'].upper()} projected | {row['goal']:.0%} "
                         f"| {1e3 * dense['batch']:.2f} / {1e3 * factored['batch']:.2f} "
                         f"| {1e3 * dense['sequence']:.3f} / {1e3 * factored['sequence']:.3f} "
                         f"| {auto['batch']} / {auto['sequence']} |")
    return "\n".join(lines)


def main():
    torch.set_num_threads(1)
    data = (load_japanese_vowels("train"), load_japanese_vowels("test"))
    results = [benchmark(kind, data) for kind in ("lstm", "gru")]
    notes = (
        "Japanese Vowels (aeon's bundled copy of the UCI data: 270 training and 370 test "
        "sequences of 7 to 29 frames, 12 features, 9 speakers), features not normalised. "
        f"Training: Adam, learning rate {TRAIN['lr']} with a cosine decay, {TRAIN['epochs']} "
        f"epochs, batches of {TRAIN['batch_size']} packed sequences, gradient norm clipped at "
        f"{TRAIN['clip']}, seed {TRAIN['seed']}. Classification from the last hidden state "
        "(MATLAB's OutputMode=\"last\"). NeuronPCA on the 270 training sequences in 10 packed "
        "batches. Fine-tuning: the same loop, learning rate "
        f"{FINE_TUNE['lr']}, {FINE_TUNE['epochs']} epochs, all parameters (projectors "
        "included). Accuracy changes are in points against the original network. Latency: "
        "one torch thread, inference under `torch.no_grad()`, median of "
        f"{LATENCY_REPEATS['batch']} (whole test set) and {LATENCY_REPEATS['sequence']} "
        "(one sequence of median length, unbatched) calls after a warm-up, all networks and "
        "paths of one kind taking turns; *auto picks* is the path `execution=\"auto\"` takes "
        "there. Explained variance goals: *calibration / test* is measured here on all 270 "
        f"training ({sum(map(len, data[0][0])):,} steps) and all 370 test sequences; rankwise "
        f"measures it on the first {RESERVOIR_STEPS:,} calibration steps it keeps (its reservoir).")
    tables = ([accuracy_table(r) for r in results] + [variance_goal_table(r) for r in results]
              + ["### CPU latency", latency_table(results)])
    body = "\n\n".join([notes, *tables])
    write_result(RESULT, "Projected LSTM and GRU on Japanese Vowels", body)


if __name__ == "__main__":
    main()
