"""Importers that turn real corpora into the shard layout (``OUT/pretrain/{shard}/``,
``OUT/finetune/{name}/``): one module per corpus, each a function ``import_X(source, out, **options)``
returning a summary of what it wrote and skipped."""

from .common import CorpusImportError, LayoutError
from .commonvoice import import_commonvoice
from .folder import import_folder
from .librispeech import import_librispeech
from .mls import import_mls

IMPORTERS = {
    "librispeech": import_librispeech,
    "mls": import_mls,
    "commonvoice": import_commonvoice,
    "folder": import_folder,
}

__all__ = ["CorpusImportError", "LayoutError", "IMPORTERS", "import_commonvoice", "import_folder",
           "import_librispeech", "import_mls"]
