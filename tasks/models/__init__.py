"""Parameter models: how a family's natural parameters follow from the coefficients the optimiser
moves.

- `ConstantModel` (`constant`): one value per free parameter, optimised in unconstrained space
  through `transform_to(constraint)` (the classical fit of a distribution to a sample).
- `LinearModel` (`linear`): a linear predictor per parameter from a formula's design matrix, mapped
  through the parameter's link (distributional regression: GLM / GAMLSS).
- `NetworkModel` (`network`): a torch network from the covariates to the unconstrained value of
  every parameter it targets.

Every model is optimised by the one loop of `nllflow.fitting.engine` through a `Problem`: rows of
leaf tensors (one row per independent fit: a sweep's configurations, the bootstrap's resamples),
their evaluation (the mean NLL per row, its gradient, the trace columns) and, for the seed's SGD
rule and Newton's method, the model-specific moves.
"""
