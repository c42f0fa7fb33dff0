"""Block-by-block against whole-model calibration of a BERT-base-sized encoder: time and memory.

The model is ``BertModel(BertConfig())`` (12 layers, hidden 768, 110M learnables, random
weights: the cost does not depend on them), calibrated on ``BATCHES`` batches of ``SEQUENCES``
random token sequences of ``TOKENS`` tokens (no padding). Each variant runs in its own
subprocess, one torch thread, and reports its wall time and its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) above a bare process that only imported torch,
transformers and rankwise:

- ``forward``: the model and a plain forward pass of every batch (the reference);
- ``whole``: ``rw.NeuronPCA(model, data)``: everything a device calibrating the whole model
  must hold (model, every layer's statistics, one batch's activations);
- ``blockwise``: ``rw.NeuronPCA(model, data, blocks="auto", device="cpu")``. On this CPU-only
  machine the compute device is the home device, so its peak resident memory is the *host*
  side (the model, every finished statistic, the paused forwards' hidden states);
- ``one block``: what the compute device holds during one step of the block-by-block pass,
  rebuilt alone: one ``BertLayer`` of the same configuration, the statistics of its layers, and
  the hidden states of every batch at its entrance (``NeuronPCA(layer, hidden_states)``);
  measured the same way. The ``blockwise`` run also counts, per block, the bytes of its
  parameters plus those of its layers' statistics (what moves to the device), as a check.

Run from the repository root: ``python bench/blockwise_calibration.py`` (a few minutes).
Writes ``bench/results/blockwise_calibration.md``.
"""

import json
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import fields, is_dataclass

BATCHES, SEQUENCES, TOKENS = 8, 8, 32
VARIANTS = ("bare", "forward", "whole", "blockwise", "one block")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = os.path.join(HERE, "results", "blockwise_calibration.md")
MIB = 2 ** 20


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a statistics dataclass (Moments, weight Grams, lists of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list):
        return sum(map(tensor_bytes, value))
    if is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name)) for f in fields(value))
    return 0


def run_variant(variant: str) -> dict:
    import torch
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertLayer

    import rankwise as rw

    warnings.simplefilter("ignore", rw.ThinDataWarning)  # 2048 rows for a width of 3072: expected
    torch.set_num_threads(1)
    if variant == "bare":
        return {"peak_rss": peak_rss_bytes()}
    torch.manual_seed(0)
    config = BertConfig(attn_implementation="sdpa")  # what BertModel(BertConfig()) picks; a lone layer needs it said
    generator = torch.Generator().manual_seed(0)
    if variant == "one block":
        layer = BertLayer(config).eval()
        hidden = [torch.randn(SEQUENCES, TOKENS, config.hidden_size, generator=generator) for _ in range(BATCHES)]
        start = time.perf_counter()
        rw.NeuronPCA(layer, hidden, verbosity="off")
        return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes()}
    model = BertModel(config).eval()
    data = [torch.randint(0, config.vocab_size, (SEQUENCES, TOKENS), generator=generator) for _ in range(BATCHES)]
    start = time.perf_counter()
    result = {}
    if variant == "forward":
        with torch.no_grad():
            for batch in data:
                model(batch)
    elif variant == "whole":
        rw.NeuronPCA(model, data, verbosity="off")
    else:
        npca = rw.NeuronPCA(model, data, verbosity="off", blocks="auto", device="cpu")
    result.update(seconds=time.perf_counter() - start, peak_rss=peak_rss_bytes(),
                  learnables=sum(p.numel() for p in model.parameters()))
    if variant == "blockwise":  # counted after the clock and the memory peak were read
        # the statistics as calibration moved them (npca.statistics(name) would first compute the
        # derived output moments and weight Grams that only the decisions need)
        result["block_moved_bytes"] = max(
            sum(p.numel() * p.element_size() for p in model.encoder.layer[k].parameters())
            + sum(tensor_bytes(npca._stats[name]) for name in npca.layer_names
                  if name.startswith(f"encoder.layer.{k}."))
            for k in range(config.num_hidden_layers))
    return result


def measured() -> dict:
    results = {}
    path = os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")]))
    for variant in VARIANTS:  # this checkout's rankwise, whatever the virtualenv has installed
        output = subprocess.run([sys.executable, __file__, "--variant", variant], check=True,
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
        print(variant, results[variant], flush=True)
    return results


def table(results: dict) -> str:
    bare = results["bare"]["peak_rss"]
    rows = ["| variant | seconds | peak memory above a bare process (MiB) | what it is |", "|---|---:|---:|---|"]
    meaning = {"forward": "model + plain forward (reference)",
               "whole": "whole-model NeuronPCA: what one device must hold",
               "blockwise": "block-by-block NeuronPCA, compute device = CPU: the host side",
               "one block": "one block + its statistics + every batch's hidden states: the compute device"}
    for variant in VARIANTS[1:]:
        r = results[variant]
        rows.append(f"| {variant} | {r['seconds']:.1f} | {(r['peak_rss'] - bare) / MIB:.0f} | {meaning[variant]} |")
    moved = results["blockwise"]["block_moved_bytes"]
    return "\n".join(rows) + (
        f"\n\nLearnables {results['whole']['learnables']:,}; {BATCHES} batches x {SEQUENCES} sequences x "
        f"{TOKENS} tokens = {BATCHES * SEQUENCES * TOKENS} tokens; one torch thread per variant. "
        f"The largest block moved to the device, its parameters and its layers' statistics: "
        f"{moved / MIB:.0f} MiB.\n")


def main() -> None:
    if "--variant" in sys.argv:
        print(json.dumps(run_variant(sys.argv[sys.argv.index("--variant") + 1])))
        return
    sys.path.insert(0, HERE)
    from environment import write_result

    write_result(RESULT, "Block-by-block calibration of a BERT-base-sized encoder", table(measured()))


if __name__ == "__main__":
    main()
