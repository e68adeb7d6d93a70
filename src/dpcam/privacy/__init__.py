"""DP-SGD's guarantee: sampling, noise, accounting, and what the audit and the search check against.

- :mod:`dpcam.privacy.plan`: the Poisson sampling plan (rate, steps);
- :mod:`dpcam.privacy.events`: dp_accounting events of a run (Gaussian and Laplace DP-SGD);
- :mod:`dpcam.privacy.accounting`: σ or λ calibrated to a target ε, and the ε spent;
- :mod:`dpcam.privacy.laplace`: the Laplace DP-SGD optimizer (L1 clipping, Laplace noise);
- :mod:`dpcam.privacy.precision`: bf16 training with exact clipping (autocast, the float32-clipping optimizers);
- :mod:`dpcam.privacy.setup`: ``PrivateSetup``, what training uses of a private model and its privacy ledger;
- :mod:`dpcam.privacy.engine`: Opacus's PrivacyEngine, the one door to it (``make_private``);
- :mod:`dpcam.privacy.profile`: trade-off curves the membership audit checks against;
- :mod:`dpcam.privacy.tuning`: the privacy cost of hyper-parameter search.
"""
