"""The benchmark runner, one module per job:

* :mod:`.config` -- options (command line, YAML) and the validated :class:`~.config.RunnerConfig`;
* :mod:`.variants` -- COST variants as presets of callback arguments, the callback built from one;
* :mod:`.train` -- one training run (early stopping on validation, curves, trigger ratios, test);
* :mod:`.grid` -- the grid of runs and its cache;
* :mod:`.provenance` -- the code a run was trained with, named in its record;
* :mod:`.reproduce` -- ``python -m benchmarks.runner.reproduce``: cached runs retrained and compared;
* :mod:`.workers` -- where the runs train: this process, ``--workers N`` processes or Ray tasks;
* :mod:`.claims` -- claim files, so that runners sharing a results folder run each job once;
* :mod:`.progress` -- runs done of the total and the time left;
* :mod:`.stats` -- Delta-m%, confidence intervals, paired differences, mean ranks;
* :mod:`.report` -- CSV, markdown, figure and console tables;
* :mod:`.verdict` -- finished result folders collected into ``verdict.json`` and ``VERDICT.md``;
* :mod:`.cli` -- ``python -m benchmarks.run``.
"""
