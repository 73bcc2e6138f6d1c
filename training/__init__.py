"""Features, forecaster training, evaluation, retraining and the model store."""
