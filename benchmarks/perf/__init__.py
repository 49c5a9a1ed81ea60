"""Performance benchmarks of lightning_cost.

Entry points (``python -m benchmarks.perf.<name>``):

* ``bench``: step time and memory of every method, per-task gradients, solve time, teleport and trigger
  cost, peers (``perf.json`` / ``perf.txt``);
* ``aggregators``: every aggregator against TorchJD and LibMTL on the same J (``aggregators.json`` /
  ``.txt``, ``compare.txt``);
* ``cost_budget``: COST's time and Delta-m% over the teleport budget, its speed levers and the
  representation trigger's agreement (``cost_budget.json`` / ``.txt`` / ``.png``);
* ``gramian``: the Gramian methods on the Jacobian and Gramian engines (``gramian.json`` / ``.txt``);
* ``methods``: step time and memory of every method on the benchmark models (``methods_perf.json`` / ``.md``);
* ``monitor_overhead``: the ConflictMonitor's overhead on a real data set (``monitor_overhead.json`` / ``.md`` /
  ``.png``);
* ``grid_cost``: what a runner grid costs, from timed steps (``grid_cost.json`` / ``.txt``).

Helper modules:

* ``measure``: peak RSS, median wall time, ratios;
* ``peers``: TorchJD's and LibMTL's methods on a given J, synthetic Jacobians;
* ``bench_models`` (models and data), ``bench_gradients`` (sections 1, 2), ``bench_solve`` (3, 6),
  ``bench_teleport`` (4, 5), ``bench_render`` (tables) of ``bench``;
* ``aggregators_contestants``, ``aggregators_timing``, ``aggregators_render`` of ``aggregators``;
* ``cost_budget_config``, ``cost_budget_curve`` (section ``budget``), ``levers``, ``agreement``,
  ``cost_budget_report`` of ``cost_budget``.
"""
