"""Training-loop tests (the stand-in model they train: `tests.train.stand_in`)."""
