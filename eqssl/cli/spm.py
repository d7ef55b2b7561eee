"""Train one SentencePiece vocabulary shared by several labelled sets and write fairseq labels.

    eqssl-train-spm OUT_PREFIX FOLDER [FOLDER ...] [--vocab-size 1000] [--splits train_10m,train_1h]

Trains on the ``.wrd`` transcripts of ``--splits`` in every FOLDER (the paper's multilingual
setting: 1000 units over all languages), then writes ``{split}.spm`` (space-separated pieces) for
every split that has a ``.wrd`` and ``dict.spm.txt`` (fairseq's ``<piece> <count>``) in each
folder; fine-tune with ``units=spm``. OUT_PREFIX.model/.vocab is the SentencePiece model.
"""

import argparse
import collections
import glob
import os
from typing import Dict, List, Sequence

import sentencepiece

from ..corpus.labels import write_files


def train(prefix: str, transcripts: Sequence[str], vocab_size: int) -> sentencepiece.SentencePieceProcessor:
    """A unigram SentencePiece model over ``transcripts`` (characters always covered)."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(transcripts), model_prefix=prefix, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0,
        hard_vocab_limit=False, minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def write_pieces(model: sentencepiece.SentencePieceProcessor, folder: str) -> Dict[str, int]:
    """``{split}.spm`` for every ``{split}.wrd`` of ``folder``, and its ``dict.spm.txt``."""
    counts: collections.Counter = collections.Counter()
    files = {}
    for wrd in sorted(glob.glob(os.path.join(folder, "*.wrd"))):
        lines = [" ".join(model.encode(line, out_type=str)) for line in read_lines(wrd)]
        for line in lines:
            counts.update(line.split())
        files[wrd[: -len(".wrd")] + ".spm"] = "".join(line + "\n" for line in lines)
    # Every piece of the shared vocabulary is listed, so all folders share one output layer.
    for piece_id in range(model.get_piece_size()):
        counts.setdefault(model.id_to_piece(piece_id), 0)
    counts.pop("<unk>", None)
    files[os.path.join(folder, "dict.spm.txt")] = "".join(
        f"{piece} {count}\n" for piece, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    write_files(files)
    return dict(counts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="where to write the model (PREFIX.model, PREFIX.vocab)")
    parser.add_argument("folders", nargs="+", help="labelled sets with {split}.wrd files")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--splits", default="train_10m,train_1h", help="splits the model is trained on")
    args = parser.parse_args(argv)
    if os.path.exists(args.prefix + ".model"):
        parser.error(f"{args.prefix}.model exists; choose another prefix")
    transcripts = []
    for folder in args.folders:
        for split in args.splits.split(","):
            path = os.path.join(folder, f"{split}.wrd")
            if not os.path.isfile(path):
                parser.error(f"{path}: no such transcript file")
            transcripts.extend(line for line in read_lines(path) if line.strip())
    model = train(args.prefix, transcripts, args.vocab_size)
    for folder in args.folders:
        write_pieces(model, folder)
    print(f"{args.prefix}.model: {model.get_piece_size()} pieces; wrote .spm labels and dict.spm.txt "
          f"in {len(args.folders)} folder(s)")


if __name__ == "__main__":
    main()
