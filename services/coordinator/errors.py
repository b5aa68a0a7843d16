"""How a run ends other than by finishing."""


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why (recorded in state.json and GetRun)."""


class RunStopped(Exception):
    """StopRun was honoured at a point that cannot return normally (a pipeline stage): the run ends *stopped*."""
