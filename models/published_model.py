"""The file MLflow runs to load a published model ("models from code", instead of a pickled
object): the image classifier of models.serving, which loads its networks from the model's
artifacts."""

import mlflow

from models.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
