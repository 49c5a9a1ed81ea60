"""Studies of the teleport itself, each run from the command line:

* ``python -m benchmarks.teleport.effect`` (:mod:`.effect`) -- what one forced teleport does to the losses,
  the mean-gradient norm and the conflict, measured with plain autograd, against a random move of the same size;
* ``python -m benchmarks.teleport.stats`` (:mod:`.stats`) -- the paper's Fig. 5a (trigger ratio per epoch)
  and Fig. 8 (gradient norm and conflict before vs after each teleport) on any benchmark.
"""
