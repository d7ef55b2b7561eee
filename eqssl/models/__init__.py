from . import eq_wav2vec2  # noqa: F401
