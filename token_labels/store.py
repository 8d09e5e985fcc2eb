"""The packed store of token labels: dense top-k teacher maps on disk (format and layout in :mod:`token_labels`),
written resumably by :class:`LabelStoreWriter`, read by :class:`LabelStore`, and converted from the published
per-image ``.pt`` files by :func:`convert_pt_labels`."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from datasets import DatasetError
from files import first_line

FORMAT = "toe-token-labels"
VERSION = 1
INDEX_FILE, SCORES_FILE, INDICES_FILE, DONE_FILE = "index.json", "scores.npy", "indices.npy", "done.npy"


class TokenLabelError(DatasetError):
    """A token-label data mistake; ``str(err)`` is one line naming the image or the store and the fix. A data error
    of the run like any other (its exit code and one-line report)."""


def image_key(path: str, root: str) -> str:
    """The store key of an image: its path relative to the ImageFolder root, with ``/`` separators."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def check_label(scores: np.ndarray, indices: np.ndarray, shape: Tuple[int, int, int], num_classes: int,
                name: str) -> None:
    """Stop with a message naming ``name`` when a label map has the wrong shape or a class index out of range."""
    for what, arr in (("scores", scores), ("indices", indices)):
        if tuple(arr.shape) != tuple(shape):
            raise TokenLabelError(f"token label of image '{name}': {what} have shape {list(arr.shape)}, expected "
                                  f"[k, H, W] = {list(shape)}")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_classes:
            bad = hi if hi >= num_classes else lo
            raise TokenLabelError(f"token label of image '{name}': class index {bad} is outside 0..{num_classes - 1} "
                                  f"(the labels were made for a different class list or are corrupt)")


# ============================================================================================ packed label store
def _read_index(root: str) -> Dict[str, Any]:
    path = os.path.join(root, INDEX_FILE)
    if not os.path.isfile(path):
        raise TokenLabelError(f"no token-label store at {root} ({INDEX_FILE} missing); create one with "
                              "scripts/generate_token_labels.py (or its --convert-pt mode)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise TokenLabelError(f"{path} is not a {FORMAT} v{VERSION} index")
    return index


def _write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class LabelStoreWriter:
    """Create a store for ``paths`` (row order), or resume the one already at ``root``.

    Rows are written in any order; a row counts as done only after its data were flushed, so an interrupted run
    resumes with :meth:`pending` rows and never trusts a half-written one. Resuming a store made for other images or
    another shape stops with an error instead of mixing two label sets.
    """

    def __init__(self, root: str, paths: Sequence[str], k: int, height: int, width: int, num_classes: int,
                 meta: Optional[Dict[str, Any]] = None):
        self.root = root
        self.paths = list(paths)
        self.k, self.height, self.width, self.num_classes = int(k), int(height), int(width), int(num_classes)
        shape = (len(self.paths), self.k, self.height, self.width)
        if os.path.isfile(os.path.join(root, INDEX_FILE)):
            index = _read_index(root)
            mine = dict(k=self.k, height=self.height, width=self.width, num_classes=self.num_classes)
            theirs = {key: index[key] for key in mine}
            if mine != theirs:
                raise TokenLabelError(f"token-label store {root} holds {theirs}, not {mine}: delete it or write to "
                                      "another directory")
            if index["paths"] != self.paths:
                raise TokenLabelError(f"token-label store {root} was made for a different image list "
                                      f"({index['num_images']} images, now {len(self.paths)}): delete it or write "
                                      "to another directory")
            mode = "r+"
        else:
            os.makedirs(root, exist_ok=True)
            mode = "w+"
        open_mm = np.lib.format.open_memmap
        join = os.path.join
        kw = {} if mode == "r+" else {"shape": shape}
        self.scores = open_mm(join(root, SCORES_FILE), mode=mode, dtype=np.float16, **kw)
        self.indices = open_mm(join(root, INDICES_FILE), mode=mode, dtype=index_dtype(self.num_classes), **kw)
        self.done = open_mm(join(root, DONE_FILE), mode=mode, dtype=np.bool_,
                            **({} if mode == "r+" else {"shape": (len(self.paths),)}))
        if mode == "w+":
            self.done[:] = False
            self.done.flush()
            # the index is written last: its presence means the arrays exist and can be resumed
            _write_json_atomic(join(root, INDEX_FILE), dict(
                format=FORMAT, version=VERSION, num_images=len(self.paths), k=self.k, height=self.height,
                width=self.width, num_classes=self.num_classes, score_dtype="float16",
                index_dtype=str(index_dtype(self.num_classes)), meta=meta or {}, paths=self.paths))

    @property
    def num_done(self) -> int:
        return int(self.done.sum())

    def pending(self) -> np.ndarray:
        """Rows still to write, ascending."""
        return np.flatnonzero(~np.asarray(self.done))

    def write(self, rows: Sequence[int], scores, indices) -> None:
        """Write rows ``[n]`` of scores/indices ``[n, k, H, W]`` (numpy or torch), flush, then mark them done."""
        rows = np.asarray(rows, dtype=np.int64)
        scores = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
        indices = indices.detach().cpu().numpy() if torch.is_tensor(indices) else np.asarray(indices)
        shape = (self.k, self.height, self.width)
        for i, row in enumerate(rows):
            check_label(scores[i], indices[i], shape, self.num_classes, self.paths[row])
        self.scores[rows] = scores.astype(np.float16)
        self.indices[rows] = indices.astype(self.indices.dtype)
        self.scores.flush()
        self.indices.flush()
        self.done[rows] = True
        self.done.flush()

    def close(self) -> None:
        for arr in (self.scores, self.indices, self.done):
            arr.flush()
        del self.scores, self.indices, self.done


class LabelStore:
    """Read-only view of a packed store. Arrays are memory-mapped on first use in each process (not pickled)."""

    def __init__(self, root: str):
        self.root = root
        index = _read_index(root)
        self.num_images = index["num_images"]
        self.k, self.height, self.width = index["k"], index["height"], index["width"]
        self.num_classes = index["num_classes"]
        self.meta = index.get("meta", {})
        self.paths: List[str] = index["paths"]
        self._rows = {p: i for i, p in enumerate(self.paths)}
        self._arrays: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None          # workers map the files themselves instead of receiving a copy
        return state

    def __len__(self) -> int:
        return self.num_images

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.k, self.height, self.width

    def arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            load = lambda name: np.load(os.path.join(self.root, name), mmap_mode="r")  # noqa: E731
            self._arrays = (load(SCORES_FILE), load(INDICES_FILE), load(DONE_FILE))
        return self._arrays

    @property
    def num_done(self) -> int:
        return int(self.arrays()[2].sum())

    def rows_for(self, keys: Sequence[str]) -> np.ndarray:
        """Row of every key; stops naming the first image without a (completely written) label, and how many lack one."""
        rows = np.array([self._rows.get(k, -1) for k in keys], dtype=np.int64)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            raise TokenLabelError(
                f"no token label for image '{keys[missing[0]]}' in {self.root} ({missing.size} of {len(keys)} images "
                "have none): generate labels for this dataset with scripts/generate_token_labels.py")
        done = self.arrays()[2]
        unfinished = np.flatnonzero(~np.asarray(done[rows]))
        if unfinished.size:
            raise TokenLabelError(
                f"token label of image '{keys[unfinished[0]]}' was never written ({unfinished.size} of {len(keys)} "
                f"images unfinished; {self.num_done}/{self.num_images} rows done in {self.root}): re-run "
                "scripts/generate_token_labels.py to finish")
        return rows

    def read(self, row: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores float16 [k, H, W], indices [k, H, W])`` of one row, copied out of the map."""
        scores, indices, _ = self.arrays()
        return np.array(scores[row]), np.array(indices[row])

    def get(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        return self.read(int(self.rows_for([key])[0]))


# ============================================================================================ published .pt layout
def pt_label_path(label_root: str, key: str) -> str:
    """``<label_root>/<class_dir>/<stem>.pt`` for image key ``<class_dir>/<file>``; the published generator cut the
    file name at its first dot, which we try first, then the usual extension-less stem."""
    class_dir, name = os.path.split(key)
    first = os.path.join(label_root, class_dir, name.split(".")[0] + ".pt")
    if os.path.isfile(first):
        return first
    return os.path.join(label_root, class_dir, os.path.splitext(name)[0] + ".pt")


def read_pt_label(path: str, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read one published label file (a ``[2, k, H, W]`` tensor: scores, then class indices stored as floats)."""
    if not os.path.isfile(path):
        raise TokenLabelError(f"no token label for image '{name}': {path} does not exist")
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file names itself
        raise TokenLabelError(f"cannot read token label {path} of image '{name}': {first_line(e)}") from None
    if not torch.is_tensor(t) or t.ndim != 4 or t.shape[0] != 2:
        shape = list(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise TokenLabelError(f"token label {path} of image '{name}' has shape {shape}, expected [2, k, H, W]")
    indices = t[1].float()
    if not torch.equal(indices, indices.round()):
        raise TokenLabelError(f"token label {path} of image '{name}': the class-index slice holds non-integers")
    return t[0].to(torch.float16).numpy(), indices.long().numpy()


def convert_pt_labels(image_keys: Sequence[str], label_root: str, out: str, num_classes: int,
                      batch_size: int = 256, progress: Optional[Callable[[int, int], None]] = None) -> LabelStoreWriter:
    """Pack ``<label_root>/<class_dir>/<stem>.pt`` files of ``image_keys`` into a store at ``out`` (resumable)."""
    if not image_keys:
        raise TokenLabelError("no images to convert")
    first_scores, _ = read_pt_label(pt_label_path(label_root, image_keys[0]), image_keys[0])
    k, h, w = first_scores.shape
    writer = LabelStoreWriter(out, image_keys, k, h, w, num_classes, meta=dict(source="pt", label_root=label_root))
    pending = writer.pending()
    total, done = len(image_keys), writer.num_done
    for start in range(0, len(pending), batch_size):
        rows = pending[start:start + batch_size]
        pairs = [read_pt_label(pt_label_path(label_root, image_keys[r]), image_keys[r]) for r in rows]
        for r, (s, i) in zip(rows, pairs):
            check_label(s, i, (k, h, w), num_classes, image_keys[r])
        writer.write(rows, np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
        done += len(rows)
        if progress is not None:
            progress(done, total)
    return writer


