"""What the width analysis finds: the widths of a network, who follows each, and the groups they form.

A *width* is the number of output channels of a producer (see :mod:`.graph`, which finds them
in the traced network). Its channels are followed by :class:`Consumer` layers (their input
columns) and :class:`ChannelMember` layers (BatchNorms, resized with it). Widths that residual
additions tie change together: :class:`WidthAnalysis` keeps them in a union-find over the
width ids the graph pass creates, and gives one :class:`WidthGroup` per set of tied widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Consumer:
    """A layer whose input columns follow a width.

    Channel ``c`` of the width is the block of input features ``(offset + c) * block``
    to ``(offset + c + 1) * block - 1`` of the consumer (input channel ``offset + c`` of a
    convolution, where ``block = 1``).
    """

    name: str
    offset: int
    block: int


@dataclass(frozen=True)
class ChannelMember:
    """A channel-wise layer (BatchNorm) whose channels ``offset .. offset + width - 1`` follow a width."""

    name: str
    offset: int


@dataclass
class WidthGroup:
    """Widths that change together: one producer, or several tied by residual additions.

    Attributes
    ----------
    name : str
        The first producer in graph order; the key of :meth:`WidthEvolver.widths`.
    width : int
        Current number of channels.
    producers : tuple of str
        Layers whose output rows are the width's channels (more than one: tied by additions).
    batchnorms : tuple of ChannelMember
        BatchNorm layers resized with the width.
    folded_batchnorms : dict
        ``{producer: batchnorm}`` for a BatchNorm applied directly (and only) to a producer's
        output; it is folded into that producer's effective weight (see :mod:`.spectrum`).
    consumers : tuple of Consumer
        Layers whose input columns are resized with the width.
    rotatable : bool
        True when only rotation-commuting operations (identity, dropout, average pooling,
        flattening, additions, scalar multiples) separate the producers from the consumers:
        any orthogonal change of basis of the channels is then function-preserving.
    frozen : tuple of str
        Why the width must be left alone; empty when it may change.
    """

    name: str
    width: int
    producers: tuple
    batchnorms: tuple
    folded_batchnorms: dict
    consumers: tuple
    rotatable: bool
    frozen: tuple

    @property
    def tied(self) -> bool:
        """More than one producer: the width is shared through residual additions."""
        return len(self.producers) > 1


@dataclass
class WidthAnalysis:
    """Union-find over the width ids created by producer calls, and what is known of each.

    The layouts of :mod:`.graph` name widths by these ids; additions tie two ids (they become
    one group), and :meth:`groups` gives the groups found.
    """

    producer_of: list = field(default_factory=list)     # id -> producer name
    channels: list = field(default_factory=list)        # id -> width
    parent: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)         # id -> [why frozen]
    unit_wise: set = field(default_factory=set)         # ids seen by a non-rotatable operation
    batchnorms: list = field(default_factory=list)      # (id, ChannelMember)
    consumers: list = field(default_factory=list)       # (id, Consumer)
    folded: dict = field(default_factory=dict)          # producer name -> batchnorm name

    def new_width(self, producer: str, channels: int) -> int:
        self.producer_of.append(producer)
        self.channels.append(channels)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def root(self, width_id: int) -> int:
        while self.parent[width_id] != width_id:
            self.parent[width_id] = self.parent[self.parent[width_id]]
            width_id = self.parent[width_id]
        return width_id

    def tie(self, first: int, second: int) -> None:
        a, b = sorted((self.root(first), self.root(second)))
        self.parent[b] = a

    def freeze(self, layout, reason: str) -> None:
        """Record ``reason`` against every width of ``layout`` (a :class:`.graph.Layout`, or ``None``)."""
        for width_id, _ in (layout.segments if layout else ()):
            if width_id is not None:
                self.reasons.setdefault(width_id, []).append(reason)

    def mark_unit_wise(self, layout) -> None:
        """Record that an operation that does not commute with rotations saw ``layout``'s widths."""
        self.unit_wise.update(w for w, _ in layout.segments if w is not None)




    def groups(self) -> list:
        """The :class:`WidthGroup` of every set of tied widths, in the order of their first producer."""
        members: dict = {}
        for width_id in range(len(self.parent)):
            members.setdefault(self.root(width_id), []).append(width_id)
        return [_group(self, ids) for ids in members.values()]


def _group(analysis: WidthAnalysis, ids: list) -> WidthGroup:
    id_set = set(ids)
    producers = tuple(analysis.producer_of[i] for i in ids)
    reasons = [f"{analysis.producer_of[i]}: {why}" for i in ids for why in analysis.reasons.get(i, ())]
    return WidthGroup(
        name=producers[0],
        width=analysis.channels[ids[0]],
        producers=producers,
        batchnorms=tuple(m for i, m in analysis.batchnorms if i in id_set),
        folded_batchnorms={p: analysis.folded[p] for p in producers if p in analysis.folded},
        consumers=tuple(c for i, c in analysis.consumers if i in id_set),
        rotatable=not (id_set & analysis.unit_wise),
        frozen=tuple(dict.fromkeys(reasons)),
    )
