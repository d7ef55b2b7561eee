"""ABX phone discriminability, by the definition of libri-light's ``eval/eval_ABX.py``.

Source: github.com/facebookresearch/libri-light, ``eval/eval_ABX.py`` (function ``ABX``) and
``eval/ABX_src/`` (``abx_iterators.py``, ``abx_group_computation.py``, ``dtw.pyx``). Each rule,
where it is taken from:

* Item file: ``abx_iterators.load_item_file``: one header line, then 7 columns
  ``file onset offset phone prev next speaker``; the context is the pair (prev, next).
* Frames of a segment: ``ABXFeatureLoader.loadFromFileData``, with ``stepFeature = 1 /
  feature_size`` (``eval_ABX.main``): ``start = max(0, ceil(onset/step - 0.5))``, ``end =
  min(n_frames, floor(offset/step - 0.5))`` (end exclusive), computed with the same float
  operations. Frame i stands at (i + 1/2) x step; the start rule keeps the frames with
  (i + 1/2) x step >= onset, but the end rule only those with (i + 3/2) x step <= offset, so a
  frame whose centre lies in the segment's last step is left out (libri-light's rule). A segment
  with ``end <= start`` (no frame) is dropped before the groups are formed, as there
  (``continue``), and takes part in no triple.
* Frame distance: ``normalize_with_singularity`` (``ABX`` always normalises), then
  ``abx_group_computation.get_cosine_distance_batch``: ``acos(clamp(<x, y>, -1, 1)) / pi``. An
  all-zero frame is at distance 1 from any other frame and 0 from another all-zero frame.
* DTW: ``dtw.pyx``, ``_dtw(normalized=True)``: cost[i,j] = d[i,j] + min(up, diagonal, left),
  divided by the number of cells on the path that its backtrack finds from the last cell,
  preferring the diagonal, then "left" (fewer frames of the second sequence), then "up"; so
  d(X, Y) depends on which sequence is the first (X, the rows) when steps tie. ``dtw_batch``
  and ``get_theta_group_dtw``: X is always first, except within speakers, where the
  A-X distances of a group are computed once per unordered pair (``symmetric=True``) with the
  earlier item of the group first. libri-light orders a group by the order its feature files
  come from ``os.walk`` and then by the item file; here the item file's order is used.
* Triples and a group's score: ``ABXWithinGroupIterator``, ``ABXAcrossGroupIterator`` and
  ``get_theta_group_dtw``: a group is (context, speaker of A and B, phone A, phone B) and,
  across, also X's speaker; A and X have the centre phone, B another one in the same context
  and of A's speaker; within, X is from A's speaker and X != A (A's group needs 2 items);
  across, X is from each other speaker who has A's phone in that context. The group's error
  is the mean over its triples of [d(X,A) > d(X,B)] + 1/2 [d(X,A) = d(X,B)]
  (``loc_dtw`` returns 1 - theta).
* Averages: ``eval_ABX.ABX``: per (speaker, phone A, phone B) the mean over contexts
  (within) or over (context, X's speaker) pairs together (across); then the mean over the
  speakers that have the phone pair; then the mean over the ordered phone pairs.
  Reported in percent (x 100).

Deliberate differences: nothing is subsampled (libri-light draws at most ``max_size_group``
items per group and ``max_x_across`` X speakers with ``random``; here every item and every X
speaker are used, as with both limits infinite), so the result is deterministic. Distances,
DTW and averages are in float64 (libri-light: float32). An item whose file has no features,
or whose segment ends beyond the features, is an error here (libri-light silently skips or
truncates it). With no triple at all a score is NaN, as libri-light's 0 / 0.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

HEADER = ("#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker")

SLACK_STEPS = 2.5
"""How far (in frame steps) a segment may end beyond the last frame: features stop short of
the audio's end by up to 2.5 steps for Kaldi filterbanks (25 ms window, 10 ms step) and 1.25
for wav2vec 2.0 (400-sample receptive field, 320-sample step), so a phone that ends with the
audio still passes, while features of another file or another frame step do not."""

_CELLS = 1 << 22
"""Elements of a DTW chunk's tables (float64), which bounds the memory of a chunk."""


class ItemFileError(ValueError):
    """An item file or an item that cannot be scored; the message names the file and line."""


@dataclass(frozen=True)
class Item:
    """One line of an item file: a phone segment (seconds) of ``file`` in a context."""

    file: str
    onset: float
    offset: float
    phone: str
    prev: str
    next: str
    speaker: str
    line: int = field(default=0, compare=False)


def _where(item_file: str, item: Item, index: int) -> str:
    return f"{item_file}:{item.line}" if item.line else f"{item_file}: item {index}"


def read_items(path: str) -> List[Item]:
    """Read a ZeroSpeech / libri-light item file, raising one :class:`ItemFileError` at the first bad line."""
    items: List[Item] = []
    with open(path, encoding="utf-8-sig") as lines:
        header = next(lines, "")
        if tuple(header.split()) != HEADER:
            raise ItemFileError(f"{path}:1: expected the header {' '.join(HEADER)!r}, got {header.strip()!r}")
        for number, text in enumerate(lines, start=2):
            columns = text.split()
            if not columns:  # a blank line, e.g. a trailing one, holds no item
                continue
            if len(columns) != len(HEADER):
                raise ItemFileError(f"{path}:{number}: expected {len(HEADER)} columns "
                                    f"({' '.join(HEADER)}), got {len(columns)}")
            try:
                onset, offset = float(columns[1]), float(columns[2])
            except ValueError:
                raise ItemFileError(f"{path}:{number}: onset and offset must be numbers (seconds), "
                                    f"got {columns[1]!r} and {columns[2]!r}") from None
            if not (math.isfinite(onset) and math.isfinite(offset)):
                raise ItemFileError(f"{path}:{number}: onset and offset must be finite, got {onset} and {offset}")
            if onset < 0:
                raise ItemFileError(f"{path}:{number}: negative onset {onset}")
            if onset >= offset:
                raise ItemFileError(f"{path}:{number}: onset {onset} is not before offset {offset}")
            file, _, _, phone, prev, nxt, speaker = columns
            items.append(Item(file, onset, offset, phone, prev, nxt, speaker, line=number))
    return items


def segment_frames(onset: float, offset: float, frame_step: float, n_frames: int) -> Tuple[int, int]:
    """libri-light's frames of a segment: (start, end), end exclusive; no frame when end <= start."""
    per_second = 1 / frame_step  # libri-light's stepFeature, kept for identical rounding
    start = max(0, int(math.ceil(per_second * onset - 0.5)))
    end = min(n_frames, int(math.floor(per_second * offset - 0.5)))
    return start, end


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """libri-light's ``normalize_with_singularity``: unit frames plus one coordinate that puts
    all-zero frames at the largest distance from the others."""
    frames, dim = x.shape
    norm2 = (x ** 2).sum(dim=1, keepdim=True)
    zero = norm2[:, 0] == 0
    x = x / torch.sqrt(torch.where(zero[:, None], torch.ones_like(norm2), norm2))
    x[zero] = 1 / math.sqrt(dim)
    border = torch.full((frames, 1), 1e-12, dtype=x.dtype)
    border[zero] = -2 * 1e12
    return torch.cat([x, border], dim=1)


def _dtw_chunk(d: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DTW of P pairs at once, over anti-diagonals; d is (P, N, M) with pair p's cells in its
    first n[p] x m[p]. Returns the total cost and the path lengths of libri-light's backtrack
    with the rows' sequence first and with the columns' sequence first.

    The backtrack's choice at a cell depends only on the costs of its three predecessors, so the
    path length is carried forward (1 + the chosen predecessor's), which needs no backtrack."""
    count, rows, cols = d.shape
    diagonals = rows + cols - 1
    k = torch.arange(diagonals)[:, None]
    j = torch.arange(cols)[None, :]
    i = k - j
    outside = (i < 0) | (i >= rows)
    # skewed[k, j, p] = d[p, k - j, j]: a diagonal is then one contiguous (M, P) slab
    skewed = d.permute(1, 2, 0)[i.clamp(0, rows - 1), j.expand(diagonals, cols)]
    skewed.masked_fill_(outside[:, :, None], math.inf)

    # buffers hold a diagonal's columns at 1..M and +inf at 0, the cell left of column 0
    def buffer(fill: float) -> torch.Tensor:
        return torch.full((cols + 1, count), fill, dtype=d.dtype)

    cost2, cost1 = buffer(math.inf), buffer(math.inf)
    cost1[1:] = skewed[0]
    first2, first1 = buffer(1.0), buffer(1.0)  # path lengths, rows' sequence first
    second2, second1 = buffer(1.0), buffer(1.0)  # path lengths, columns' sequence first
    end = n + m - 2
    total = torch.empty(count, dtype=d.dtype)
    len_first = torch.empty(count, dtype=d.dtype)
    len_second = torch.empty(count, dtype=d.dtype)
    order = torch.argsort(end, stable=True)
    bounds = torch.searchsorted(end[order], torch.arange(diagonals + 1)).tolist()

    def harvest(diagonal: int, cost: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
        done = order[bounds[diagonal]:bounds[diagonal + 1]]
        if len(done):
            total[done] = cost[m[done], done]
            len_first[done] = first[m[done], done]
            len_second[done] = second[m[done], done]

    harvest(0, cost1, first1, second1)
    for diagonal in range(1, diagonals):
        up, left, diag = cost1[1:], cost1[:-1], cost2[:-1]
        take_diag = (diag <= left) & (diag <= up)
        left_first = left <= up  # dtw.pyx: "elif c_left <= c_up: j -= 1"
        up_first = up <= left  # the same rule with the two sequences swapped
        cost = buffer(math.inf)
        torch.add(skewed[diagonal], torch.minimum(torch.minimum(up, left), diag), out=cost[1:])
        first = buffer(1.0)
        first[1:] = 1 + torch.where(take_diag, first2[:-1], torch.where(left_first, first1[:-1], first1[1:]))
        second = buffer(1.0)
        second[1:] = 1 + torch.where(take_diag, second2[:-1], torch.where(up_first, second1[1:], second1[:-1]))
        harvest(diagonal, cost, first, second)
        cost2, cost1, first2, first1, second2, second1 = cost1, cost, first1, first, second1, second
    return total, len_first, len_second


def _pair_distances(frames: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                    u: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised DTW distances of segment pairs: (d(u first, v), d(v first, u))."""
    n_u, n_v = lengths[u], lengths[v]
    swap = n_u < n_v  # the longer one is the rows, so that the vectorised dimension is the shorter
    r, c = torch.where(swap, v, u), torch.where(swap, u, v)
    n, m = lengths[r], lengths[c]
    order = torch.argsort(n * (int(m.max()) + 1) + m, stable=True)
    with_r = torch.empty(len(u), dtype=torch.float64)
    with_c = torch.empty(len(u), dtype=torch.float64)
    dim = frames.shape[1]
    n_sorted = n[order]
    values, starts = torch.unique_consecutive(n_sorted, return_counts=True)
    position = 0
    for rows, size in zip(values.tolist(), starts.tolist()):
        per_chunk = max(1, _CELLS // (2 * rows * (rows + 1)))
        for at in range(position, position + size, per_chunk):
            chunk = order[at:min(at + per_chunk, position + size)]
            cr, cc, cm = r[chunk], c[chunk], m[chunk]
            cols = int(cm.max())
            d = torch.empty((len(chunk), rows, cols), dtype=torch.float64)
            per_product = max(1, _CELLS // ((rows + cols) * dim))
            for lo in range(0, len(chunk), per_product):
                hi = min(lo + per_product, len(chunk))
                row_index = offsets[cr[lo:hi], None] + torch.arange(rows)
                col_index = offsets[cc[lo:hi], None] + torch.minimum(torch.arange(cols), cm[lo:hi, None] - 1)
                dot = torch.bmm(frames[row_index], frames[col_index].transpose(1, 2))
                d[lo:hi] = dot.clamp_(-1, 1).acos_().div_(math.pi)
            total, len_first, len_second = _dtw_chunk(d, lengths[cr], cm)
            with_r[chunk], with_c[chunk] = total / len_first, total / len_second
        position += size
    return torch.where(swap, with_c, with_r), torch.where(swap, with_r, with_c)


def _error(dxa: np.ndarray, dxb: np.ndarray, b_starts: np.ndarray, within: bool) -> np.ndarray:
    """Error of each B group (columns of dxb from b_starts on): 1 - theta of get_theta_group_dtw,
    theta being the share of (X, A, B) triples with A closer to X than B, ties counting 1/2;
    within, the triples with X = A are left out."""
    x_count, a_count = dxa.shape
    if within:
        dxa = dxa.copy()
        np.fill_diagonal(dxa, np.inf)  # neither closer nor equal, and out of the count, as there
    closer = (dxa[:, :, None] < dxb[:, None, :]).sum(axis=(0, 1))
    ties = (dxa[:, :, None] == dxb[:, None, :]).sum(axis=(0, 1))
    per_b = np.add.reduceat(closer + 0.5 * ties, b_starts)
    b_sizes = np.diff(np.append(b_starts, dxb.shape[1]))
    triples = (a_count * (a_count - 1) if within else a_count * x_count) * b_sizes
    return 1 - per_b / triples


def _average(groups: Mapping[Tuple[str, str, str], List[float]]) -> float:
    """eval_ABX.ABX's order: over each group's contexts, then over speakers, then phone pairs."""
    by_phones: Dict[Tuple[str, str], List[float]] = defaultdict(list)
    for (speaker, phone_a, phone_b), errors in groups.items():
        by_phones[(phone_a, phone_b)].append(math.fsum(errors) / len(errors))
    if not by_phones:
        return math.nan
    return 100 * math.fsum(math.fsum(v) / len(v) for v in by_phones.values()) / len(by_phones)


def abx(features: Mapping[str, torch.Tensor], items: Sequence[Item], frame_step: float,
        item_file: str = "items") -> dict:
    """ABX error rates within and across speakers, in percent: ``{"within": .., "across": ..}``,
    with the number of (phone A, phone B) pairs each averages over (``within_pairs``,
    ``across_pairs``): a score over a handful of pairs says little.

    ``features[file]`` is a (frames, dim) tensor with frame i at (i + 1/2) x ``frame_step`` s;
    ``item_file`` names the items in error messages. An item whose segment gets no frame is
    dropped, as libri-light drops it; a score with no triple is NaN."""
    if not frame_step > 0:
        raise ValueError(f"frame_step must be positive seconds, got {frame_step}")
    segments: List[torch.Tensor] = []
    kept: List[Item] = []
    dim = None
    for index, item in enumerate(items):
        where = _where(item_file, item, index)
        if not 0 <= item.onset < item.offset:
            raise ItemFileError(f"{where}: onset {item.onset} and offset {item.offset} are not 0 <= onset < offset")
        if item.file not in features:
            raise ItemFileError(f"{where}: file {item.file!r} has no features")
        feats = torch.as_tensor(features[item.file])
        if feats.dim() != 2 or (dim is not None and feats.shape[1] != dim):
            raise ValueError(f"features of {item.file!r} must be (frames, {dim or 'dim'}), got {tuple(feats.shape)}")
        dim = feats.shape[1]
        span = feats.shape[0] * frame_step
        if item.offset > span + SLACK_STEPS * frame_step + 1e-6:
            raise ItemFileError(f"{where}: segment {item.onset}-{item.offset} s of {item.file!r} ends after its "
                                f"features ({feats.shape[0]} frames of {frame_step} s = {span:.3f} s)")
        start, end = segment_frames(item.onset, item.offset, frame_step, feats.shape[0])
        if end <= start:
            continue
        segment = feats[start:end].detach().to("cpu", torch.float64)
        if not torch.isfinite(segment).all():
            raise ValueError(f"features of {item.file!r} are not finite in the segment of {where}")
        segments.append(segment)
        kept.append(item)
    if not kept:
        return {"within": math.nan, "across": math.nan, "within_pairs": 0, "across_pairs": 0}

    frames = _normalise(torch.cat(segments))
    lengths = torch.tensor([len(s) for s in segments])
    offsets = torch.cumsum(lengths, 0) - lengths

    # context -> speaker -> phone -> item indices, in item order (dicts keep first appearance)
    cells: Dict[Tuple[str, str], Dict[str, Dict[str, List[int]]]] = \
        defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for index, item in enumerate(kept):
        cells[(item.prev, item.next)][item.speaker][item.phone].append(index)

    # Items of a context that take part in a triple: A and B from a speaker with 2 phones or
    # more there, X also from any speaker with A's phone there.
    members: Dict[Tuple[str, str], List[int]] = {}
    for context, speakers in cells.items():
        chosen = set()
        for speaker, by_phone in speakers.items():
            for phone, indices in by_phone.items():
                as_x = any(s != speaker and phone in b and len(b) > 1 for s, b in speakers.items())
                if len(by_phone) > 1 or as_x:
                    chosen.update(indices)
        if len(chosen) > 1:
            members[context] = sorted(chosen)

    # every unordered pair of a context's members, its DTW in both orders
    local: Dict[int, int] = {}
    bases, pair_u, pair_v, pair_flat_uv, pair_flat_vu = {}, [], [], [], []
    base = 0
    for context, indices in members.items():
        size = len(indices)
        for position, index in enumerate(indices):
            local[index] = position
        a, b = np.triu_indices(size, 1)
        indices_np = np.asarray(indices)
        pair_u.append(indices_np[a])
        pair_v.append(indices_np[b])
        pair_flat_uv.append(base + a * size + b)
        pair_flat_vu.append(base + b * size + a)
        bases[context] = base
        base += size * size
    table = np.full(base, np.nan)
    if pair_u:
        u, v = torch.from_numpy(np.concatenate(pair_u)), torch.from_numpy(np.concatenate(pair_v))
        d_uv, d_vu = _pair_distances(frames, offsets, lengths, u, v)
        table[np.concatenate(pair_flat_uv)] = d_uv.numpy()
        table[np.concatenate(pair_flat_vu)] = d_vu.numpy()

    within: Dict[Tuple[str, str, str], List[float]] = defaultdict(list)
    across: Dict[Tuple[str, str, str], List[float]] = defaultdict(list)
    for context, speakers in cells.items():
        if context not in members:
            continue
        size = len(members[context])
        dist = table[bases[context]:bases[context] + size * size].reshape(size, size)  # dist[x, y]: x first
        for speaker, by_phone in speakers.items():
            if len(by_phone) < 2:
                continue
            for phone_a, a_items in by_phone.items():
                a_local = np.array([local[i] for i in a_items])
                b_phones = [p for p in by_phone if p != phone_a]
                b_lists = [[local[i] for i in by_phone[p]] for p in b_phones]
                b_local = np.concatenate(b_lists)
                b_starts = np.cumsum([0] + [len(b) for b in b_lists[:-1]])
                if len(a_local) > 1:
                    dxa = dist[np.ix_(a_local, a_local)]
                    upper = np.triu(dxa, 1)  # within, the earlier item of a pair is first (dtw_batch, symmetric)
                    errors = _error(upper + upper.T, dist[np.ix_(a_local, b_local)], b_starts, within=True)
                    for phone_b, error in zip(b_phones, errors):
                        within[(speaker, phone_a, phone_b)].append(float(error))
                for x_speaker, x_phones in speakers.items():
                    if x_speaker == speaker or phone_a not in x_phones:
                        continue
                    x_local = np.array([local[i] for i in x_phones[phone_a]])
                    errors = _error(dist[np.ix_(x_local, a_local)], dist[np.ix_(x_local, b_local)], b_starts,
                                    within=False)
                    for phone_b, error in zip(b_phones, errors):
                        across[(speaker, phone_a, phone_b)].append(float(error))
    return {"within": _average(within), "across": _average(across),
            "within_pairs": len({(a, b) for _, a, b in within}), "across_pairs": len({(a, b) for _, a, b in across})}


def abx_of_upstream(upstream, item_file: str, cache: str, layers: Optional[Sequence[int]] = None,
                    audio_root: Optional[str] = None) -> Dict[int, Dict[str, float]]:
    """ABX within and across speakers (%) of an upstream's layers (all by default; FBANK has one)
    on an item file: its clips' features come from the frozen-feature cache that the probes share
    (``eqssl.measures.features``), found through the manifest beside the item file or under
    ``audio_root``."""
    from .features import cached_features, item_audio

    items = read_items(item_file)
    audio = item_audio(item_file, audio_root)
    missing = sorted({item.file for item in items} - set(audio))
    if missing:
        first = next(item for item in items if item.file == missing[0])
        raise ItemFileError(f"{item_file}:{first.line}: no audio for {missing[0]!r} "
                            f"({len(missing)} file id(s) without audio, under {audio_root or 'its manifest'})")
    if audio_root is None:  # the manifest's clips, in its order: the cache the probes fill
        folder, split = os.path.dirname(os.path.abspath(item_file)), os.path.splitext(os.path.basename(item_file))[0]
        paths = list(audio.values())
    else:
        used = sorted({item.file for item in items})
        folder, split = audio_root, "abx-" + os.path.basename(item_file)
        paths = [audio[f] for f in used]
    features = cached_features(upstream, folder, split, cache, paths)
    by_file = dict(zip((os.path.splitext(os.path.basename(p))[0] for p in paths), features))
    count = next(iter(by_file.values())).size(0)
    scores = {}
    for layer in layers if layers is not None else range(count):
        if not 0 <= layer < count:
            raise ValueError(f"layer {layer}: {upstream.source} has layers 0-{count - 1}")
        scores[layer] = abx({f: x[layer].float() for f, x in by_file.items()}, items, upstream.frame_step, item_file)
    return scores
