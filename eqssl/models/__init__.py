from . import eq_bestrq, eq_cpc, eq_wav2vec2  # noqa: F401
