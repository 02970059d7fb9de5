"""LSTM functional API (in progress)."""

REQUEST_BUILDERS: dict = {}


def lstm_cell(*args, **kwargs):
    raise NotImplementedError


def lstm(*args, **kwargs):
    raise NotImplementedError
