"""Fitting: the one optimisation loop (engine), maximum likelihood (mle), batched fits and the
bootstrap."""
