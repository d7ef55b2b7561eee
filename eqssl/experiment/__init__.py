"""The experiment of eqssl-reproduce: the paper's protocol in miniature, with controls and seeds.

    eqssl-reproduce --preset multidomain multilingual --size small --seeds 3 --out runs/small --jobs 2

For each preset: the built-in corpus; then for each seed, stage by stage:

1. ``cssl.1``: CSSL from scratch for a fixed budget of ``cssl1.max_update`` updates; its last
   checkpoint starts the rest (no patience rule: wav2vec 2.0 first sits on a plateau at chance
   where the loss barely moves, and patience counted on that loss ended runs before they learned);
   ``none``, the no-pre-training control: CSSL.1's architecture with fresh random weights;
2. from CSSL.1, for every K in ``inner_steps``: ``ptloc.1.kK`` (PTLOC, ``ptloc.max_update``
   updates) and ``cssl.1+Nx``, CSSL continued for N = K+1 times as many updates at the same lr
   and schedule shape, i.e. as many forward/backward passes per shard as PTLOC spent;
   multilingual only: ``cssl.1-temp``, CSSL from scratch with XLS-R-style language sampling;
3. the alternating rounds ``cssl.r`` -> ``ptloc.r`` (r >= 2), each from the previous one;
4. ``eqssl-gap`` on every pre-trained checkpoint;
5. the frozen-upstream probe (``eqssl-probe``) of every checkpoint and of FBANK features on every
   fine-tuning set: encoder frozen, a weighted sum of its layers and a CTC head trained on the
   set's labels (features cached per checkpoint SHA-256 under OUT/PRESET/features);
6. CTC fine-tuning of every checkpoint on every fine-tuning set (same recipe, budget, updates and
   seed), then greedy-CTC WER / CER on its test split.

Then ``results.json`` and ``results.md`` under OUT: per measure (probe, fine-tuning) rows are
checkpoints, columns the fine-tuning sets (seen / unseen in pre-training), cells mean ± standard
deviation over seeds, with the minimum difference the seed spread lets the experiment detect;
and each pre-training run's validation accuracy per shard against chance.
A stage that finished leaves ``eqssl_stage.json`` (its checkpoint's SHA-256) and is skipped on
a rerun if that still verifies; an interrupted fairseq run is resumed from its checkpoint_last.pt.
The settings of each size are YAML files in ``recipes/reproduce``.

Read it from a settings file to a table:

* :mod:`eqssl.experiment.plan`: the settings (recipes/reproduce/*.yaml) and the runs they ask for;
* :mod:`eqssl.experiment.stages`: one (preset, seed) chain, stage by stage, with its records;
* :mod:`eqssl.experiment.runner`: every chain, alone or in a pool;
* :mod:`eqssl.experiment.records`: each finished stage's record in a folder kept in git
  (``--records``), and the report from those records alone;
* :mod:`eqssl.experiment.cells`: a chain cut into cells that fit a working session
  (``--rounds``), with each cell's wall time estimated (``--plan``);
* :mod:`eqssl.experiment.statistics` and :mod:`eqssl.experiment.report`: the tables;
* :mod:`eqssl.experiment.fairseq_log`: the one reader of fairseq's log lines.

``eqssl/cli/reproduce.py`` only parses the command line.
"""
