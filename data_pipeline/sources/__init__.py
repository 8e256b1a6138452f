"""One reader per raw dataset, each yielding the manifest columns of `data_pipeline.schema`."""
