"""Block-by-block calibration: statistics of a model that does not fit on its device beside them.

``NeuronPCA(model, data, blocks=..., device=...)`` calibrates a model kept on its home device
(usually the CPU) with one *block* at a time on the compute ``device``. A block is a submodule
called once per forward, in order: the decoder or encoder layers of a transformer, by default the
largest ``nn.ModuleList`` (or ``nn.Sequential``) of modules of one class (:func:`resolve_blocks`).

How it runs. Every calibration batch gets its own forward of the model itself, in a thread that
pauses on entering each block (a forward pre-hook waits for its turn). For block ``k = 0..K-1``:

1. the block and the statistics of the analysed layers inside it move to ``device``;
2. each paused forward in turn runs block ``k`` there (its arguments and keyword arguments moved
   to ``device``, exactly as the model passed them; its output moved back home), then the model's
   own code up to block ``k + 1``, where it pauses again;
3. the block and its finished statistics move back home (first, the rows buffered for them are
   multiplied in: :class:`~rankwise.statistics.dense.SharedInputs`; the paused forwards run in
   copies of the calibration's context, so their hooks share its buffers and input moments).

After the last block each forward runs to its end, so the layers outside the blocks (the
embeddings before block 0, anything between blocks, a head after the last one) are calibrated by
the model's own forward too, at home, with their statistics at home. Every layer therefore sees
exactly the activations of a whole-model pass, batch after batch in the same order: the moments
are those of ``NeuronPCA(model, data)``.

Memory. The compute device holds at any time one block, the statistics of the layers inside it
(``O(d^2)`` float64 per layer) and the activations of one batch through that block:
``peak_device = max_k (|block_k| + |stats_k| + |activations_k(one batch)|)``, whatever the depth.
The home device holds the model, every finished statistic, and the paused forwards' state between
two blocks (for a transformer: the hidden states, mask and position embeddings of every batch).

What does not combine: gradient statistics (``loss_fn`` needs a backward through the whole
network), a module that is both a block and called several times per forward (shared layers),
and, when ``device`` differs from home, block arguments or outputs other than tensors, tuples,
lists, dicts and plain values (a Hugging Face ``Cache``: pass ``use_cache=False``).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import threading
from dataclasses import fields, is_dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import as_batches, batch_index, default_forward, eval_mode, model_device, move_to, run_batch
from rankwise.statistics.dense import flush_rows_of
from rankwise.targets import SelectableLayers, select

AUTO = "auto"
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
               enum.Enum)
"""Values passed to and from a block that need no move between devices."""
__all__ = ["calibrate_blockwise", "check_blockwise", "resolve_blocks"]


def check_blockwise(blocks, device, loss_fn) -> None:
    """Refuse what block-by-block calibration cannot do, before anything runs."""
    if blocks is None:
        if device is not None:
            raise ValueError("device: it is the compute device of block-by-block calibration; pass "
                             "blocks='auto' (or block names) with it, or move the model with "
                             "model.to(device) for a whole-model calibration.")
        return
    if loss_fn is not None:
        raise ValueError("blocks: block-by-block calibration cannot gather the gradient statistics of "
                         "loss_fn (they need a backward pass through the whole network); pass "
                         "loss_fn=None, or blocks=None for a whole-model calibration.")
    compute_device(device)


def compute_device(device) -> torch.device | None:
    """``device`` as a ``torch.device`` with its index (``"cuda"`` is the current CUDA device)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a torch device ({error}); pass e.g. 'cuda' or "
                         "'cpu'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available on this machine; pass device='cpu' or a device "
                         "torch can reach.")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_blocks(model: nn.Module, blocks) -> dict[str, nn.Module]:
    """The blocks, by qualified name, in model order.

    Parameters
    ----------
    model : torch.nn.Module
    blocks : "auto", str or list of str
        ``"auto"``: the children of the largest ``nn.ModuleList`` or ``nn.Sequential`` (the model
        itself included) holding at least two modules, all of one class (``encoder.layer`` of a
        BERT, ``layers`` of a Llama, ``transformer.h`` of a GPT-2); the first in model order on a
        tie. Otherwise exact module names, glob patterns or ``"re:"`` regular expressions as
        :mod:`rankwise.targets` reads them (``"encoder.layer.*"``); a selected module inside
        another selected one is part of that block.

    Raises
    ------
    ValueError
        Naming ``blocks``, when ``"auto"`` finds no such list or an entry matches no module.
    """
    if blocks == AUTO:
        return _largest_stack(model)
    candidates = SelectableLayers({name: module for name, module in model.named_modules() if name},
                                  lambda module: None, "used as a block", "Modules",
                                  "blocks: the model has no submodule to use as a block.")
    selected = select(model, candidates, blocks, argument="blocks")
    return {name: module for name, module in selected.items()
            if not any(name.startswith(outer + ".") for outer in selected)}


def _largest_stack(model: nn.Module) -> dict[str, nn.Module]:
    best = {}
    for name, module in model.named_modules():
        children = list(module.named_children())
        if (isinstance(module, nn.ModuleList | nn.Sequential) and len(children) > max(len(best), 1)
                and len({type(child) for _, child in children}) == 1):
            best = {f"{name}.{child_name}" if name else child_name: child for child_name, child in children}
    if not best:
        raise ValueError("blocks: 'auto' found no nn.ModuleList or nn.Sequential of at least two modules "
                         "of one class in the model; pass the block names or a pattern "
                         "(blocks='encoder.layer.*').")
    return best


def calibrate_blockwise(model: nn.Module, data, stats: dict, handles: list, blocks, device, forward_fn=None,
                        max_batches: int | None = None, progress: str | None = None,
                        empty_message: str = "") -> int:
    """Fill ``stats`` (at home) block by block; remove ``handles``; return the batch count.

    Parameters
    ----------
    model : torch.nn.Module
        Left on its device, in its modes, with no hook, on error too.
    data, forward_fn, max_batches, progress, empty_message
        As :func:`rankwise.batches.run_batches` takes them.
    stats : dict of str to Statistics
        The statistics of the analysed layers, by qualified name, on the layers' device.
    handles : list of torch.utils.hooks.RemovableHandle
        Their hooks (``Statistics.hook``), registered; removed at the end, on error too.
    blocks : "auto", str or list of str
        See :func:`resolve_blocks`.
    device : torch.device or str, optional
        Where each block runs; the device of its parameters (it stays there) when ``None``.

    Raises
    ------
    ValueError
        Naming ``blocks`` when a block is not called exactly once per forward, in order, or takes
        or returns a value that cannot move to ``device``; naming ``data`` as
        :func:`~rankwise.batches.run_batches` does.
    """
    forwards = []
    try:
        chain = [_Block(name, module, compute_device(device), [stats[layer] for layer in stats
                                                               if layer == name or layer.startswith(name + ".")])
                 for name, module in resolve_blocks(model, blocks).items()]
        with eval_mode(model):
            handles += [handle for index, block in enumerate(chain) for handle in block.hooks(index)]
            _start(forwards, model, data, forward_fn, max_batches, [block.name for block in chain],
                   empty_message)
            for index, block in enumerate(tqdm(chain, desc=progress, disable=progress is None)):
                with block.on_device():
                    for forward in forwards:
                        forward.step_to(index + 1)
    finally:
        for forward in forwards:
            forward.abort()
        for handle in handles:
            handle.remove()
    return len(forwards)


def _start(forwards: list, model, data, forward_fn, max_batches, names: list[str], empty_message: str) -> None:
    """Append to ``forwards`` one paused forward per batch, each stopped on entering the first block."""
    home = model_device(model)
    for index, batch in enumerate(as_batches(data)):
        if max_batches is not None and index >= max_batches:
            break
        forwards.append(_Forward(model, move_to(batch, home), forward_fn or default_forward,
                                 batch_index(data, index), names))
        forwards[-1].step_to(0)
    if not forwards:
        raise ValueError(empty_message or "data: the iterable yielded no batch.")


class _Aborted(Exception):
    """Raised inside a paused forward to end it (an error elsewhere, or the pass is over)."""


class _Forward:
    """One batch's forward through the model, in its own thread, paused at each block's entrance.

    The block pre-hooks call :meth:`enter` from this thread; the calibration calls
    :meth:`step_to` from the main thread. Only one thread runs at any time.
    """

    current = threading.local()

    def __init__(self, model, batch, forward_fn, index: int, names: list[str]):
        self.index, self.names = index, names
        self.next_block = 0
        self.refusal = self.error = None
        self.done = self.aborted = False
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self._thread = threading.Thread(target=contextvars.copy_context().run,  # the hooks' shared state
                                        args=(self._run, model, batch, forward_fn), daemon=True,
                                        name=f"rankwise-blockwise-batch-{index}")
        self._thread.start()

    def _run(self, model, batch, forward_fn) -> None:
        _Forward.current.forward = self
        self._go.acquire()
        try:
            if not self.aborted:
                with torch.no_grad():
                    run_batch(model, batch, forward_fn, self.index)
        except BaseException as error:  # handed to the main thread by step_to
            self.error = error
        finally:
            self.done = True
            self._paused.release()

    def step_to(self, block: int) -> None:
        """Run until entering block ``block`` (to the end of the forward when it is the count)."""
        self._go.release()
        self._paused.acquire()
        if self.refusal is not None or (self.error is not None and not self.aborted):
            raise self.refusal or self.error
        paused_inside = block < len(self.names)
        if self.next_block != block + paused_inside or paused_inside == self.done:
            missing = self.names[min(self.next_block, len(self.names) - 1)]
            raise ValueError(f"blocks: block {missing!r} was not called in batch {self.index}'s forward; "
                             "blocks must be called exactly once per forward, in order. Choose other "
                             "blocks, or blocks=None.")

    def enter(self, block: int) -> None:
        """From a block's pre-hook: check the order, pause, and go on when :meth:`step_to` says."""
        if block != self.next_block:
            expected = self.names[self.next_block] if self.next_block < len(self.names) else "none"
            self.fail(ValueError(f"blocks: block {self.names[block]!r} was called where block {expected!r} "
                                 f"was expected in batch {self.index}'s forward; blocks "
                                 "must be called exactly once per forward, in order. Choose other blocks "
                                 "(each called once, in model order), or blocks=None."))
        self.next_block += 1
        self._paused.release()
        self._go.acquire()
        if self.aborted:
            raise _Aborted

    def fail(self, refusal: ValueError):
        """End this forward with ``refusal``, the error the calibration raises."""
        self.refusal = refusal
        raise _Aborted

    def abort(self) -> None:
        """End the thread if it still waits (the calibration is over or failed)."""
        if not self.done:
            self.aborted = True
            self._go.release()
        self._thread.join()


class _Block:
    """One block: its module, home device, the statistics inside it, and the hooks that move it."""

    def __init__(self, name: str, module: nn.Module, device, stats: list):
        self.name, self.module, self.stats = name, module, stats
        self.home = _single_device(name, module)
        self.device = device or self.home
        self.moves = self.device != self.home

    def hooks(self, index: int) -> list:
        """The pre-hook pausing each forward at this block and the hooks moving its arguments."""
        def enter(module, args, kwargs):
            forward = _Forward.current.forward
            forward.enter(index)
            return self._moved(forward, (args, kwargs), self.device, "arguments")

        def leave(module, args, output):
            return self._moved(_Forward.current.forward, output, self.home, "output")

        handles = [self.module.register_forward_pre_hook(enter, with_kwargs=True)]
        return handles + ([self.module.register_forward_hook(leave)] if self.moves else [])

    def _moved(self, forward, value, device, what: str):
        if not self.moves:
            return None
        try:
            return _moved(value, device)
        except TypeError as error:
            forward.fail(ValueError(f"blocks: the {what} of block {self.name!r} hold {error}, which cannot "
                                    f"be moved to {device}. Pass only tensors, tuples, lists and dicts "
                                    "(for a Hugging Face model, use_cache=False), or blocks=None."))

    @contextlib.contextmanager
    def on_device(self):
        """Context manager: the block and its statistics on the compute device, then home again."""
        self.move(self.device)
        try:
            yield
        finally:
            self.move(self.home)

    def move(self, device) -> None:
        if self.moves:
            flush_rows_of(self.stats)  # the rows buffered for these statistics, before they are copied
            self.module.to(device)
            for stats in self.stats:
                move_statistics(stats, device)


def _single_device(name: str, module: nn.Module) -> torch.device:
    devices = {t.device for t in [*module.parameters(), *module.buffers()]}
    if len(devices) > 1:
        raise ValueError(f"blocks: block {name!r} has tensors on several devices "
                         f"({', '.join(map(str, devices))}); put each block on one device.")
    device = devices.pop() if devices else torch.device("cpu")
    if device.type == "meta":
        raise ValueError(f"blocks: block {name!r} is on the meta device (it holds no weights); load the "
                         "model's weights (e.g. on the CPU) before calibrating it.")
    return device


def move_statistics(stats, device) -> None:
    """Move every tensor of a statistics dataclass to ``device``, in place (its hook sees them)."""
    for field in fields(stats):
        setattr(stats, field.name, _moved(getattr(stats, field.name), device))


def _moved(value, device):
    """``value`` with every tensor in it moved to ``device``; a TypeError naming any other holder."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, PLAIN_TYPES):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _moved(getattr(value, f.name), device) for f in fields(value)
                                 if f.init})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_moved(v, device) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return type(value)({k: _moved(v, device) for k, v in value.items()})
    raise TypeError(f"a {type(value).__name__}")
