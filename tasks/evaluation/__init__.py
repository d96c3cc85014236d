"""How good a fit is: its evaluation (uncertainty, information criteria, held-out NLL,
recovery), goodness of fit, residuals and diagnostic plots."""
