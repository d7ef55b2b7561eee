from . import equilibrium_bestrq, equilibrium_cpc, equilibrium_wav2vec  # noqa: F401
