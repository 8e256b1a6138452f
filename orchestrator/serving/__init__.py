"""The trained models in use: the Model Registry and `cxr predict`."""
