"""Recovery of MobileNetV2 compressed by 30% (issue 23): agreement with the original on held-apart photos.

bench/pretrained.py's MobileNetV2 (torchvision architecture, packaged ImageNet weights) and photo
crops: calibration crops of 4 photos (256 crops, 8 batches of 32), validation crops of 5 other
photos (80), test crops of 7 more (168). Compressed with the defaults
(``rw.compress_network_using_projection(model, calibration, learnables_reduction_goal=0.3)``),
then recovered on the calibration crops with ``rw.recover`` (``validation=`` the validation
photos' crops, ``score_fn="kl"``: the batches are unlabelled tensors, so the library cannot tell
that the outputs are logits; the result is kept only if the KL to the original there falls):
``logits`` at the default relative lr 1e-2 and at 1e-3, 2 epochs; ``lora`` (sequential, 1 epoch
per phase). Reported: top-1
agreement with the original on the test photos' crops, which nothing was chosen on.

    OMP_NUM_THREADS=1 python bench/recovery_mobilenet.py   # -> bench/results/recovery_mobilenet.md
"""

import copy
import time
import warnings

import torch

import pretrained as pt
import rankwise as rw
from environment import write_result


def main():
    torch.set_num_threads(1)
    network = pt.mobilenet_network(quick=False)
    model, calibration = network.model, network.calibration
    validation = network.splits["validation"]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, info = rw.compress_network_using_projection(model, calibration, learnables_reduction_goal=0.3,
                                                                verbosity="off")
    rows = [("none", network.evaluate(compressed, "test"), "", time.perf_counter() - start)]
    print(rows[-1], flush=True)
    for method, epochs, lr in (("logits", 2, None), ("logits", 2, 1e-3), ("lora", 1, None)):
        healed = copy.deepcopy(compressed)
        start = time.perf_counter()
        record = rw.recover(healed, model, calibration, method=method, epochs=epochs, validation=validation,
                            lr=lr, score_fn="kl")
        print(record, flush=True)
        note = (f"{epochs} epochs, lr {lr or 'default'}; val KL {record.validation_before:.4f} -> {record.validation_after:.4f} "
                f"({'kept' if record.kept else 'not kept'}); batchnorm={record.batchnorm} ({record.batchnorm_reason})")
        rows.append((method, network.evaluate(healed, "test"), note, time.perf_counter() - start))
        print(rows[-1], flush=True)
    lost = 1.0 - rows[0][1]
    lines = [f"{info.learnables_reduction:.1%} of {rw.count_learnables(model):,} learnables removed (defaults); "
             f"{len(calibration)} calibration batches, {len(validation)} validation batches (other photos), "
             f"test: {sum(len(b) for b in network.splits['test'])} crops of 7 more photos; 1 torch thread.", "",
             "| recovery | test agreement | share of the lost agreement recovered | s | notes |", "|---|---:|---:|---:|---|"]
    lines += [f"| {m} | {a:.3f} | {(a - rows[0][1]) / lost if lost else 0:+.0%} | {s:.0f} | {n} |" for m, a, n, s in rows]
    best = max(a for _, a, *_ in rows[1:])
    lines += ["", f"Target (issue 23): at least half of the lost agreement recovered: best {best:.3f} from "
              f"{rows[0][1]:.3f} = {(best - rows[0][1]) / lost if lost else 0:.0%} of {lost:.3f} lost: "
              f"**{'reached' if lost and (best - rows[0][1]) / lost >= 0.5 else 'NOT reached'}**"]
    write_result("bench/results/recovery_mobilenet.md", "Recovery after compression: MobileNetV2 at 30%",
                 "\n".join(lines))


if __name__ == "__main__":
    main()
