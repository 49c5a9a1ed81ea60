"""The paper's benchmarks (COST paper Sec. 5.1) from local copies: data sets (:mod:`.data`), models
(:mod:`.models`), task losses and metrics (:mod:`.tasks`) and LightningModules (:mod:`.modules`)."""
