"""Op registration: importing a module here registers its custom ops and backend implementations."""

from pyattn.ops import attention, lstm, lstm_cuda  # noqa: F401
