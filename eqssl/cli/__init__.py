"""eqssl's command-line tools (console scripts in setup.py): eqssl-evaluate, eqssl-export,
eqssl-gap, eqssl-probe, eqssl-reproduce, eqssl-train-spm, eqssl-user-dir. The corpus commands
(eqssl-make-corpus, eqssl-import, eqssl-make-toy-corpus) live with the corpus in ``eqssl.corpus``."""
