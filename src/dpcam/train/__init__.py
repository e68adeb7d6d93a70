"""The train stage: fit one model under one privacy scheme, checkpoint, resume, evaluate.

One module per job:

- :mod:`dpcam.train.fit`: ``fit``, the pure-ish core (data and config in, model and a
  :class:`~dpcam.records.TrainRecord` out; search calls it): Poisson batches, DP-SGD through the
  privacy engine, validation, checkpoints that resume with the same ledger, test metrics.
- :mod:`dpcam.train.stage`: ``run``, the stage shell that adds MLflow and writes ``models/<run>/``
  (weights, how to rebuild them, ``train.json``).
- :mod:`dpcam.train.lock`: the run folder's lock (``models/<run>/.train.lock``, ``flock``), held from
  before a run's first check to its last write: a second process training the same run name is
  refused with one line naming the live one, instead of both writing into one folder.
- :mod:`dpcam.train.family`: ``run_family``, every run of one family of the grid in one process,
  keeping finished runs whose stamp (configuration, the code this stage runs, data, weights) matches.
"""
