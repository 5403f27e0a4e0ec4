"""Names in a model folder as train.py writes it, shared by the writer (training) and the readers
(generation), which must not import each other."""

TRAINING_SUMMARY = "training_summary.json"  # the run's figures and its `train_config`
BUNDLED_INIT = "bundled"  # `TrainConfig.init_from` value naming the model bundled with the package
