"""The driver of `cxr run`: the stage order, and the data stages it runs before the training
runs."""
