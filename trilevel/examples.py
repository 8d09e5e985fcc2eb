"""Tri-Level's example level (online example filtering) as plain, testable logic: no DataLoader, no process group.

Training starts on a random 80 % of the dataset; the other 20 % is the pool. Every presentation of an example
records whether the model classified it correctly (the argmax of the logits against the example's own label, also
under mixup/cutmix, as the authors' engine does). Every ``interval`` epochs (at most ``max_swaps`` times) the
examples presented since the last swap are sorted by forgetting events (1 -> 0 transitions among their first
``npresentations`` presentations; never correct there = ``npresentations``), ascending; the slice
``[keep_lowest_n, keep_lowest_n + remove_n)`` of that order leaves the training subset; as many are drawn back
from a shuffle of the pool (before the removed ones join it); the statistics start again.

Only what those decisions use is stored, per dataset index: the correctness of the first ``npresentations``
presentations as bits, the number of presentations, the order of first presentation (the tie order of the sort)
and, for the ``cls_var`` tie-break, the sum of the CLS-attention variances. In a checkpoint that is at most 16 bytes
per example (24 with ``cls_var``; about 20 MB for ImageNet): its id in the subset or the pool and, if presented since
the last swap, its id, presentation count and correctness bits (int32 ids below 2**31 examples). Loss and margin
never affect a decision (the authors record them but do not use them);
``keep_history`` keeps every presentation's values in memory for inspection, outside checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .schedule import TriLevelConfigError, check_count

TIE_BREAKS = ("none", "cls_var")


@dataclass(frozen=True)
class ExampleLevel:
    """Settings of the example level (defaults: the authors' ImageNet run; the README uses ``remove_n`` 64058)."""

    remove_n: int = 0               # examples removed and restored at every swap (--remove-n)
    keep_lowest_n: int = 0          # start of the removed slice in the ascending order (--keep-lowest-n)
    npresentations: int = 30        # presentations since the last swap that count
    interval: int = 30              # a swap at every multiple of this epoch ...
    max_swaps: int = 5              # ... at most this many times
    initial_removal: float = 0.2    # fraction of the dataset in the pool before training
    tie_break: str = "none"         # none: order of first presentation; cls_var: mean CLS-attention variance first
    sort_kind: str = "stable"       # numpy sort of the counts; the authors' default "quicksort" is machine-dependent

    def __post_init__(self):
        check_count(self.remove_n, "remove_n")
        check_count(self.keep_lowest_n, "keep_lowest_n")
        check_count(self.npresentations, "npresentations", 1)
        check_count(self.interval, "interval", 1)
        check_count(self.max_swaps, "max_swaps")
        if isinstance(self.initial_removal, bool) or not isinstance(self.initial_removal, (int, float)) \
                or not 0.0 <= self.initial_removal < 1.0:
            raise TriLevelConfigError(f"trilevel.initial_removal {self.initial_removal} must lie in [0, 1)")
        if self.tie_break not in TIE_BREAKS:
            raise TriLevelConfigError(f"trilevel.tie_break '{self.tie_break}' is not one of {', '.join(TIE_BREAKS)}")
        if self.sort_kind not in ("stable", "quicksort", "mergesort", "heapsort"):
            raise TriLevelConfigError(f"trilevel.sort_kind '{self.sort_kind}' is not a numpy sort kind")


# ---------------------------------------------------------------------------------------------- pure pieces
def presentation_stats(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per example: correct (argmax == the example's own label, before mixup) and margin (its logit minus the
    highest other logit), as the authors' engine records them."""
    logits = logits.detach()
    correct = logits.argmax(dim=1) == labels
    own = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
    return correct, own - other


def cls_attention_variance(cls_attn: torch.Tensor) -> torch.Tensor:
    """The ``cls_var`` statistic: unbiased variance over patches of the last block's CLS attention ``[B, N]``."""
    return torch.var(cls_attn.detach().float(), dim=1)


@dataclass
class ForgettingStats:
    """Forgetting statistics of examples (rows in the order given), over their first ``npresentations`` presentations.

    ``counts``: forgetting events, ``npresentations`` if never correct; ``first_learned``: 0-based first correct
    presentation, -1 if never; ``presentations_needed``: 1-based last incorrect presentation, 0 if none;
    ``forgotten``: ``[n, npresentations]`` bool, presentation ``j`` (0-based) was a 1 -> 0 transition.
    """

    counts: np.ndarray
    first_learned: np.ndarray
    presentations_needed: np.ndarray
    forgotten: np.ndarray

    def forgetting_presentations(self, row: int) -> List[int]:
        """1-based numbers of the presentations of example ``row`` that were forgettings."""
        return (np.flatnonzero(self.forgotten[row]) + 1).tolist()


def _statistics(acc: np.ndarray, lengths: np.ndarray, npresentations: int) -> ForgettingStats:
    """:class:`ForgettingStats` from correctness ``[n, npresentations]`` bool and presentation counts ``[n]``."""
    valid = np.arange(npresentations)[None, :] < np.minimum(lengths, npresentations)[:, None]
    acc = acc & valid
    wrong = ~acc & valid
    forgotten = np.zeros_like(acc)
    forgotten[:, 1:] = acc[:, :-1] & wrong[:, 1:]
    learned = acc.any(axis=1)
    counts = np.where(learned, forgotten.sum(axis=1), npresentations).astype(np.int64)
    first = np.where(learned, acc.argmax(axis=1), -1).astype(np.int64)
    last_wrong = np.where(wrong.any(axis=1), npresentations - 1 - wrong[:, ::-1].argmax(axis=1), -1)
    return ForgettingStats(counts, first, (last_wrong + 1).astype(np.int64), forgotten)


def forgetting_statistics(histories: Sequence[Sequence[int]], npresentations: int = 30) -> ForgettingStats:
    """:class:`ForgettingStats` of per-example correctness histories (0/1 per presentation, any length)."""
    acc = np.zeros((len(histories), npresentations), dtype=bool)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for i, h in enumerate(histories):
        h = np.asarray(h, dtype=bool)[:npresentations]
        acc[i, :len(h)] = h
        lengths[i] = len(h)
    return _statistics(acc, lengths, npresentations)


def forgetting_counts(histories: Sequence[Sequence[int]], npresentations: int = 30) -> np.ndarray:
    """Forgetting count of every history (never correct among the first ``npresentations`` = ``npresentations``)."""
    return forgetting_statistics(histories, npresentations).counts


def removal_order(counts: np.ndarray, tie_values: Optional[np.ndarray] = None, sort_kind: str = "stable") -> np.ndarray:
    """Positions sorted by count ascending; ties by ``tie_values`` ascending (the ``cls_var`` variant, then stable)
    or, without them, by position (``sort_kind='stable'``) or numpy's ``sort_kind`` order."""
    counts = np.asarray(counts)
    if tie_values is None:
        return np.argsort(counts, kind=sort_kind)
    return np.lexsort((np.asarray(tie_values, dtype=np.float64), counts))


def swap_subsets(train_ids: np.ndarray, pool_ids: np.ndarray, removed: np.ndarray, remove_n: int,
                 keep_lowest_n: int, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The published swap: ``(train, pool, restored, dropped)``.

    The training ids without ``removed`` (sorted, as ``np.setdiff1d`` leaves them), then the restored ids: the pool
    is shuffled with ``RandomState(seed)`` (the same permutation as ``np.random.seed(seed); np.random.shuffle``)
    and ``[keep_lowest_n, keep_lowest_n + remove_n)`` of it comes back; its first ``keep_lowest_n`` entries
    (``dropped``) leave the pool for good. The new pool is the rest of the shuffle, then ``removed`` in order.
    """
    shuffled = np.array(pool_ids, dtype=np.int64, copy=True)
    np.random.RandomState(seed).shuffle(shuffled)
    restored = shuffled[keep_lowest_n:keep_lowest_n + remove_n]
    kept = np.sort(train_ids[~np.isin(train_ids, removed)])      # np.setdiff1d of unique ids, without its slow unique
    train = np.concatenate([kept, restored]).astype(np.int64)
    pool = np.concatenate([shuffled[keep_lowest_n + remove_n:], removed]).astype(np.int64)
    return train, pool, restored, shuffled[:keep_lowest_n]


def swap_epochs(epochs: int, interval: int = 30, max_swaps: int = 5) -> List[int]:
    """Epochs (0-based) at whose start the swap runs: every ``interval`` epochs, at most ``max_swaps`` times."""
    return [interval * (k + 1) for k in range(max_swaps) if interval * (k + 1) < epochs]


def random_split(num_examples: int, removed_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(train_ids, pool_ids)`` before training, as published: ``RandomState(seed).permutation`` (the same as
    ``np.random.seed(seed); np.random.permutation``); the last ``int(n * fraction)`` go to the pool."""
    perm = np.random.RandomState(seed).permutation(num_examples)
    cut = num_examples - int(num_examples * removed_fraction)
    return perm[:cut].astype(np.int64), perm[cut:].astype(np.int64)


@dataclass
class SwapResult:
    """What one swap did: ``removed`` (in removal order), ``restored`` (from the pool), ``dropped`` (pool entries lost
    to ``keep_lowest_n``), and the forgetting counts of the removed examples."""

    epoch: Optional[int]
    removed: np.ndarray
    restored: np.ndarray
    dropped: np.ndarray
    removed_counts: np.ndarray


# ---------------------------------------------------------------------------------------------- the selector
class ExampleSelector:
    """The training subset, the pool and the per-example statistics since the last swap, keyed by dataset index.

    ``train_ids`` is the subset in dataset order (position ``i`` of the training data is example ``train_ids[i]``).
    Call :meth:`record` after every training step with the original indices of the batch, :meth:`should_swap` /
    :meth:`swap` at the start of every epoch. Statistics are local: under DDP either record every process's batch
    on every process (gather ``(ids, correct, cls_var)`` per step and record them in rank order: every process then
    holds the same state), or move statistics with :meth:`export_stats` / :meth:`import_stats`. The authors do
    neither: each process keeps, sorts and swaps its own subset and statistics.
    """

    def __init__(self, config: ExampleLevel, train_ids: Sequence[int], pool_ids: Sequence[int],
                 num_examples: Optional[int] = None, seed: int = 0, keep_history: bool = False):
        self.config = config
        self.seed = int(seed)
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.pool_ids = np.asarray(pool_ids, dtype=np.int64)
        top = int(max(self.train_ids.max(initial=-1), self.pool_ids.max(initial=-1))) + 1
        self.capacity = int(num_examples) if num_examples is not None else top
        if top > self.capacity or (self.train_ids.min(initial=0) < 0) or (self.pool_ids.min(initial=0) < 0):
            raise TriLevelConfigError(f"trilevel: example ids must lie in 0..{self.capacity - 1}")
        self.swaps_done = 0
        self.keep_history = keep_history
        self.last_swap: Optional[SwapResult] = None
        self.reset_stats()

    @classmethod
    def from_dataset_size(cls, config: ExampleLevel, num_examples: int, seed: int = 0, **kwargs) -> "ExampleSelector":
        """Start as published: a random ``initial_removal`` of the dataset in the pool (``seed`` for both draws)."""
        train, pool = random_split(num_examples, config.initial_removal, seed)
        return cls(config, train, pool, num_examples, seed, **kwargs)

    # --- statistics --------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget every presentation (the authors clear the statistics at every swap)."""
        n = self.capacity
        self._seq = np.full(n, -1, dtype=np.int64)              # order of first presentation, -1 = not presented
        self._count = np.zeros(n, dtype=np.int32)               # presentations
        self._bits = np.zeros((n, (self.config.npresentations + 7) // 8), dtype=np.uint8)
        self._cls_sum = np.zeros(n, dtype=np.float64) if self.config.tie_break == "cls_var" else None
        self._next_seq = 0
        self.history: Optional[Dict[int, List[Tuple]]] = {} if self.keep_history else None

    def record(self, ids, correct, cls_var=None, loss=None, margin=None) -> None:
        """One step's presentations, in batch order (a repeated id is presented once per occurrence).

        ``ids``: original dataset indices; ``correct``: 0/1 (see :func:`presentation_stats`); ``cls_var``: required
        with the ``cls_var`` tie-break; ``loss`` / ``margin`` only go to the in-memory history.
        """
        ids = _numpy(ids).astype(np.int64).ravel()
        correct = _numpy(correct).astype(bool).ravel()
        if ids.shape != correct.shape:
            raise ValueError(f"trilevel: {ids.size} ids but {correct.size} correctness values")
        if ids.size and (ids.min() < 0 or ids.max() >= self.capacity):
            raise ValueError(f"trilevel: example ids must lie in 0..{self.capacity - 1}")
        if self._cls_sum is not None and cls_var is None:
            raise ValueError("trilevel: tie_break cls_var needs the CLS-attention variance of every presentation")
        # presentation number of every occurrence: earlier ones + rank among equal ids in this batch
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]] if ids.size else np.zeros(0, bool)
        first_of_group = np.maximum.accumulate(np.where(starts, np.arange(ids.size), 0))
        rank = np.empty(ids.size, dtype=np.int64)
        rank[order] = np.arange(ids.size) - first_of_group
        presentation = self._count[ids].astype(np.int64) + rank
        new = ids[(rank == 0) & (self._seq[ids] < 0)]
        self._seq[new] = self._next_seq + np.arange(new.size)
        self._next_seq += new.size
        hit = correct & (presentation < self.config.npresentations)
        np.bitwise_or.at(self._bits, (ids[hit], presentation[hit] >> 3),
                         np.left_shift(1, presentation[hit] & 7).astype(np.uint8))
        np.add.at(self._count, ids, 1)
        if self._cls_sum is not None:
            np.add.at(self._cls_sum, ids, _numpy(cls_var).astype(np.float64).ravel())
        if self.history is not None:
            cols = [correct] + [None if v is None else _numpy(v).ravel() for v in (loss, margin, cls_var)]
            for j, i in enumerate(ids.tolist()):
                self.history.setdefault(i, []).append(tuple(None if c is None else c[j].item() for c in cols))

    @property
    def num_presented(self) -> int:
        """Examples presented since the last swap."""
        return int(self._next_seq)

    def presented_ids(self) -> np.ndarray:
        """Examples presented since the last swap, in order of first presentation (the swap's candidates)."""
        seen = np.flatnonzero(self._seq >= 0)
        return seen[np.argsort(self._seq[seen])]

    def _acc(self, ids: np.ndarray) -> np.ndarray:
        bits = np.unpackbits(self._bits[ids], axis=1, bitorder="little")
        return bits[:, :self.config.npresentations].astype(bool)

    def forgetting(self) -> Tuple[np.ndarray, ForgettingStats]:
        """``(ids, stats)`` for the candidates, in order of first presentation."""
        ids = self.presented_ids()
        return ids, _statistics(self._acc(ids), self._count[ids], self.config.npresentations)

    def mean_cls_var(self, ids: np.ndarray) -> np.ndarray:
        """Mean CLS-attention variance over all presentations since the last swap (not only the counted ones)."""
        if self._cls_sum is None:
            raise ValueError("trilevel: CLS-attention variances are only kept with tie_break cls_var")
        return self._cls_sum[ids] / self._count[ids]

    def ordered(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids, counts)`` of the candidates in removal order (count ascending, ties as ``tie_break`` says)."""
        ids, stats = self.forgetting()
        ties = self.mean_cls_var(ids) if self.config.tie_break == "cls_var" else None
        order = removal_order(stats.counts, ties, self.config.sort_kind)
        return ids[order], stats.counts[order]

    # --- the swap ---------------------------------------------------------------------------------------------
    def should_swap(self, epoch: int) -> bool:
        """Whether the swap runs at the start of ``epoch`` (the ``swaps_done + 1``-th multiple of ``interval``)."""
        c = self.config
        return self.swaps_done < c.max_swaps and epoch == c.interval * (self.swaps_done + 1)

    def swap(self, epoch: Optional[int] = None) -> SwapResult:
        """Remove the least-forgotten slice, restore as many from the pool, clear the statistics.

        The pool shuffle uses ``RandomState(seed + swaps_done)``: the authors' global numpy RNG, but owned here, so
        resuming from a checkpoint repeats the same draws.
        """
        c = self.config
        ids, counts = self.ordered()
        cut = slice(c.keep_lowest_n, c.keep_lowest_n + c.remove_n)
        removed = ids[cut]
        self.train_ids, self.pool_ids, restored, dropped = swap_subsets(
            self.train_ids, self.pool_ids, removed, c.remove_n, c.keep_lowest_n, self.seed + self.swaps_done)
        self.swaps_done += 1
        self.reset_stats()
        self.last_swap = SwapResult(epoch, removed, restored, dropped, counts[cut])
        return self.last_swap

    # --- checkpoints and gathering ----------------------------------------------------------------------------
    def export_stats(self, ids: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """Statistics of the presented examples among ``ids`` (all if ``None``), in order of first presentation."""
        seen = self.presented_ids()
        if ids is not None:
            seen = seen[np.isin(seen, np.asarray(ids, dtype=np.int64))]
        out = {"ids": torch.from_numpy(self._ids(seen)),
               "presentations": torch.from_numpy(self._count[seen].copy()),
               "correct_bits": torch.from_numpy(self._bits[seen].copy())}
        if self._cls_sum is not None:
            out["cls_var_sum"] = torch.from_numpy(self._cls_sum[seen].copy())
        return out

    def import_stats(self, stats: Dict[str, torch.Tensor]) -> None:
        """Add exported statistics: new examples join in their exported order; for examples already presented here
        the incoming presentations count after the local ones (cross-process order within a window is not known)."""
        ids = stats["ids"].numpy().astype(np.int64)
        count = stats["presentations"].numpy().astype(np.int32)
        n = self.config.npresentations
        incoming = np.unpackbits(stats["correct_bits"].numpy(), axis=1, bitorder="little")[:, :n].astype(bool)
        if ids.size and (ids.min() < 0 or ids.max() >= self.capacity):
            raise ValueError(f"trilevel: imported example ids must lie in 0..{self.capacity - 1}")
        local = self._acc(ids)
        shift = np.minimum(self._count[ids], n)
        cols = np.arange(n)[None, :] - shift[:, None]
        merged = local | np.take_along_axis(incoming, np.clip(cols, 0, n - 1), axis=1) & (cols >= 0)
        self._bits[ids] = np.packbits(merged, axis=1, bitorder="little")
        new = ids[self._seq[ids] < 0]
        self._seq[new] = self._next_seq + np.arange(new.size)
        self._next_seq += new.size
        self._count[ids] += count
        if self._cls_sum is not None:
            if "cls_var_sum" not in stats:
                raise ValueError("trilevel: imported statistics have no cls_var_sum (tie_break cls_var)")
            self._cls_sum[ids] += stats["cls_var_sum"].numpy()

    def state_dict(self) -> Dict[str, object]:
        """Subsets, swap counter and the statistics since the last swap (tensors and plain data: ``weights_only``)."""
        return {"version": 1, "npresentations": self.config.npresentations, "capacity": self.capacity,
                "seed": self.seed, "swaps_done": self.swaps_done,
                "train_ids": torch.from_numpy(self._ids(self.train_ids)),
                "pool_ids": torch.from_numpy(self._ids(self.pool_ids)),
                "stats": self.export_stats()}

    def _ids(self, ids: np.ndarray) -> np.ndarray:
        """Ids as stored in checkpoints: int32 below 2**31 examples (4 bytes, not 8, per example)."""
        return ids.astype(np.int32 if self.capacity < 2 ** 31 else np.int64)

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state["npresentations"] != self.config.npresentations:
            raise TriLevelConfigError(f"trilevel.npresentations {self.config.npresentations} differs from the "
                                      f"checkpoint's {state['npresentations']}")
        self.capacity = int(state["capacity"])
        self.seed, self.swaps_done = int(state["seed"]), int(state["swaps_done"])
        self.train_ids = state["train_ids"].numpy().astype(np.int64)
        self.pool_ids = state["pool_ids"].numpy().astype(np.int64)
        self.reset_stats()
        self.import_stats(state["stats"])

    def __repr__(self) -> str:
        return (f"ExampleSelector(train={self.train_ids.size}, pool={self.pool_ids.size}, presented="
                f"{self._next_seq}, swaps_done={self.swaps_done}, {self.config})")


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
