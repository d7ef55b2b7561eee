from . import eq_bestrq, eq_wav2vec2  # noqa: F401
