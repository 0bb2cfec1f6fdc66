"""The numbers built into the estimators that saved heads name (:mod:`featurecache.estimators`),
which the head kinds' settings records take as theirs: one definition for both, in a leaf
that imports nothing (the kinds must stay cheap to import; the estimators need scikit-learn).
"""

__all__ = ["KNN_TEMPERATURE", "LIBSVM_MAX_ITER"]

# the cosine k-NN head's vote temperature T: weights exp(cos_sim / T) (DINOv2's k-NN evaluation
# protocol); saved k-NN heads read it at predict time through estimators.temperature_weights
KNN_TEMPERATURE = 0.07

# libsvm's iteration cap (GramLinearSVC's default, and SVC's in the kinds): at C = 1e6 on
# non-separable data libsvm can otherwise run for hours
LIBSVM_MAX_ITER = 1_000_000
