"""``eqssl-import {librispeech,mls,commonvoice,folder} SOURCE OUT``: turn a real corpus into the
shard layout that ``equilibrium_pretraining`` (OUT/pretrain) and fairseq's audio fine-tuning
(OUT/finetune/NAME) read."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .importers import IMPORTERS, CorpusImportError

DESCRIPTION = """Write OUT/pretrain/SHARD/{train,valid}.tsv (fairseq manifests) and labelled sets
OUT/finetune/NAME/{SPLIT.tsv,SPLIT.wrd,SPLIT.ltr,dict.ltr.txt}. Audio that is 16 kHz mono is
referenced in place; other audio (and MP3) is converted to 16 kHz mono FLAC under OUT/audio/.
Unreadable or empty audio and unparsable transcript lines are skipped and listed in
OUT/import_report.txt; more than --max-bad-fraction of them stops the import, writing no manifest."""


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="the corpus folder")
    parser.add_argument("out", metavar="OUT", help="output folder (rerunning the same import into it is fine)")
    parser.add_argument("--valid-percent", type=float, default=1.0,
                        help="percent of each pre-training shard held out for valid.tsv, deterministically "
                        "(1 = 1%%; fairseq's wav2vec_manifest.py takes a fraction instead). Default 1")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="fail when more than this fraction of items is bad (default 0.05)")
    parser.add_argument("--jobs", type=int, default=0, help="threads reading and converting audio (default: up to 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqssl-import", description=DESCRIPTION)
    corpora = parser.add_subparsers(dest="corpus", required=True, metavar="{librispeech,mls,commonvoice,folder}")

    p = corpora.add_parser("librispeech", help="LibriSpeech: SOURCE holds train-clean-100/, dev-clean/, ...")
    add_common(p)
    p.add_argument("--pretrain-splits", help="comma-separated splits, one shard each (default: every train* split)")
    p.add_argument("--finetune-splits",
                   help="split:name pairs written to OUT/finetune/NAME (default: dev-clean:dev,"
                   "dev-other:dev_other,test-clean:test,test-other:test_other, those present)")
    p.add_argument("--finetune-name", default="librispeech", help="labelled set folder name (default librispeech)")
    p.add_argument("--shard-map", help="file of 'speaker_id<TAB>shard' lines: group the pre-training "
                   "clips by speaker instead of by split (unlisted speakers are left out)")

    p = corpora.add_parser("mls", help="Multilingual LibriSpeech: SOURCE holds mls_LANG/ (or LANG/) folders")
    add_common(p)
    p.add_argument("--languages", help="comma-separated languages, e.g. german,dutch (default: all found)")
    p.add_argument("--pretrain-split", default="train", help="split each language's shard comes from (default train)")
    p.add_argument("--finetune-splits", default="dev:dev,test:test",
                   help="split:name pairs written to OUT/finetune/LANG (default dev:dev,test:test)")

    p = corpora.add_parser("commonvoice", help="Common Voice: SOURCE is a language folder or a folder of them")
    add_common(p)
    p.add_argument("--languages", help="comma-separated language folders, e.g. tr,sv-SE (default: all found)")
    p.add_argument("--finetune-splits", default="train:train,dev:dev,test:test",
                   help="list:name pairs written to OUT/finetune/LANG (default train:train,dev:dev,test:test)")

    p = corpora.add_parser("folder", help="one sub-folder of audio per shard, optional transcripts.tsv")
    add_common(p)
    p.add_argument("--language", default="", help="transcript language code for normalisation, e.g. tr")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = vars(build_parser().parse_args(argv))
    corpus = args.pop("corpus")
    try:
        summary = IMPORTERS[corpus](**args)
    except (CorpusImportError, FileExistsError) as error:
        print(f"eqssl-import: error: {error}", file=sys.stderr)
        return 1
    for shard, counts in summary["pretrain"].items():
        print(f"pretrain/{shard}: {counts['train']} train, {counts['valid']} valid")
    for name, splits in summary["finetune"].items():
        print(f"finetune/{name}: " + ", ".join(f"{split} {n}" for split, n in splits.items()))
    print(f"{summary['bad']} of {summary['items']} items skipped, {summary['converted']} converted; "
          f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
