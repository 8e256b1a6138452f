"""The cluster: connecting to Ray, the grid of training runs on it, the store build, the doctor
and the devices of each node. The only package that imports Ray."""
