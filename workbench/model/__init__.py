"""The model: the typed contract and bundle, the network registry, transforms, problem kinds,
device and precision, imported weights, process groups."""
