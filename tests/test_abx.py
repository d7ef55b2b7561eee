"""ABX (eqssl.measures.abx) against libri-light's definition: exact cases, random features, a
brute-force reference written from the definition, and bad item files."""

import math
import random
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from eqssl.measures.abx import HEADER, Item, ItemFileError, abx, read_items, segment_frames

STEP = 0.01


def write_corpus(path: Path, seed: int, speakers: int, contexts: int, phones: int, max_per_cell: int,
                 min_frames: int, max_frames: int):
    """An item file of ragged cells (some phones missing from some speaker and context), each
    speaker's items laid one after the other in two audio files; returns its items and the
    length of each file in frames."""
    rng = random.Random(seed)
    cursor = defaultdict(lambda: 3)  # next free frame of each file
    lines = [" ".join(HEADER)]
    for s in range(speakers):
        for c in range(contexts):
            prev, nxt = f"p{c % 3}", f"n{c // 3}"
            for p in range(phones):
                for _ in range(rng.randint(0 if p else 1, max_per_cell)):
                    file = f"spk{s}_{rng.randint(0, 1)}"
                    frames = rng.randint(min_frames, max_frames)
                    start = cursor[file] + rng.randint(0, 2)
                    onset = (start + rng.random() * 0.9) * STEP  # jittered: `frames` frames, give or take one
                    offset = onset + (frames + 1) * STEP
                    cursor[file] = start + frames + 3
                    lines.append(f"{file} {onset:.4f} {offset:.4f} ph{p} {prev} {nxt} s{s}")
    path.write_text("\n".join(lines) + "\n")
    return read_items(str(path)), {file: end + 2 for file, end in cursor.items()}


def gaussian(lengths, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {file: torch.randn(n, dim, generator=generator) for file, n in sorted(lengths.items())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("abx") / "dev.item"
    items, lengths = write_corpus(path, seed=1, speakers=3, contexts=6, phones=4, max_per_cell=3,
                                  min_frames=3, max_frames=15)
    return path, items, lengths


def test_same_input_gives_the_same_numbers(corpus):
    _, items, lengths = corpus
    features = gaussian(lengths, 32, seed=0)
    first, second = abx(features, items, STEP), abx(features, items, STEP)
    assert first == second
    assert not math.isnan(first["within"]) and not math.isnan(first["across"])


def test_features_that_are_the_phone_score_zero(corpus):
    _, items, lengths = corpus
    features = {file: torch.zeros(n, 8) for file, n in lengths.items()}
    for item in items:
        start, end = segment_frames(item.onset, item.offset, STEP, lengths[item.file])
        features[item.file][start:end, int(item.phone[2:])] = 1.0
    scores = abx(features, items, STEP)
    assert (scores["within"], scores["across"]) == (0.0, 0.0) and scores["within_pairs"] > 0


def test_random_features_score_near_chance(corpus):
    _, items, lengths = corpus
    scores = abx(gaussian(lengths, 64, seed=2), items, STEP)
    assert scores["within"] >= 45 and scores["across"] >= 45


def test_segment_frames_follows_libri_light():
    assert segment_frames(0.1, 0.2, 0.01, 100) == (10, 19)  # ceil(10 - .5), floor(20 - .5)
    assert segment_frames(0.104, 0.216, 0.02, 100) == (5, 10)  # ceil(4.7), floor(10.3)
    assert segment_frames(0.0, 0.5, 0.01, 20) == (0, 20)  # clipped to the features
    start, end = segment_frames(0.100, 0.112, 0.01, 100)
    assert end <= start  # no frame: such an item takes part in no triple


# --- brute-force reference, plain loops, from libri-light's definition ---------------------

def ref_frames(features, item):
    frames = features[item.file]
    start = max(0, math.ceil((1 / STEP) * item.onset - 0.5))
    end = min(len(frames), math.floor((1 / STEP) * item.offset - 0.5))
    return [list(map(float, frame)) for frame in frames[start:end]]


def ref_angle(x, y):
    nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
    if nx == 0 or ny == 0:
        return 0.0 if nx == ny else 1.0  # normalize_with_singularity
    cosine = sum(a * b for a, b in zip(x, y)) / (nx * ny)
    return math.acos(max(-1.0, min(1.0, cosine))) / math.pi


def ref_dtw(x, y):
    """dtw.pyx's _dtw(normalized=True): x is the first sequence (rows)."""
    n, m = len(x), len(y)
    d = [[ref_angle(a, b) for b in y] for a in x]
    cost = [[0.0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                cost[i][j] = d[0][0]
            elif i == 0:
                cost[i][j] = d[i][j] + cost[i][j - 1]
            elif j == 0:
                cost[i][j] = d[i][j] + cost[i - 1][j]
            else:
                cost[i][j] = d[i][j] + min(cost[i - 1][j], cost[i - 1][j - 1], cost[i][j - 1])
    i, j, length = n - 1, m - 1, 1
    while i > 0 and j > 0:
        up, left, diag = cost[i - 1][j], cost[i][j - 1], cost[i - 1][j - 1]
        if diag <= left and diag <= up:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
        length += 1
    length += j if i == 0 else 0
    length += i if j == 0 else 0
    return cost[n - 1][m - 1] / length


def ref_abx(features, items):
    kept = [(k, item, ref_frames(features, item)) for k, item in enumerate(items)]
    kept = [entry for entry in kept if entry[2]]
    cache = {}

    def dist(first, second):
        if (first[0], second[0]) not in cache:
            cache[(first[0], second[0])] = ref_dtw(first[2], second[2])
        return cache[(first[0], second[0])]

    triples = {"within": defaultdict(list), "across": defaultdict(list)}
    for a in kept:
        for b in kept:
            for x in kept:
                ia, ib, ix = a[1], b[1], x[1]
                if not ((ia.prev, ia.next) == (ib.prev, ib.next) == (ix.prev, ix.next)
                        and ia.phone == ix.phone != ib.phone and ia.speaker == ib.speaker):
                    continue
                if ia.speaker == ix.speaker:
                    if x[0] == a[0]:
                        continue
                    mode, key = "within", ((ia.prev, ia.next), ia.speaker, ia.phone, ib.phone)
                    xa = dist(x, a) if x[0] < a[0] else dist(a, x)  # symmetric: earlier item first
                else:
                    mode, key = "across", ((ia.prev, ia.next), ia.speaker, ia.phone, ib.phone, ix.speaker)
                    xa = dist(x, a)
                xb = dist(x, b)
                triples[mode][key].append(1.0 if xa > xb else 0.5 if xa == xb else 0.0)
    scores = {}
    for mode, groups in triples.items():
        per_speaker = defaultdict(list)  # (speaker, phone A, phone B) -> group means
        for key, values in groups.items():
            per_speaker[key[1:4]].append(sum(values) / len(values))
        per_pair = defaultdict(list)
        for (speaker, pa, pb), values in per_speaker.items():
            per_pair[(pa, pb)].append(sum(values) / len(values))
        scores[mode] = 100 * sum(sum(v) / len(v) for v in per_pair.values()) / len(per_pair)
    return scores


@pytest.mark.parametrize("kind", ["gaussian", "ties"])
def test_agrees_with_brute_force_reference(tmp_path, kind):
    items, lengths = write_corpus(tmp_path / "small.item", seed=3, speakers=3, contexts=4, phones=3,
                                  max_per_cell=4, min_frames=1, max_frames=12)
    # an item with no frame (libri-light drops it) and one clipped to its file's end
    items.append(Item("spk0_0", 0.100, 0.112, "ph0", "p0", "n0", "s0"))
    end = lengths["spk1_0"]
    items.append(Item("spk1_0", (end - 2) * STEP, (end + 2) * STEP, "ph1", "p0", "n0", "s1"))
    if kind == "gaussian":
        features = gaussian(lengths, 6, seed=4)
    else:  # one-hot or zero frames: exact distances 0, 1/2, 1, so DTW steps and triples tie
        generator = torch.Generator().manual_seed(5)
        features = {file: torch.eye(4)[:, :3][torch.randint(0, 4, (n,), generator=generator)]
                    for file, n in sorted(lengths.items())}
    expected = ref_abx(features, items)
    got = abx(features, items, STEP)
    assert got["within"] == pytest.approx(expected["within"], abs=1e-6)
    assert got["across"] == pytest.approx(expected["across"], abs=1e-6)
    assert 0 < expected["within"] < 100 and 0 < expected["across"] < 100


# --- bad item files ----------------------------------------------------------------------

GOOD = "spk 0.10 0.30 a x y s1"


@pytest.mark.parametrize("text, line, words", [
    (f"{GOOD}\n", 1, "header"),
    (f"{' '.join(HEADER)}\n{GOOD}\nspk 0.40 0.35 a x y s1\n", 3, "not before"),
    (f"{' '.join(HEADER)}\nspk 0.40 0.50 a x y\n", 2, "columns"),
    (f"{' '.join(HEADER)}\nspk 0.40 end a x y s1\n", 2, "numbers"),
    (f"{' '.join(HEADER)}\nspk -0.1 0.50 a x y s1\n", 2, "negative"),
])
def test_bad_item_file_is_one_clear_error(tmp_path, text, line, words):
    path = tmp_path / "bad.item"
    path.write_text(text)
    with pytest.raises(ItemFileError) as error:
        read_items(str(path))
    assert f"{path}:{line}:" in str(error.value) and words in str(error.value)


@pytest.mark.parametrize("bad_line, words", [
    ("ghost 0.10 0.30 b x y s1", "'ghost' has no features"),
    ("spk 0.90 1.50 b x y s1", "ends after its features"),
])
def test_item_the_features_do_not_cover_is_one_clear_error(tmp_path, bad_line, words):
    path = tmp_path / "dev.item"
    path.write_text(f"{' '.join(HEADER)}\n{GOOD}\n{bad_line}\n")
    features = {"spk": torch.randn(100, 4)}  # 1 s of frames
    with pytest.raises(ItemFileError) as error:
        abx(features, read_items(str(path)), STEP, item_file=str(path))
    assert f"{path}:3:" in str(error.value) and words in str(error.value)
