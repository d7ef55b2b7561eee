"""Built-in corpus generation and importers for real corpora."""
