"""Likelihoods: observations (exact, weighted, censored, with covariates), their cached statistics,
the censored-row terms and the special functions behind the tails."""
