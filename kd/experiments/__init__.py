"""Experiments on top of the training core: the KD study (kd.experiments.study) and the Optuna search
(kd.experiments.tuning). The core (kd.training and below) imports neither."""
