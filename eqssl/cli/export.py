"""eqssl-export: an eqssl checkpoint rewritten to load without eqssl. wav2vec 2.0 as a stock fairseq
checkpoint (:mod:`eqssl.cli.export_fairseq`) or a Hugging Face folder (:mod:`eqssl.cli.export_hf`),
BEST-RQ and CPC as plain PyTorch (:mod:`eqssl.cli.export_bestrq`, :mod:`eqssl.cli.export_cpc`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from .export_fairseq import ExportError, PortabilityWarning, _export
from .export_hf import export_hf


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: ``eqssl-export IN OUT [--format pt|hf]``."""
    parser = argparse.ArgumentParser(
        prog="eqssl-export",
        description="Rewrite an eqssl checkpoint (pre-training, or wav2vec_ctc fine-tuned) so that it "
        "loads without eqssl: wav2vec 2.0 as a stock fairseq checkpoint (fairseq, torchaudio); "
        "BEST-RQ as plain PyTorch tensors and a config for torchaudio's Conformer "
        "(examples/bestrq_standalone.py rebuilds it); CPC as plain PyTorch tensors and its config "
        "(examples/cpc_standalone.py rebuilds it with torch alone); with --format hf, wav2vec 2.0 as a Hugging Face "
        "transformers folder (Wav2Vec2ForPreTraining, or Wav2Vec2ForCTC with its processor).",
    )
    parser.add_argument("input", help="eqssl checkpoint (e.g. checkpoint_best.pt)")
    parser.add_argument("output", help="file (--format pt) or folder (--format hf) to write; must not "
                        "exist (hf: or be an empty folder)")
    parser.add_argument("--format", choices=("pt", "hf"), default="pt",
                        help="pt (default): a torch.save file, the stock fairseq checkpoint (wav2vec 2.0) "
                        "or plain PyTorch data (BEST-RQ, CPC); hf: a Hugging Face transformers folder "
                        "(wav2vec 2.0 only; needs pip install -e \".[hf]\"), see docs/hf_export.md")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PortabilityWarning)
            if args.format == "hf":
                _, written = export_hf(args.input, args.output)
            else:
                _, written = _export(args.input, args.output)
    except ExportError as error:
        print(f"eqssl-export: error: {error}", file=sys.stderr)
        return 1
    for warning in caught:
        if issubclass(warning.category, PortabilityWarning):
            print(f"eqssl-export: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(f"wrote {args.output} ({written})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
