"""The gin-configurable run functions behind the launchers (train.py, eval.py, infer.py).

They live apart from the `python -m` entry points so that `registry` can import all of
them (a gin file may bind train, evaluate and infer at once) without registering a
second copy from `__main__`."""
